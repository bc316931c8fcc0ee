"""A real local HTTP server speaking the OpenAI chat-completions API, answering from a queue.

    with MockLLMServer(models={"mock-1"}) as server:
        server.enqueue("digits", Reply(429, headers={"Retry-After": "0"}), Hang(5), lambda body: "Paris")
        label_llm(run, base_url=server.url, model="mock-1")
        server.requests   # the JSON bodies received, in order

Queue items: a str (the answer), Reply(status, body, headers), Hang(seconds) (no answer
until the client gives up or the server stops), or a callable(body) returning one of
those. With an empty queue the server answers `default(body)` if set, else HTTP 500.
An unknown model gets OpenAI's 404 error.
"""

from __future__ import annotations

import collections
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    status: int
    body: dict | str | None = None
    headers: dict = field(default_factory=dict)


@dataclass
class Hang:
    seconds: float


class MockLLMServer:
    def __init__(self, models: set[str] | None = None, default=None):
        self.models = models or {"mock-1"}
        self.default = default
        self.queue: collections.deque = collections.deque()
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.hanging = 0  # requests being held by a Hang right now
        self._lock = threading.Lock()
        self._stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    server.requests.append(body)
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                    item = server._next(body)
                server._respond(self, body, item)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    # ------------------------------------------------------------------ control

    def enqueue(self, *items) -> None:
        with self._lock:
            self.queue.extend(items)

    def prompts(self) -> list[str]:
        """The last user message of every request received."""
        return [[m for m in r.get("messages", []) if m.get("role") == "user"][-1]["content"] for r in self.requests]

    def __enter__(self) -> MockLLMServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    # ------------------------------------------------------------------ answering

    def _next(self, body: dict):
        if body.get("model") not in self.models:
            return Reply(404, {"error": {"message": f"The model `{body.get('model')}` does not exist",
                                         "type": "invalid_request_error", "code": "model_not_found"}})
        if self.queue:
            item = self.queue.popleft()
        elif self.default is not None:
            item = self.default
        else:
            return Reply(500, {"error": {"message": "mock queue is empty", "type": "server_error"}})
        return item(body) if callable(item) else item

    def _respond(self, handler: BaseHTTPRequestHandler, body: dict, item) -> None:
        if isinstance(item, Hang):
            with self._lock:
                self.hanging += 1
            try:
                self._stop.wait(item.seconds)
            finally:
                with self._lock:
                    self.hanging -= 1
            return  # close without answering
        if isinstance(item, str):
            words = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
            item = Reply(200, {
                "id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": body.get("model"),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": item}}],
                "usage": {"prompt_tokens": words, "completion_tokens": len(item.split()),
                          "total_tokens": words + len(item.split())}})
        data = item.body if isinstance(item.body, str) else json.dumps(item.body or {})
        payload = data.encode()
        try:
            handler.send_response(item.status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            for k, v in item.headers.items():
                handler.send_header(k, v)
            handler.end_headers()
            handler.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
