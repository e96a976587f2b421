"""A tiny OpenAI-compatible completions server for the ab-serve tests (loopback, a thread).

The completion of a prompt is its words reversed, streamed one word per server-sent event. Knobs:
`token_delay` (seconds per token), `flaky` (prompts containing "[flaky]" answer HTTP 500), prompts
containing "hang" stall past any test timeout, prompts containing "[cut]" close the stream after
the first token without `[DONE]` (a server dying mid-answer), and `diverge_at` replaces the token at that index
for prompts containing "diverge" (what a backend that flips a near-tied token would do).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StubServer:
    def __init__(
        self, *, token_delay: float = 0.0, flaky: bool = False, diverge_at: int | None = None, model: str = "stub-model"
    ):
        self.token_delay, self.flaky, self.diverge_at, self.model = token_delay, flaky, diverge_at, model
        self.counter = itertools.count(1)
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the stream ends when the connection closes

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                if self.path != "/v1/models":
                    self.send_error(404)
                    return
                body = json.dumps({"object": "list", "data": [{"id": stub.model, "object": "model"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                n = next(stub.counter)
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(req)
                if self.path != "/v1/completions" or req.get("model") != stub.model:
                    self.send_error(404, "unknown model or path")
                    return
                if stub.flaky and "[flaky]" in req["prompt"]:
                    self.send_error(500, "injected failure")
                    return
                words = req["prompt"].split()[::-1][: req["max_tokens"]]
                if stub.diverge_at is not None and "diverge" in req["prompt"] and len(words) > stub.diverge_at:
                    words[stub.diverge_at] = "DIFFERENT"
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                try:
                    if "hang" in req["prompt"]:
                        time.sleep(3.0)
                    for i, word in enumerate(words):
                        time.sleep(stub.token_delay)
                        chunk = {
                            "id": f"cmpl-{n}",
                            "object": "text_completion",
                            "model": stub.model,
                            "choices": [{"index": 0, "text": (" " if i else "") + word, "finish_reason": None}],
                        }
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                        if "[cut]" in req["prompt"]:
                            return
                    usage = {"id": f"cmpl-{n}", "choices": [], "usage": {"completion_tokens": len(words)}}
                    self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}"

    def __enter__(self) -> "StubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
