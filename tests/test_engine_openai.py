"""The `openai` engine against a real OpenAI-compatible server: llama-cpp-python's `llama_cpp.server`, started
by the test on 127.0.0.1 with the bundled SmolLM2 GGUF. Failures (429, 5xx, time-outs, dropped connections,
malformed bodies) come from a small real HTTP proxy in front of it that spoils the first requests it gets."""
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from compeffdist.core import CompeffdistError, ModelConfig
from compeffdist.engines import (CachedEngine, Constraint, OpenAIEngine, SamplingParams, json_ok, make_engine)
from compeffdist.models import resolve_model

SCHEMA = {"type": "object",
          "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                         "reason": {"type": "string", "maxLength": 60}},
          "required": ["sentiment", "reason"], "additionalProperties": False}


def chat(text):
    return [{"role": "user", "content": text}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    "A real llama_cpp.server on 127.0.0.1 serving the bundled SmolLM2 GGUF; yields its /v1 URL."
    port = free_port()
    gguf = resolve_model("smollm2-135m-instruct").location
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "wb") as out:  # a file, not a pipe: llama.cpp logs a lot and a full pipe would block it
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
                                 "--port", str(port), "--n_ctx", "2048", "--n_threads", "1",
                                 "--n_threads_batch", "1"],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited: {log.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail("llama_cpp.server did not start in 120 s")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill(); proc.wait()


class FlakyProxy:
    """A real HTTP proxy on 127.0.0.1 in front of `upstream`. The first requests get the failures in `plan`
    (one per request, in order): "429", "503", "400", "401", "drop" (close the connection without an answer),
    "slow" (answer only after `slow_s`, past the client's time-out), "garbage" (200 with a non-JSON body),
    "think" (the real answer with a <think> block put in front).
    Then it forwards, after `delay_s`. It counts requests and the most it ever had in flight."""

    def __init__(self, upstream: str, plan=(), delay_s: float = 0.0, slow_s: float = 6.0, retry_after: str | None = "0"):
        self.upstream, self.plan, self.delay_s, self.slow_s = upstream, list(plan), delay_s, slow_s
        self.retry_after = retry_after
        self.requests, self.inflight, self.max_inflight, self.times, self.bodies = 0, 0, 0, [], []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with proxy.lock:
                    proxy.requests += 1
                    proxy.bodies.append(json.loads(body or b"{}"))
                    proxy.times.append(time.monotonic())
                    proxy.inflight += 1
                    proxy.max_inflight = max(proxy.max_inflight, proxy.inflight)
                    action = proxy.plan.pop(0) if proxy.plan else "forward"
                self.counted = True
                try:
                    self.act(action, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    self.done()

            def done(self):
                # out of flight before the answer is written: the client may send its next request on reading it
                with proxy.lock:
                    if self.counted:
                        proxy.inflight -= 1
                        self.counted = False

            def act(self, action, body):
                if action == "drop":
                    self.close_connection = True
                    return
                if action == "slow":
                    time.sleep(proxy.slow_s)
                    return self.answer(503, b'{"error": "too late"}')
                if action == "garbage":
                    return self.answer(200, b"<html>not json</html>")
                if action in ("429", "503", "400", "401"):
                    headers = {"retry-after": proxy.retry_after} if action == "429" and proxy.retry_after else {}
                    return self.answer(int(action), b'{"error": {"message": "spoiled by the proxy"}}', headers)
                time.sleep(proxy.delay_s)
                r = httpx.post(proxy.upstream + self.path.removeprefix("/v1"), content=body,
                               headers={"content-type": "application/json"}, timeout=120)
                content = r.content
                if action == "think":  # a model that thinks although told not to
                    out = r.json()
                    out["choices"][0]["message"]["content"] = "<think>\nIs it positive?\n</think>\n\n" + \
                        out["choices"][0]["message"]["content"]
                    content = json.dumps(out).encode()
                self.answer(r.status_code, content)

            def answer(self, code, content, headers=None):
                self.done()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(content)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(content)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown(); self.httpd.server_close()


@pytest.fixture
def proxy(server):
    made = []

    def make(**kw):
        made.append(FlakyProxy(server, **kw))
        return made[-1]
    yield make
    for p in made:
        p.close()


def test_generates_against_a_real_server(server):
    eng = OpenAIEngine("smollm2", base_url=server, max_concurrency=2)
    prompts = ["What is the capital of France?", "Name a fruit.", "Say hello.", "What colour is the sky?"]
    res = eng.generate([chat(p) for p in prompts], SamplingParams(max_new_tokens=12))
    for (g,) in res:
        assert g.text.strip() and g.prompt_tokens > 5 and 0 < g.completion_tokens <= 12
        assert g.finish_reason in ("stop", "length")
    again = eng.generate([chat(prompts[0])], SamplingParams(max_new_tokens=12))
    assert again[0][0].text == res[0][0].text  # greedy: the same answer
    (g,), = eng.generate([chat("Write a long story about a dragon.")], SamplingParams(max_new_tokens=3))
    assert g.completion_tokens == 3 and g.finish_reason == "length"
    two = eng.generate([chat("Name an animal.")], SamplingParams(max_new_tokens=8, n=2, temperature=1.0))[0]
    assert len(two) == 2 and all(x.completion_tokens > 0 for x in two)
    assert not eng.retries
    eng.close()


def test_json_schema_through_response_format(server):
    reviews = ["I loved this film, wonderful acting.", "Broken on arrival, a waste of money."]
    batch = [chat(f"Classify the sentiment of this review as JSON with sentiment and reason: {r}") for r in reviews]
    # auto: OpenAI's {"type": "json_schema"} first; llama.cpp's server rejects it, so the engine switches for good
    eng = OpenAIEngine("smollm2", base_url=server, max_retries=0)
    for (g,) in eng.generate(batch, SamplingParams(max_new_tokens=64), Constraint(json_schema=SCHEMA)):
        assert g.finish_reason == "stop" and json_ok(g.text, SCHEMA), g.text
    assert eng.schema_style == "json_object"
    # a config can name the style; options reach the engine
    cfg = ModelConfig(model="smollm2", engine="openai", base_url=server, options={"schema_style": "json_object"})
    eng2 = make_engine(cfg)
    assert isinstance(eng2, OpenAIEngine) and eng2.schema_style == "json_object"
    (g,), = eng2.generate(batch[:1], SamplingParams(max_new_tokens=64), Constraint(json_schema=SCHEMA))
    assert json_ok(g.text, SCHEMA)


def test_choice(server):
    eng = OpenAIEngine("smollm2", base_url=server)
    labels = ("positive", "negative", "neutral")
    res = eng.generate([chat(f"Sentiment of: {t}") for t in ["I love it!", "Terrible.", "It is a table."]],
                       constraint=Constraint(choice=labels))
    assert all(g.text in labels for (g,) in res)  # unwrapped from the JSON string the server returns


def test_retries_429_5xx_timeouts_drops_and_bad_bodies(proxy):
    p = proxy(plan=["429", "503", "slow", "drop", "garbage"], slow_s=10)
    eng = OpenAIEngine("smollm2", base_url=p.url, max_concurrency=1, timeout_s=5, max_retries=6, backoff_s=0.05)
    prompts = [f"Say the number {i}." for i in range(3)]
    res = eng.generate([chat(x) for x in prompts], SamplingParams(max_new_tokens=6))
    assert all(g.finish_reason != "error" and g.text for (g,) in res)
    retries = dict(eng.retries)
    # each spoiled request was retried once (a real answer slower than 5 s on a busy machine is one more time-out)
    assert retries.pop("ReadTimeout") >= 1
    assert retries == {"HTTP 429": 1, "HTTP 503": 1, "RemoteProtocolError": 1, "malformed response": 1}
    assert p.requests == len(prompts) + sum(eng.retries.values())  # and nothing else was sent


def test_honours_retry_after(proxy):
    p = proxy(plan=["429"], retry_after="1")
    eng = OpenAIEngine("smollm2", base_url=p.url, backoff_s=0.01)
    (g,), = eng.generate([chat("Hi")], SamplingParams(max_new_tokens=4))
    assert g.text and p.requests == 2
    assert p.times[1] - p.times[0] >= 0.95  # waited as told, not the 10 ms backoff


def test_gives_up_and_the_cache_keeps_nothing(proxy, server, tmp_path):
    p = proxy(plan=["503"] * 3)
    eng = CachedEngine(OpenAIEngine("smollm2", base_url=p.url, max_retries=2, backoff_s=0.01), tmp_path / "c.sqlite",
                       progress=False)
    (g,), = eng.generate([chat("Hi")], SamplingParams(max_new_tokens=4))
    assert g.finish_reason == "error" and p.requests == 3  # 1 try + 2 retries
    assert eng.stats.errors == 1 and len(eng.cache) == 0
    (g,), = eng.generate([chat("Hi")], SamplingParams(max_new_tokens=4))  # the proxy is healthy now
    assert g.finish_reason != "error" and eng.stats.misses == 1 and len(eng.cache) == 1


def test_a_refused_request_fails_alone_and_a_wrong_key_stops(proxy):
    p = proxy(plan=["400"])
    eng = OpenAIEngine("smollm2", base_url=p.url, max_concurrency=1)
    res = eng.generate([chat("one"), chat("two")], SamplingParams(max_new_tokens=4))
    assert sorted(g.finish_reason for (g,) in res)[0] == "error"  # the refused one, not retried
    assert sum(g.finish_reason == "error" for (g,) in res) == 1 and p.requests == 2
    p2 = proxy(plan=["401"])
    with pytest.raises(CompeffdistError, match="401"):
        OpenAIEngine("smollm2", base_url=p2.url).generate([chat("x")], SamplingParams(max_new_tokens=4))


@pytest.mark.parametrize("limit", [1, 3])
def test_bounded_concurrency(proxy, limit):
    p = proxy(delay_s=0.5)
    eng = OpenAIEngine("smollm2", base_url=p.url, max_concurrency=limit)
    res = eng.generate([chat(f"Say {i}.") for i in range(7)], SamplingParams(max_new_tokens=3))
    assert len(res) == 7 and all(g.text for (g,) in res)
    assert p.max_inflight == limit  # never more than the limit, and the limit is used


def test_n_samples_cost_one_request_when_greedy(proxy):
    p = proxy()
    eng = OpenAIEngine("smollm2", base_url=p.url)
    greedy = eng.generate([chat("Name a colour.")], SamplingParams(max_new_tokens=6, n=3))[0]
    assert len(greedy) == 3 and len({g.text for g in greedy}) == 1 and p.requests == 1
    sampled = eng.generate([chat("Name a colour.")], SamplingParams(max_new_tokens=6, n=2, temperature=1.0, seed=3))[0]
    assert len(sampled) == 2 and p.requests == 3  # one request per sample, seeds seed and seed + 1


def test_thinking_is_off_and_a_leading_thinking_block_is_removed(server):
    p = FlakyProxy(server, ["think"])
    eng = OpenAIEngine("smollm2", base_url=p.url)
    got = eng.generate([chat("Say hello.")] * 1 + [chat("Say bye.")], SamplingParams(max_new_tokens=8))
    assert all(b["chat_template_kwargs"] == {"enable_thinking": False} for b in p.bodies)  # the server accepts it
    assert not any("<think>" in g[0].text for g in got) and all(g[0].text for g in got)
    assert eng.thoughts_removed == 1


def test_openais_own_api_gets_no_template_variables():
    body = OpenAIEngine("gpt-x", base_url="https://api.openai.com/v1")._body(chat("hi"), SamplingParams(), None, 0)
    assert "chat_template_kwargs" not in body
    own = OpenAIEngine("m", base_url="http://127.0.0.1:9/v1", chat_template_kwargs={"enable_thinking": True})
    assert own._body(chat("hi"), SamplingParams(), None, 0)["chat_template_kwargs"] == {"enable_thinking": True}
