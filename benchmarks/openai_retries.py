"""Retries of the `openai` engine against the `openai` SDK's client and a `tenacity` loop, on a real local server
that fails on purpose.

    pip install tenacity==9.2.1            # measured with this release (not a dependency; the openai SDK is pinned in constraints.txt)
    python benchmarks/openai_retries.py

One scripted HTTP server on 127.0.0.1 answers each scenario's requests with its plan of failures, then with a
good completion. Each client sends one chat request per scenario with 3 retries allowed and short pauses:

- `ours`: `OpenAIEngine._post` (retry on 408/409/425/429/5xx, time-outs, dropped connections and malformed bodies;
  honours `Retry-After`; 401/403/404 stop the run; a server that rejects `json_schema` gets `json_object`);
- `tenacity`: the same attempt (`OpenAIEngine._attempt`) and pause (`_wait`) driven by `tenacity.Retrying`;
- `openai SDK`: `openai.OpenAI(max_retries=3).chat.completions.create` (its own policy; pauses not configurable).

Prints, per scenario and client: the outcome, the requests the server saw and the seconds spent. Asserts nothing.
"""
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compeffdist.core import CompeffdistError  # noqa: E402
from compeffdist.engines import OpenAIEngine, _Retry, _RequestFailed  # noqa: E402

GOOD = {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "positive"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}
SCENARIOS = {  # the failures of the first requests, in order; then the good answer
    "429 with Retry-After: 0.5": ["429"],
    "503, 503": ["503", "503"],
    "dropped connection": ["drop"],
    "time-out (server too slow)": ["slow"],
    "200 with a non-JSON body": ["garbage"],
    "500 four times (retries used up)": ["500"] * 4,
    "400 bad request": ["400"],
    "401 wrong key": ["401"],
    "400 'response_format' (wants json_object)": ["schema"],
}


class Scripted:
    def __init__(self):
        self.plan, self.requests = [], 0
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                srv.requests += 1
                act = srv.plan.pop(0) if srv.plan else "ok"
                if act == "schema" and body.get("response_format", {}).get("type") != "json_schema":
                    act = "ok"
                if act == "drop":
                    self.close_connection = True
                    return
                if act == "slow":
                    time.sleep(1.5)
                known = {"ok": (200, json.dumps(GOOD), {}), "slow": (200, json.dumps(GOOD), {}),
                         "garbage": (200, "<html>busy</html>", {}),
                         "429": (429, '{"error": "slow down"}', {"retry-after": "0.5"}),
                         "schema": (400, '{"error": "response_format: unknown type json_schema"}', {})}
                status, payload, headers = known[act] if act in known else (int(act), '{"error": "x"}', {})
                data = payload.encode()
                self.send_response(status)
                for k, v in {"content-type": "application/json", "content-length": str(len(data)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


def body():
    return {"model": "m", "messages": [{"role": "user", "content": "Sentiment of 'great'?"}], "max_tokens": 4,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "output", "schema": {"type": "string"}, "strict": True}}}


def ours(url):
    eng = OpenAIEngine("m", base_url=url, max_retries=3, backoff_s=0.1, timeout_s=1.0)
    return lambda: eng._post(body())["choices"][0]["message"]["content"]


def with_tenacity(url):
    import tenacity
    eng = OpenAIEngine("m", base_url=url, max_retries=3, backoff_s=0.1, timeout_s=1.0)

    def post(b):
        def wait(rs):
            return eng._wait(rs.attempt_number - 1, rs.outcome.exception().args[1])

        def count(rs):
            eng.retries[rs.outcome.exception().args[0]] += 1

        try:
            for attempt in tenacity.Retrying(stop=tenacity.stop_after_attempt(eng.max_retries + 1), wait=wait,
                                             retry=tenacity.retry_if_exception_type(_Retry), before_sleep=count,
                                             reraise=True):
                with attempt:
                    return eng._attempt(eng._restyle(b))
        except _Retry as e:
            raise _RequestFailed(f"giving up after {eng.max_retries + 1} attempts (last: {e.args[0]})") from None

    return lambda: post(body())["choices"][0]["message"]["content"]


def sdk(url):
    import openai
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=3, timeout=1.0)
    b = body()
    return lambda: client.chat.completions.create(model=b["model"], messages=b["messages"], max_tokens=4,
                                                  response_format=b["response_format"]).choices[0].message.content


def main():
    srv = Scripted()
    clients = {"ours": ours(srv.url), "tenacity": with_tenacity(srv.url), "openai SDK": sdk(srv.url)}
    print(f"{'scenario':44} " + " | ".join(f"{c:^30}" for c in clients))
    for name, plan in SCENARIOS.items():
        cells = []
        for cname, call in clients.items():
            srv.plan, srv.requests = list(plan), 0
            t0 = time.perf_counter()
            try:
                out = f"answer {call()!r}"
            except CompeffdistError:
                out = "run stopped"
            except _RequestFailed:
                out = "request failed"
            except Exception as e:  # the SDK's own exceptions
                out = type(e).__name__
            cells.append(f"{out[:17]:17} {srv.requests} req {time.perf_counter() - t0:4.1f}s")
        print(f"{name:44} " + " | ".join(f"{c:30}" for c in cells))
    srv.httpd.shutdown()


if __name__ == "__main__":
    main()
