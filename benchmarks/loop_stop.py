"""Loop stopping replayed on a committed call log: which answers would change, and how many tokens it saves.

    python benchmarks/loop_stop.py                                   # results/replication/teacher_calls.jsonl
    python benchmarks/loop_stop.py --calls CALLS.jsonl --limit 500   # another log, or its first 500 answers

Every teacher answer of the log is streamed again, token by token (the teacher's own tokenizer), by a local HTTP
server that speaks llama.cpp's streaming protocol (`data:` chunks with per-token `timings`), to the client that
the `llamacpp` server engine uses (`OpenAIEngine` with `stream_loops`), with the default `stop_loops`; a stopped
answer's decoded tokens are the server's count in the last chunk the client read (llama.cpp itself decodes on
until it notices the closed connection, a token or so). For each answer it prints nothing; at the end:

- answers that ended by themselves (`finish_reason` stop): how many come back byte for byte with the same finish
  reason (all of them must: loop stopping never changes an answer that is kept);
- answers cut at the token limit: how many are stopped as loops, and the completion tokens the log spent on them
  against the tokens decoded until the stop, per `max_new_tokens` (the responses stage of the replication is the
  one at 384);
- the answers stopped in a stage that reads cut answers (JSON repaired by `parse_json_lenient`): whether what it
  reads from the stopped answer is what it read from the whole one.

Prints; asserts only that no answer that ended by itself changed.
"""
import argparse
import json
import sys
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compeffdist.engines import OpenAIEngine, SamplingParams, loop_end  # noqa: E402
from compeffdist.models import resolve_model  # noqa: E402
from compeffdist.teacher import parse_json_lenient  # noqa: E402

TEACHER = "qwen2.5-coder-1.5b-instruct"


def teacher_answers(path: Path, limit: int | None = None) -> list[dict]:
    "The generations of the teacher's calls in a call log (embeddings left out), each with its request."
    out = []
    for line in path.open(encoding="utf-8"):
        r = json.loads(line)
        q = r["request"]
        if "params" not in q:
            continue
        for j, g in enumerate(r["response"]):
            out.append({"id": f"{r['key']}:{j}", "params": q["params"], "text": g["text"],
                        "finish_reason": g["finish_reason"], "completion_tokens": g["completion_tokens"],
                        "prompt_tokens": g["prompt_tokens"]})
    return out[:limit]


class ReplayServer:
    "A llama.cpp-like streaming chat server on 127.0.0.1 that answers each request with a recorded answer."

    def __init__(self, pieces: dict[str, list[str]], prompt_tokens: dict[str, int]):
        self.pieces, self.prompt_tokens = pieces, prompt_tokens
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                rid = body["replay_id"]
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("connection", "close")
                self.end_headers()
                n = len(srv.pieces[rid])
                try:
                    for k, piece in enumerate(srv.pieces[rid], 1):
                        t = {"prompt_n": srv.prompt_tokens[rid], "cache_n": 0, "predicted_n": k}
                        chunk = {"choices": [{"index": 0, "delta": {"content": piece},
                                              "finish_reason": body["final"] if k == n else None}], "timings": t}
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode()); self.wfile.flush()
                    usage = {"prompt_tokens": srv.prompt_tokens[rid], "completion_tokens": n}
                    self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __exit__(self, *exc):
        self.httpd.shutdown(); self.httpd.server_close()


class ReplayClient(OpenAIEngine):
    "The client of the `llamacpp` server engine (streamed, `stop_loops`), naming the recorded answer it wants."

    def _body(self, messages, params, constraint, r):
        body = super()._body(messages, params, constraint, r)
        body.update(replay_id=messages[0]["content"], final=messages[1]["content"])
        return body


