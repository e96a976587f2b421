"""One engine run for tests/e2e, executed by the engine venv's Python:

    python _engine_run.py {vllm|sglang} {offline|serve} MODEL_DIR OUT_JSON --prompt 1,2,3 --max-tokens 8

Greedy generation from the prompt's token ids, with the log-probs of every prompt and generated
token and the top `--top` alternatives at each position. `offline` uses the engine's Python API in
this process; `serve` starts the engine's OpenAI-style server on loopback, sends one request and
stops it. When MOE_BACKEND_PLAN_LOG is set (inherited by every engine process), the plans our
experts executed while the request ran are the log's lines between two marks: after start-up, after
the answer. Writes OUT_JSON:
    {"prompt": [...], "output": [...], "positions": [{"index": t, "token": id, "logprob": lp,
     "top": {id: lp}} for t = 1 .. len-1], "plans": [...], "startup_s": s, "request_s": s}
Engine start-up is bounded (--start-timeout); the caller bounds the whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

# Shared by both engines: small memory, eager CPU execution, one request.
MAX_MODEL_LEN = 256
KV_CACHE_BYTES = 256 << 20  # vLLM: without a bound it sizes the KV cache from the machine's RAM
SGLANG_MAX_TOKENS = 2048


def _plan_lines() -> list[str]:
    path = os.environ.get("MOE_BACKEND_PLAN_LOG")
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().splitlines()


def _position(index: int, token: int, logprob: float, top: dict[int, float]) -> dict:
    return {
        "index": index,
        "token": int(token),
        "logprob": float(logprob),
        "top": {str(int(t)): float(lp) for t, lp in top.items()},
    }


# ---------------------------------------------------------------- vLLM
def _vllm_engine_kwargs() -> dict:
    # custom_ops none: the CPU rotary custom op gave wrong DeepSeek logits; native torch ops instead.
    return dict(
        moe_backend="phasemoe",
        dtype="bfloat16",
        max_model_len=MAX_MODEL_LEN,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        compilation_config={"custom_ops": ["none"]},
        enforce_eager=True,
        max_num_seqs=4,
        seed=0,
    )


def vllm_offline(model: str, prompt: list[int], max_tokens: int, top: int) -> dict:
    from vllm import LLM, SamplingParams

    t0 = time.monotonic()
    llm = LLM(model=model, **_vllm_engine_kwargs())
    startup = time.monotonic() - t0
    mark = len(_plan_lines())
    t1 = time.monotonic()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=top, prompt_logprobs=top)
    (result,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    request = time.monotonic() - t1
    plans = _plan_lines()[mark:]
    completion = result.outputs[0]
    output = list(completion.token_ids)
    positions = []
    for t in range(1, len(prompt)):
        entry = result.prompt_logprobs[t]
        positions.append(
            _position(t, prompt[t], entry[prompt[t]].logprob, {tok: lp.logprob for tok, lp in entry.items()})
        )
    for i, (token, entry) in enumerate(zip(output, completion.logprobs)):
        positions.append(
            _position(len(prompt) + i, token, entry[token].logprob, {tok: lp.logprob for tok, lp in entry.items()})
        )
    return {"output": output, "positions": positions, "plans": plans, "startup_s": startup, "request_s": request}


def vllm_server_argv(model: str, port: int) -> list[str]:
    kw = _vllm_engine_kwargs()
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.cli.main",
        "serve",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--moe-backend",
        kw["moe_backend"],
        "--dtype",
        kw["dtype"],
        "--max-model-len",
        str(kw["max_model_len"]),
        "--kv-cache-memory-bytes",
        str(kw["kv_cache_memory_bytes"]),
        "--compilation-config",
        json.dumps(kw["compilation_config"]),
        "--enforce-eager",
        "--max-num-seqs",
        str(kw["max_num_seqs"]),
        "--seed",
        str(kw["seed"]),
    ]


def vllm_request(base: str, model: str, prompt: list[int], max_tokens: int, top: int) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "logprobs": top,
        "prompt_logprobs": top,
        "return_tokens_as_token_ids": True,
    }
    choice = _post(base + "/v1/completions", body)["choices"][0]

    def token_id(key: str) -> int:  # "token_id:123" with return_tokens_as_token_ids
        return int(key.split(":", 1)[1])

    positions = []
    for t in range(1, len(prompt)):
        entry = {int(tok): v["logprob"] for tok, v in choice["prompt_logprobs"][t].items()}
        positions.append(_position(t, prompt[t], entry[prompt[t]], entry))
    lps = choice["logprobs"]
    output = [token_id(tok) for tok in lps["tokens"]]
    for i, (token, lp, alts) in enumerate(zip(output, lps["token_logprobs"], lps["top_logprobs"])):
        positions.append(_position(len(prompt) + i, token, lp, {token_id(k): v for k, v in alts.items()}))
    return {"output": output, "positions": positions}


# ---------------------------------------------------------------- SGLang
def _sglang_engine_kwargs() -> dict:
    # torch_native attention: SGLang's CPU engine without AMX kernels; one small request.
    return dict(
        device="cpu",
        attention_backend="torch_native",
        moe_runner_backend="phasemoe",
        disable_cuda_graph=True,
        max_total_tokens=SGLANG_MAX_TOKENS,
        max_running_requests=4,
        chunked_prefill_size=MAX_MODEL_LEN,
        mem_fraction_static=0.05,
        random_seed=0,
        skip_server_warmup=True,
    )


def _sglang_positions(prompt: list[int], meta: dict) -> tuple[list[int], list[dict]]:
    positions = []
    for t in range(1, len(prompt)):
        lp, token = meta["input_token_logprobs"][t][:2]
        assert token == prompt[t], (token, prompt[t])
        top = {alt[1]: alt[0] for alt in meta["input_top_logprobs"][t]}
        positions.append(_position(t, token, lp, top))
    output = []
    for i, ((lp, token, *_), alts) in enumerate(zip(meta["output_token_logprobs"], meta["output_top_logprobs"])):
        output.append(int(token))
        positions.append(_position(len(prompt) + i, token, lp, {alt[1]: alt[0] for alt in alts}))
    return output, positions


def _sglang_request_fields(prompt: list[int], max_tokens: int, top: int) -> dict:
    return {
        "input_ids": prompt,
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": top,
        "sampling_params": {"temperature": 0.0, "max_new_tokens": max_tokens, "ignore_eos": True},
    }


def sglang_offline(model: str, prompt: list[int], max_tokens: int, top: int) -> dict:
    import sglang

    t0 = time.monotonic()
    engine = sglang.Engine(model_path=model, **_sglang_engine_kwargs())
    try:
        startup = time.monotonic() - t0
        mark = len(_plan_lines())
        t1 = time.monotonic()
        result = engine.generate(**_sglang_request_fields(prompt, max_tokens, top))
        request = time.monotonic() - t1
        plans = _plan_lines()[mark:]
    finally:
        engine.shutdown()
    output, positions = _sglang_positions(prompt, result["meta_info"])
    return {"output": output, "positions": positions, "plans": plans, "startup_s": startup, "request_s": request}


def sglang_server_argv(model: str, port: int) -> list[str]:
    kw = _sglang_engine_kwargs()
    return [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        kw["device"],
        "--attention-backend",
        kw["attention_backend"],
        "--moe-runner-backend",
        kw["moe_runner_backend"],
        "--disable-cuda-graph",
        "--max-total-tokens",
        str(kw["max_total_tokens"]),
        "--max-running-requests",
        str(kw["max_running_requests"]),
        "--chunked-prefill-size",
        str(kw["chunked_prefill_size"]),
        "--mem-fraction-static",
        str(kw["mem_fraction_static"]),
        "--random-seed",
        str(kw["random_seed"]),
        "--skip-server-warmup",
    ]


def sglang_request(base: str, model: str, prompt: list[int], max_tokens: int, top: int) -> dict:
    result = _post(base + "/generate", _sglang_request_fields(prompt, max_tokens, top))
    output, positions = _sglang_positions(prompt, result["meta_info"])
    return {"output": output, "positions": positions}


# ---------------------------------------------------------------- serving
def _post(url: str, body: dict, timeout: float = 300.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server (both engines then stop their own workers), SIGKILL to whatever of
    its process tree is left after a grace period."""
    import psutil

    try:
        tree = [server.pid] + [c.pid for c in psutil.Process(server.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = [server.pid]
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    server.wait()


def serve(
    engine: str, model: str, prompt: list[int], max_tokens: int, top: int, start_timeout: float, log_path: str
) -> dict:
    port = _free_loopback_port()
    argv = (vllm_server_argv if engine == "vllm" else sglang_server_argv)(model, port)
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"{engine} server exited with {server.returncode} during start-up; see {log_path}")
            if time.monotonic() - t0 > start_timeout:
                raise RuntimeError(f"{engine} server not healthy after {start_timeout:.0f} s; see {log_path}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        startup = time.monotonic() - t0
        mark = len(_plan_lines())
        t1 = time.monotonic()
        answer = (vllm_request if engine == "vllm" else sglang_request)(base, model, prompt, max_tokens, top)
        request = time.monotonic() - t1
        answer["plans"] = _plan_lines()[mark:]  # each line is written before its forward returns
    finally:
        _stop(server)
    return {**answer, "startup_s": startup, "request_s": request}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", choices=("vllm", "sglang"))
    parser.add_argument("mode", choices=("offline", "serve"))
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--prompt", required=True, help="comma-separated token ids")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--top", type=int, default=2)
    parser.add_argument("--start-timeout", type=float, default=420.0)
    parser.add_argument("--server-log", default=None, help="serve: the server's output (default OUT.server.log)")
    args = parser.parse_args(argv)
    prompt = [int(t) for t in args.prompt.split(",")]
    if args.mode == "serve":
        result = serve(
            args.engine,
            args.model,
            prompt,
            args.max_tokens,
            args.top,
            args.start_timeout,
            args.server_log or args.out + ".server.log",
        )
    else:
        run = vllm_offline if args.engine == "vllm" else sglang_offline
        result = run(args.model, prompt, args.max_tokens, args.top)
    with open(args.out, "w") as f:
        json.dump({"engine": args.engine, "mode": args.mode, "prompt": prompt, **result}, f)


if __name__ == "__main__":
    main()
