"""Loop stopping (`stop_loops`): the rule on the teacher's real answers of the committed call logs, the streamed
client against a real local HTTP server that streams as llama.cpp's does, the `hf` engine's stopping criterion on
the bundled SmolLM2, and the cache key. (llama.cpp's own server: tests/test_llama_server.py.)"""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from compeffdist.core import ModelConfig
from compeffdist.engines import (CachedEngine, Constraint, FakeEngine, OpenAIEngine, SamplingParams, loop_end,
                                 make_engine, request_key)

ROOT = Path(__file__).resolve().parents[1]
CALLS = ROOT / "results" / "replication" / "teacher_calls.jsonl"
DEMO_CALLS = ROOT / "tests" / "fixtures" / "demo_teacher_calls.jsonl"


def logged_answers():
    "(key, params, generation) of every teacher answer in the committed call logs."
    out = []
    for line in CALLS.open(encoding="utf-8"):
        r = json.loads(line)
        if "params" in r["request"]:
            out += [(r["key"], r["request"]["params"], g) for g in r["response"]]
    for i, line in enumerate(DEMO_CALLS.open(encoding="utf-8")):
        r = json.loads(line)
        out += [(f"demo{i}", r["params"], g) for g in r["generations"]]
    return out


def test_no_answer_that_ended_by_itself_loops():
    "The rule never fires on an answer that ended by itself: those answers stream through unchanged."
    ended = [(k, g["text"]) for k, _, g in logged_answers() if g["finish_reason"] == "stop"]
    assert len(ended) > 3000
    assert [k for k, t in ended if loop_end(t) is not None] == []


# real answers of the replication's teacher that ran to the 384-token limit in a loop
LOOPING = {"08fb9ab93fdd26a8": "numbered list", "169a367b31990f6c": "a sentence over and over",
           "18e0b287c08f3157": "a phrase over and over"}


@pytest.mark.parametrize("prefix", LOOPING)
def test_real_looping_answers_stop_at_the_first_place_they_loop(prefix):
    (key, params, g), = [a for a in logged_answers() if a[0].startswith(prefix)]
    assert g["finish_reason"] == "length" and params["max_new_tokens"] == 384
    at = loop_end(g["text"])
    assert at is not None and at < len(g["text"])
    assert loop_end(g["text"][:at]) == at and loop_end(g["text"][:at - 1]) is None  # as a stream sees it


def test_most_answers_cut_at_the_limit_that_repeat_are_caught():
    "Of the answers cut at 384 tokens, those whose second half is mostly a repeat of earlier text are caught."
    cut = [g["text"] for _, p, g in logged_answers() if g["finish_reason"] == "length" and p["max_new_tokens"] == 384]
    caught = [t for t in cut if loop_end(t) is not None]
    assert 0 < len(caught) < len(cut)
    assert all(len(t[:loop_end(t)]) < len(t) for t in caught)


def test_loop_stopping_on_keeps_the_old_cache_keys_off_is_another_request(tmp_path):
    r = json.loads(CALLS.open(encoding="utf-8").readline())
    q = r["request"]
    p = SamplingParams(**{**q["params"], "stop": tuple(q["params"]["stop"])})
    c = Constraint(**q["constraint"]) if q["constraint"] else None
    assert p.stop_loops and request_key(r["model"], q["messages"], p, c) == r["key"]
    off = SamplingParams(**{**q["params"], "stop": tuple(q["params"]["stop"]), "stop_loops": False})
    assert request_key(r["model"], q["messages"], off, c) != r["key"]
    fake = FakeEngine(lambda m, i: "ok")
    eng = CachedEngine(fake, tmp_path / "c.sqlite", progress=False)
    batch = [[{"role": "user", "content": "x"}]]
    eng.generate(batch); eng.generate(batch); eng.generate(batch, SamplingParams(stop_loops=False))
    assert fake.calls == 2
    stored = [json.loads(x)["request"]["params"] for x in _export(eng, tmp_path).splitlines()]
    assert sorted("stop_loops" in s for s in stored) == [False, True]  # in the stored request only when off


def _export(eng, tmp_path):
    eng.cache.export_jsonl(tmp_path / "x.jsonl")
    return (tmp_path / "x.jsonl").read_text()


class StreamingServer:
    "A real HTTP server on 127.0.0.1 that streams `answer` in pieces as llama.cpp's server does, counting pieces sent."

    def __init__(self, pieces, finish="stop", garbage_first=0):
        self.pieces, self.finish, self.garbage, self.sent, self.requests = pieces, finish, garbage_first, [], 0
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                srv.requests += 1
                srv.last_body = body
                self.send_response(200)
                self.send_header("content-type", "text/event-stream"); self.send_header("connection", "close")
                self.end_headers()
                sent = 0
                try:
                    if srv.garbage:
                        srv.garbage -= 1
                        self.wfile.write(b"data: {not json\n\n"); self.wfile.flush(); return
                    for k, piece in enumerate(srv.pieces, 1):
                        chunk = {"choices": [{"index": 0, "delta": {"content": piece},
                                              "finish_reason": srv.finish if k == len(srv.pieces) else None}],
                                 "timings": {"prompt_n": 7, "cache_n": 3, "predicted_n": k}}
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode()); self.wfile.flush()
                        sent = k
                        if k % 50 == 0:
                            threading.Event().wait(0.01)  # let a client that hung up be noticed
                    usage = {"prompt_tokens": 10, "completion_tokens": len(srv.pieces)}
                    self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    srv.sent.append(sent)
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown(); self.httpd.server_close()


