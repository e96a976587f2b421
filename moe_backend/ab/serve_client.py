"""`python -m moe_backend ab-serve`: the same completions to two OpenAI-compatible servers.

Streams `/v1/completions` (server-sent events) from server A and server B with bounded concurrency
per server, a per-request timeout and a total duration, and records per request the time to first
token, the gaps between streamed tokens, the text and the errors. A server that errors or times
out is reported, never fatal. Standard library only (http.client, threads).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

from moe_backend._json_file import json_safe, write_text

__all__ = ["ServerSpec", "RequestResult", "stream_completion", "run_ab", "load_prompts", "add_ab_serve_parser"]


@dataclass(frozen=True)
class ServerSpec:
    label: str  # "A" / "B", or the user's names
    url: str  # base URL, with or without /v1
    model: str | None = None  # None: the first model the server lists
    api_key: str | None = None

    @property
    def v1(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/v1") else base + "/v1"


@dataclass
class RequestResult:
    server: str
    index: int  # prompt index: A's and B's results of one index answer the same request
    start_s: float  # since the run started
    ok: bool = False
    error: str | None = None  # "timeout", "stopped" (run duration reached), "http 500: ...", "connection: ..."
    ttft_s: float | None = None  # request sent -> first non-empty text chunk
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive text chunks
    e2e_s: float | None = None
    chunks: list[str] = field(default_factory=list)  # streamed text pieces (about one token each)
    completion_tokens: int | None = None  # from the server's usage, when it sends one

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.chunks)


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"server URL: expected http(s)://host[:port][/path], got {url!r}")
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return cls(parts.hostname, parts.port, timeout=timeout), parts.path or "/"


def _headers(server: ServerSpec) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if server.api_key:
        headers["Authorization"] = f"Bearer {server.api_key}"
    return headers


def discover_model(server: ServerSpec, timeout: float = 10.0) -> str:
    """The first model id of GET /v1/models (ValueError saying why when there is none)."""
    conn, path = _connection(server.v1 + "/models", timeout)
    try:
        conn.request("GET", path, headers=_headers(server))
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise ValueError(f"{server.label}: GET {server.v1}/models answered {resp.status}; pass --model")
        models = json.loads(body).get("data") or []
        if not models:
            raise ValueError(f"{server.label}: {server.v1}/models lists no model; pass --model")
        return models[0]["id"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{server.label}: cannot list models at {server.v1}/models ({exc}); pass --model") from None
    finally:
        conn.close()


def stream_completion(
    server: ServerSpec,
    prompt: str,
    index: int,
    *,
    max_tokens: int,
    temperature: float,
    timeout: float,
    stop_at: float,
    t0: float,
) -> RequestResult:
    """One streamed completion. timeout bounds the whole request; stop_at (time.monotonic) is the
    run's end: a request still streaming then is cut and reported as "stopped"."""
    start = time.monotonic()
    result = RequestResult(server.label, index, start - t0)
    deadline = min(start + timeout, stop_at)
    payload = {
        "model": server.model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    conn = None
    try:
        conn, path = _connection(server.v1 + "/completions", max(0.05, deadline - start))
        conn.request("POST", path, body=json.dumps(payload).encode(), headers=_headers(server))
        sock = conn.sock  # the response takes it over (conn.sock becomes None) when the server closes
        resp = conn.getresponse()
        if resp.status != 200:
            detail = resp.read(300).decode(errors="replace").strip().replace("\n", " ")
            result.error = f"http {resp.status}: {detail[:120]}"
            return result
        last = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout()
            sock.settimeout(remaining)
            line = resp.readline()
            if not line:  # closed before [DONE]: the server died or dropped us mid-answer
                result.error = "bad stream: closed before [DONE]"
                return result
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, event names
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = f"stream error: {str(chunk['error'])[:120]}"
                return result
            if chunk.get("usage"):
                result.completion_tokens = chunk["usage"].get("completion_tokens")
            for choice in chunk.get("choices") or []:
                text = choice.get("text") or ""
                if text:
                    now = time.monotonic()
                    if last is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
                    result.chunks.append(text)
        result.e2e_s = time.monotonic() - start
        result.ok = True
    except (socket.timeout, TimeoutError):
        result.error = "stopped" if stop_at < start + timeout and time.monotonic() >= stop_at else "timeout"
    except (OSError, http.client.HTTPException) as exc:
        result.error = f"connection: {type(exc).__name__}: {str(exc)[:100]}"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as exc:
        result.error = f"bad stream: {type(exc).__name__}: {str(exc)[:100]}"
    finally:
        if conn is not None:
            conn.close()
    return result


def run_ab(
    servers: list[ServerSpec],
    prompts: list[str],
    *,
    requests: int | None = None,
    concurrency: int = 8,
    max_tokens: int = 64,
    temperature: float = 0.0,
    timeout: float = 60.0,
    duration: float = 600.0,
    progress: bool = True,
) -> dict:
    """Sends prompts[0..requests) (cycled) to every server, at most `concurrency` in flight per
    server, starting no request after `duration` seconds. Returns {"results": [RequestResult],
    "wall_s": {label: first start -> last end}, "settings": {...}}."""
    from moe_backend._progress import progress as progress_bar

    if not prompts:
        raise ValueError("prompts: expected at least one prompt")
    if concurrency < 1 or timeout <= 0 or duration <= 0 or max_tokens < 1:
        raise ValueError("concurrency, timeout, duration and max_tokens must be positive")
    if requests is not None and requests < 0:
        raise ValueError(f"requests: expected a count >= 0 (0: one per prompt), got {requests}")
    total = requests or len(prompts)
    t0 = time.monotonic()
    stop_at = t0 + duration
    results: list[RequestResult] = []
    lock = threading.Lock()

    with progress_bar(total=total * len(servers), desc="ab-serve", unit="req", enabled=progress) as bar:

        def serve_one(server: ServerSpec, index: int) -> None:
            if time.monotonic() >= stop_at:
                return  # never started: the run's duration is over
            r = stream_completion(
                server,
                prompts[index % len(prompts)],
                index,
                max_tokens=max_tokens,
                temperature=temperature,
                timeout=timeout,
                stop_at=stop_at,
                t0=t0,
            )
            with lock:
                results.append(r)
                bar.update(1)

        pools = [ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"ab-{s.label}") for s in servers]
        try:
            for i in range(total):  # A and B get request i at about the same moment
                for server, pool in zip(servers, pools):
                    pool.submit(serve_one, server, i)
        finally:
            for pool in pools:
                pool.shutdown(wait=True)
    wall = {}
    for s in servers:
        mine = [r for r in results if r.server == s.label]
        ends = [r.start_s + (r.e2e_s or 0.0) for r in mine]
        wall[s.label] = (max(ends) - min(r.start_s for r in mine)) if mine else 0.0
    results.sort(key=lambda r: (r.index, r.server))
    return {
        "results": results,
        "wall_s": wall,
        "not_started": total * len(servers) - len(results),
        "settings": dict(
            requests=total,
            concurrency=concurrency,
            max_tokens=max_tokens,
            temperature=temperature,
            timeout=timeout,
            duration=duration,
            servers={s.label: {"url": s.url, "model": s.model} for s in servers},
        ),
    }


