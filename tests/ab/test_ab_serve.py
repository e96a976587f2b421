"""`python -m moe_backend ab-serve` against two OpenAI-compatible stub servers on loopback: A fast
and steady; B slow, failing on a third of the prompts, and diverging on one. Bounded in time."""

import json
import time

import pytest

from moe_backend.__main__ import main
from moe_backend.ab.serve_client import ServerSpec, load_prompts, run_ab, stream_completion
from moe_backend.ab.serve_report import _pct, agreement, first_divergence, server_stats
from tests.ab.openai_stub import StubServer

PROMPTS = [
    f"the quick brown fox number {i} jumps over the lazy dog" + (" [flaky]" if i % 3 == 2 else "") for i in range(8)
] + ["please diverge here at some point in this long sentence", "hang forever please"]


def test_ab_serve_report(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    with StubServer() as a, StubServer(token_delay=0.02, flaky=True, diverge_at=2) as b:
        start = time.monotonic()
        rc = main(
            [
                "ab-serve",
                "--a",
                a.url,
                "--b",
                b.url + "/v1/",
                "--prompts",
                str(prompts),
                "--concurrency",
                "3",
                "--timeout",
                "1.0",
                "--duration",
                "20",
                "--max-tokens",
                "16",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        elapsed = time.monotonic() - start
    assert rc == 0
    assert elapsed < 8, elapsed  # the hanging request is cut by its 1 s timeout
    assert all(r["max_tokens"] == 16 and r["stream"] and r["temperature"] == 0 for r in a.requests)
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 20
    by = {(r["server"], r["index"]): r for r in rows}
    assert by[("A", 0)]["text"] == "dog lazy the over jumps 0 number fox brown quick the"
    assert by[("A", 0)]["ok"] and by[("A", 0)]["completion_tokens"] == 11 and len(by[("A", 0)]["itl_s"]) == 10
    assert by[("A", 9)]["error"] == by[("B", 9)]["error"] == "timeout"  # the "hang" prompt
    assert [i for i in range(10) if by[("B", i)]["error"] and by[("B", i)]["error"].startswith("http 500")] == [2, 5]
    assert all(by[("A", i)]["ok"] for i in range(9)) and by[("B", 8)]["ok"]
    assert by[("B", 8)]["text"].split()[2] == "DIFFERENT"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| errors | timeout: 1 | http 500: 2, timeout: 1 |" in report
    assert "| completed / sent | 9 / 10 | 7 / 10 |" in report
    assert "compared (both completed): 7; identical: 6 (85.7%)" in report
    assert "first divergent token: median 2, earliest 2" in report
    for png in ("ttft_cdf.png", "itl_cdf.png", "e2e_cdf.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    # B streams 20 ms per token: its median inter-token latency shows it; A's is far lower.
    itl_a = sorted(g for r in rows if r["server"] == "A" and r["ok"] for g in r["itl_s"])
    itl_b = sorted(g for r in rows if r["server"] == "B" and r["ok"] for g in r["itl_s"])
    assert itl_b[len(itl_b) // 2] >= 0.015 > itl_a[len(itl_a) // 2]


def test_agreement_and_first_divergence():
    assert first_divergence(["a", " b", " c"], "a b c") == (None, None)
    assert first_divergence(["a", " b", " c"], "a x c") == (2, 1)
    assert first_divergence(["a", " b"], "a b c") == (3, 2)  # A stopped early
    assert first_divergence(["ab", "cd"], "ab") == (2, 1)
    with StubServer() as a, StubServer(diverge_at=1, token_delay=0.01) as b:
        run = run_ab(
            [ServerSpec("A", a.url, "stub-model"), ServerSpec("B", b.url, "stub-model")],
            ["one two three", "diverge two three four"],
            concurrency=2,
            timeout=5,
            duration=5,
            progress=False,
        )
    agree = agreement(run, "A", "B")
    assert agree["compared"] == 2 and agree["exact"] == 1 and agree["exact_rate"] == 0.5
    assert agree["divergent"][0]["token"] == 1 and agree["first_divergent_token_min"] == 1
    stats = server_stats(run, "B")
    assert stats["ok"] == 2 and stats["errors"] == {} and stats["output_tokens"] == 7
    assert stats["tokens_per_s"] > 0 and stats["ttft_p50_ms"] is not None


def test_duration_and_unreachable_server(tmp_path):
    """A dead server is reported per request, not fatal; no request starts after --duration."""
    with StubServer(token_delay=0.2) as slow:
        dead = ServerSpec("dead", "http://127.0.0.1:9", "stub-model")  # discard port: refused
        start = time.monotonic()
        run = run_ab(
            [ServerSpec("slow", slow.url, "stub-model"), dead],
            ["a b c d e f"] * 6,
            concurrency=1,
            timeout=10,
            duration=0.5,
            progress=False,
        )
        assert time.monotonic() - start < 3
    slow_results = [r for r in run["results"] if r.server == "slow"]
    assert run["not_started"] >= 4 and slow_results
    assert any(r.error == "stopped" for r in slow_results)  # cut at the run's end, not a server timeout
    assert all(r.error.startswith("connection:") for r in run["results"] if r.server == "dead")


def _one_stream(url: str, model: str, prompt: str):
    now = time.monotonic()
    return stream_completion(
        ServerSpec("A", url, model), prompt, 0, max_tokens=4, temperature=0, timeout=2, stop_at=now + 5, t0=now
    )


def test_stream_errors_and_bad_inputs(tmp_path):
    with StubServer() as a:
        r = _one_stream(a.url, "wrong-model", "x y")
        assert not r.ok and r.error.startswith("http 404")
        # A stream the server closes before [DONE] (it died mid-answer) is an error, not a short answer.
        r = _one_stream(a.url, "stub-model", "x y z [cut]")
        assert not r.ok and r.error == "bad stream: closed before [DONE]" and r.chunks == ["[cut]"]
        assert (
            main(["ab-serve", "--a", a.url, "--b", "ftp://nowhere", "--prompts", __file__, "--out", str(tmp_path)]) == 2
        )
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "first"}\nsecond line\\nwith a newline\n\n')
    assert load_prompts(str(path)) == ["first", "second line\nwith a newline"]
    path.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match="prompt"):
        load_prompts(str(path))
    with pytest.raises(ValueError, match="no file"):
        load_prompts(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="at least one prompt"):
        run_ab([ServerSpec("A", "http://127.0.0.1:9")], [])
    with pytest.raises(ValueError, match="requests: expected a count >= 0"):
        run_ab([ServerSpec("A", "http://127.0.0.1:9")], ["p"], requests=-3)


def test_latency_percentiles_interpolate():
    """p50 of an even count is the mean of the middle two; p99 of 1..100 is not the maximum."""
    assert _pct([20.0, 10.0], 0.5) == 15.0
    assert _pct([float(v) for v in range(1, 101)], 0.99) == pytest.approx(99.01)
    assert _pct([7.0], 0.99) == 7.0 and _pct([], 0.5) is None


def test_a_server_that_answers_nothing_fails_the_run(tmp_path, capsys):
    """Some failed requests are part of the report; a server that completed none fails the run."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a b c\n")
    args = ["ab-serve", "--model", "stub-model", "--prompts", str(prompts), "--timeout", "5"]
    with StubServer() as a:
        assert main([*args, "--a", a.url, "--b", a.url, "--out", str(tmp_path / "ok")]) == 0
        rc = main([*args, "--a", a.url, "--b", "http://127.0.0.1:9", "--out", str(tmp_path / "bad")])
    assert rc == 1 and "no request to B completed" in capsys.readouterr().err
    assert (tmp_path / "bad" / "report.md").exists()  # the report is still written
    assert main([*args, "--a", "localhost:8000", "--b", "http://127.0.0.1:9", "--out", str(tmp_path / "x")]) == 2
    assert "--a: expected http(s)://host[:port][/path], got 'localhost:8000'" in capsys.readouterr().err