def words(text):
    return [w + " " for w in text.split(" ")]


def test_a_streamed_loop_is_stopped_and_the_connection_closed():
    srv = StreamingServer(words("I think the film is good and the cast is fine. " * 400), finish="length")
    try:
        eng = OpenAIEngine("m", base_url=srv.url, stream_loops=True, max_retries=0)
        (g,), = eng.generate([[{"role": "user", "content": "?"}]], SamplingParams(max_new_tokens=4000))
    finally:
        srv.close()
    assert srv.last_body["stream"] and srv.last_body["stream_options"] == {"include_usage": True}
    assert g.finish_reason == "loop" and g.text.count("cast is fine") == 5
    assert g.completion_tokens == len(g.text.split())  # the server's count at the last piece read
    assert (g.prompt_tokens, g.prompt_evaluated, g.prompt_reused) == (10, 7, 3)
    assert srv.sent[0] < len(srv.pieces) // 4  # the server stopped sending soon after


def test_a_streamed_answer_that_ends_is_the_whole_answer_and_garbage_is_retried():
    text = "Positive: the staff were kind, the room was clean and the view was lovely."
    srv = StreamingServer(words(text)[:-1] + [text.split(" ")[-1]], garbage_first=1)
    try:
        eng = OpenAIEngine("m", base_url=srv.url, stream_loops=True, max_retries=2, backoff_s=0.01)
        (g,), = eng.generate([[{"role": "user", "content": "?"}]], SamplingParams(max_new_tokens=100))
        plain = OpenAIEngine("m", base_url=srv.url, stream_loops=False)
        assert "stream" not in plain._body([{"role": "user", "content": "?"}], SamplingParams(), None, 0)
    finally:
        srv.close()
    assert (g.text, g.finish_reason, g.completion_tokens, g.prompt_tokens) == (text, "stop", 14, 10)
    assert srv.requests == 2 and eng.retries["malformed response"] == 1


LOOPY = "Write the word 'good' one hundred times."  # the bundled SmolLM2 loops on it at once (greedy)


@pytest.fixture(scope="module")
def hf():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    eng = make_engine(ModelConfig(model="smollm2-135m-instruct", engine="hf", device="cpu", dtype="float32",
                                  batch_size=2))
    yield eng
    eng.close()
    torch.set_num_threads(before)


def test_hf_stops_the_looping_sequence_of_a_batch_and_not_the_other(hf):
    batch = [[{"role": "user", "content": LOOPY}], [{"role": "user", "content": "Name three fruits."}]]
    on = hf.generate(batch, SamplingParams(max_new_tokens=160))
    off = hf.generate(batch, SamplingParams(max_new_tokens=160, stop_loops=False))
    assert off[0][0].finish_reason == "length" and off[0][0].completion_tokens == 160
    assert on[0][0].finish_reason == "loop" and on[0][0].completion_tokens < 160
    assert off[0][0].text.startswith(on[0][0].text)
    assert on[1][0].text == off[1][0].text and on[1][0].finish_reason == off[1][0].finish_reason == "stop"
    assert on[1][0].prompt_evaluated == on[1][0].prompt_tokens > 0


def test_llamacpp_in_process_stops_a_loop_and_counts_tokens_as_without_streaming():
    from compeffdist.engines import LlamaCppEngine
    eng = LlamaCppEngine("smollm2-135m-instruct", context_length=1024, n_threads=1)
    try:
        (on,), = eng.generate([[{"role": "user", "content": LOOPY}]], SamplingParams(max_new_tokens=120))
        (off,), = eng.generate([[{"role": "user", "content": LOOPY}]], SamplingParams(max_new_tokens=120, stop_loops=False))
        ends = [[{"role": "user", "content": "Name three fruits."}], [{"role": "user", "content": "Write a long story."}]]
        streamed = [g[0] for g in eng.generate(ends, SamplingParams(max_new_tokens=40))]
        whole = [g[0] for g in eng.generate(ends, SamplingParams(max_new_tokens=40, stop_loops=False))]
    finally:
        eng.close()
    assert on.finish_reason == "loop" and on.completion_tokens < 120 and off.text.startswith(on.text)
    assert (off.finish_reason, off.completion_tokens) == ("length", 120) and on.prompt_tokens == off.prompt_tokens
    for s, w in zip(streamed, whole):  # an answer that does not loop: the same text, finish reason and token counts
        assert (s.text, s.finish_reason, s.prompt_tokens, s.completion_tokens) == \
               (w.text, w.finish_reason, w.prompt_tokens, w.completion_tokens)
    assert {w.finish_reason for w in whole} == {"stop", "length"}