def token_pieces(texts: list[str]) -> list[list[str]]:
    "Each text as the teacher's tokens, decoded piece by piece (bytes of a split character wait for the rest)."
    import codecs
    import llama_cpp
    llm = llama_cpp.Llama(model_path=resolve_model(TEACHER).location, vocab_only=True, verbose=False)
    out = []
    for text in texts:
        dec, pieces = codecs.getincrementaldecoder("utf-8")(), []
        for tok in llm.tokenize(text.encode(), add_bos=False, special=True):
            s = dec.decode(llm.detokenize([tok]))
            if s: pieces.append(s)
        out.append(pieces)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", default=str(ROOT / "results" / "replication" / "teacher_calls.jsonl"))
    ap.add_argument("--limit", type=int, help="only the first N answers")
    ap.add_argument("--concurrency", type=int, default=8)
    a = ap.parse_args(argv)
    answers = teacher_answers(Path(a.calls), a.limit)
    t0 = time.perf_counter()
    pieces = token_pieces([x["text"] for x in answers])
    byid = {x["id"]: x for x in answers}
    server = ReplayServer({x["id"]: p for x, p in zip(answers, pieces)}, {x["id"]: x["prompt_tokens"] for x in answers})
    with server as url:
        eng = ReplayClient("replay", base_url=url, max_concurrency=a.concurrency, max_retries=0, stream_loops=True)
        batch = [[{"role": "user", "content": x["id"]}, {"role": "assistant", "content": x["finish_reason"]}]
                 for x in answers]
        params = [SamplingParams(max_new_tokens=x["params"]["max_new_tokens"]) for x in answers]
        got = eng.generate(batch, params)
        eng.close()
    shown = Path(a.calls).resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    print(f"{len(answers)} answers of {shown} replayed in {time.perf_counter() - t0:.0f}s")
    kept, changed, by_cap = Counter(), [], defaultdict(Counter)
    stopped_reading = Counter()
    for x, g in zip(answers, got):
        g = g[0]
        cap = x["params"]["max_new_tokens"]
        if x["finish_reason"] == "stop":
            same = g.text == x["text"] and g.finish_reason == "stop"
            kept["same" if same else "changed"] += 1
            if not same: changed.append(x["id"])
            continue
        c = by_cap[cap]
        c["cut"] += 1; c["tokens_logged"] += x["completion_tokens"]
        if g.finish_reason == "loop":
            c["loops"] += 1; c["loop_tokens_logged"] += x["completion_tokens"]
            c["loop_tokens_decoded"] += g.completion_tokens
            assert x["text"].startswith(g.text) and loop_end(g.text) is not None
            if cap != 384:  # the stages that read JSON out of cut answers
                full, part = parse_json_lenient(x["text"])[0], parse_json_lenient(g.text)[0]
                stopped_reading["same" if full == part else "fewer items" if _prefix_items(part, full) else "other"] += 1
    print(f"answers that ended by themselves: {kept['same']} unchanged, {kept['changed']} changed")
    total = sum(x["completion_tokens"] for x in answers)
    for cap, c in sorted(by_cap.items()):
        saved = c["loop_tokens_logged"] - c["loop_tokens_decoded"]
        cap_total = sum(x["completion_tokens"] for x in answers if x["params"]["max_new_tokens"] == cap)
        print(f"max_new_tokens {cap}: {c['cut']} answers cut at the limit ({c['tokens_logged']} tokens); "
              f"{c['loops']} stopped as loops after {c['loop_tokens_decoded']} of their {c['loop_tokens_logged']} tokens: "
              f"{saved} saved = {saved / cap_total:.1%} of the {cap_total} completion tokens at this limit")
    saved = sum(c["loop_tokens_logged"] - c["loop_tokens_decoded"] for c in by_cap.values())
    print(f"all: {saved} of {total} completion tokens saved ({saved / total:.1%})")
    if stopped_reading:
        print("stopped answers at other limits, JSON read from the stopped vs the whole answer:", dict(stopped_reading))
    assert not changed, f"answers that ended by themselves changed: {changed[:5]}"


def _prefix_items(part, full) -> bool:
    "True if `part` is `full` with fewer list items (a JSON answer stopped earlier)."
    if isinstance(part, dict) and isinstance(full, dict) and part.keys() == full.keys():
        return all(_prefix_items(part[k], full[k]) for k in part)
    if isinstance(part, list) and isinstance(full, list):
        return len(part) <= len(full) and all(p == f for p, f in zip(part[:-1], full)) and (
            not part or part[-1] == full[len(part) - 1] or _prefix_items(part[-1], full[len(part) - 1]))
    return part == full


if __name__ == "__main__":
    main()