def load_prompts(path: str) -> list[str]:
    """One prompt per line, or JSON lines with a "prompt" field; blank lines are skipped."""
    if not os.path.isfile(path):
        raise ValueError(f"--prompts: no file at {path!r}")
    prompts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    prompts.append(str(json.loads(line)["prompt"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f'--prompts {path}:{n}: a JSON line needs a "prompt" field') from None
            else:
                prompts.append(line.replace("\\n", "\n"))
    if not prompts:
        raise ValueError(f"--prompts: {path!r} holds no prompt")
    return prompts


def add_ab_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ab-serve",
        help="send the same completions to two OpenAI-compatible servers; "
        "TTFT, inter-token latency, throughput, output agreement",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--a", required=True, metavar="URL", help="server A, e.g. http://host:8000 (or .../v1)")
    p.add_argument("--b", required=True, metavar="URL", help="server B")
    p.add_argument(
        "--prompts", required=True, metavar="FILE", help='one prompt per line, or JSON lines {"prompt": ...}'
    )
    p.add_argument("--label-a", default="A")
    p.add_argument("--label-b", default="B")
    p.add_argument("--model", help="model name for both (default: each server's first listed model)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (default $OPENAI_API_KEY)")
    p.add_argument("--requests", type=int, default=0, help="requests per server (default: one per prompt; cycles)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight per server (default 8)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="default 0: greedy, so outputs are comparable")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    p.add_argument(
        "--duration",
        type=float,
        default=600.0,
        help="the run ends after this many seconds (default 600): no request starts later, and one still "
        "streaming then is cut and counted as 'stopped'",
    )
    p.add_argument("--out", default="ab-serve-report", help="output folder (report.md, results.jsonl, *.png)")
    p.set_defaults(ab_command=cmd_ab_serve)
    return p


def cmd_ab_serve(args: argparse.Namespace) -> int:
    from moe_backend.ab.serve_report import write_serve_report

    try:
        prompts = load_prompts(args.prompts)
        if args.label_a == args.label_b:
            raise ValueError("--label-a and --label-b must differ")
        servers = []
        for flag, label, url in (("--a", args.label_a, args.a), ("--b", args.label_b, args.b)):
            spec = ServerSpec(label, url, args.model, args.api_key)
            try:
                _connection(spec.v1, 1.0)  # validates the URL
            except ValueError:
                raise ValueError(f"{flag}: expected http(s)://host[:port][/path], got {url!r}") from None
            servers.append(spec if args.model else ServerSpec(label, url, discover_model(spec), args.api_key))
        run = run_ab(
            servers,
            prompts,
            requests=args.requests or None,
            concurrency=args.concurrency,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            timeout=args.timeout,
            duration=args.duration,
        )
    except ValueError as exc:
        print(f"ab-serve: {exc}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    write_text(
        os.path.join(args.out, "results.jsonl"),
        "".join(json.dumps(json_safe(dict(asdict(r), text=r.text))) + "\n" for r in run["results"]),
    )
    paths, summary = write_serve_report(run, args.out)
    print(summary)
    print("wrote " + ", ".join([os.path.join(args.out, "results.jsonl")] + paths))
    # Some failed requests are part of a report; a server that answered none is a failed run (a
    # script must not read it as a comparison).
    silent = [s.label for s in servers if not any(r.ok for r in run["results"] if r.server == s.label)]
    if silent:
        print(f"ab-serve: no request to {', '.join(silent)} completed (see the report's errors)", file=sys.stderr)
        return 1
    return 0
