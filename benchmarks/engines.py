"""Teacher throughput on a CPU: the in-process llama.cpp engine against llama.cpp's server with N slots, in one run.

    python benchmarks/engines.py                        # the 32 prompts of the committed demo run, N = 1, 2, 4, 8
    python benchmarks/engines.py --samples runs/replication/pairing/samples.jsonl --draw 0 --parallel 8

The requests are real ones of the responses stage: the first `--prompts` student prompts of a run's
`pairing/samples.jsonl` (instruction, demonstrations and text), or `--prompts` drawn at random from all of them
with `--draw SEED` (a large run's file holds its samples instruction by instruction), each with the constraint
the stage would give it (free text, a JSON schema or a label list), greedy, at most `--max-new-tokens` new tokens, no call cache.
Rows: `before` is the single-stream `llamacpp` engine (llama-cpp-python, one request at a time) called as the
stages called it before concurrent decoding (requests in stage order); `in-process` is the same engine called as
the stages call it now, through the call-cache front, which sends requests sorted by prompt so that shared
prefixes are neighbours; `server N` is the same model, threads and requests through `llamacpp` with `parallel: N`
(llama.cpp's server, N slots, continuous batching), called the same way. Each row is a separate process, started one after the other on an otherwise idle machine,
so that its peak RSS is its own (the process, and the server it started). One short warm-up request per row
before timing. tokens/s = completion tokens / wall seconds of the whole batch.
Target: >= 2.5x the `before` row's aggregate tokens/s at the best N, and greedy answers equal to the
single-stream ones (those that differ are counted, with the first token where they part). Prints; asserts nothing.
"""
import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time

from compeffdist.core import read_jsonl
from compeffdist.engines import CachedEngine, LlamaCppEngine, SamplingParams
from compeffdist.llama_server import LlamaServerEngine
from compeffdist.responses import constraint_for

MODEL = "qwen2.5-coder-1.5b-instruct"


def requests(path: str, n: int, draw: int | None = None):
    "The first n samples (or n drawn with seed `draw`) as conversations and constraints, as the stage sends them."
    rows = read_jsonl(path)
    rows = rows[:n] if draw is None else random.Random(draw).sample(rows, min(n, len(rows)))
    if len(rows) < n:
        raise SystemExit(f"{path} has {len(rows)} samples, fewer than --prompts {n}")
    return [[{"role": "user", "content": r["instruction"]}] for r in rows], [constraint_for(r.get("output_format")) for r in rows]


def one_row(a) -> dict:
    "Measure one engine setting in this process (called in a child process by main)."
    batch, cons = requests(a.samples, a.prompts, a.draw)
    t0 = time.perf_counter()
    eng = (LlamaCppEngine(a.model, context_length=a.context, n_threads=a.threads) if a.one <= 0 else
           LlamaServerEngine(a.model, parallel=a.one, context_length=a.context, n_threads=a.threads))
    load = time.perf_counter() - t0
    eng.generate([[{"role": "user", "content": "Hi"}]], SamplingParams(max_new_tokens=4))
    # -1: the engine as the stages called it before (requests in stage order); otherwise as the stages call it now,
    # through CachedEngine (no cache here), which sends the requests sorted by prompt so shared prefixes are neighbours
    front = eng if a.one == -1 else CachedEngine(eng, None, progress=False)
    t0 = time.perf_counter()
    out = front.generate(batch, SamplingParams(max_new_tokens=a.max_new_tokens), cons)
    secs = time.perf_counter() - t0
    reused = eng.timings["cache_n"] if hasattr(eng, "timings") else None
    eng.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB: this process (the model, when in process)
    server_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the server, stopped and waited for
    tokens = sum(g[0].completion_tokens for g in out)
    return {"parallel": a.one, "load_s": load, "seconds": secs, "tokens": tokens, "tok_s": tokens / secs,
            "prompt_tokens": sum(g[0].prompt_tokens for g in out), "prompt_tokens_reused": reused,
            "peak_rss_mib": rss / 1024, "server_rss_mib": server_rss / 1024, "texts": [g[0].text for g in out], "errors": sum(g[0].finish_reason == "error" for g in out)}


def first_difference(a: str, b: str, vocab) -> str:
    "Where two answers part: the token index and the next tokens of each."
    ta, tb = (vocab.tokenize(x.encode(), add_bos=False, special=True) for x in (a, b))
    k = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
    text = lambda ids: vocab.detokenize(ids).decode(errors="replace")
    return f"token {k}: {text(ta[k:k + 4])!r} vs {text(tb[k:k + 4])!r}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", default="tests/fixtures/demo_run/pairing/samples.jsonl",
                    help="a run's pairing/samples.jsonl (default: the 32 of the committed demo run)")

    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--draw", type=int, help="draw the prompts at random with this seed (default: the first ones)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--parallel", default="1,2,4,8", help="server slot counts to measure")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--context", type=int, default=4096, help="context per sequence")
    ap.add_argument("--json", help="also write the rows (with the texts) to this file")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one row, print it as JSON
    a = ap.parse_args()
    if a.one is not None:
        print(json.dumps(one_row(a)))
        return
    which = "" if a.draw is None else f" drawn at random (seed {a.draw})"
    print(f"{a.model}, {a.prompts} responses-stage prompts{which} of {a.samples}, greedy, max_new_tokens={a.max_new_tokens}, "
          f"{a.threads} threads; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
    rows = []
    for n in [-1, 0] + [int(x) for x in a.parallel.split(",")]:  # -1, 0: the in-process engine, before and now
        args = [sys.executable, __file__, "--samples", a.samples, "--model", a.model, "--prompts", str(a.prompts),
                "--max-new-tokens", str(a.max_new_tokens), "--threads", str(a.threads), "--context", str(a.context),
                "--one", str(n)] + ([] if a.draw is None else ["--draw", str(a.draw)])
        out = subprocess.run(args, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"row parallel={n} failed:\n{out.stderr[-2000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["engine"] = {-1: "before", 0: "in-process"}.get(n, f"server {n}")
        rows.append(row)
        print(f"  {row['engine']:<11} {row['tok_s']:6.1f} tok/s  ({row['tokens']} tokens in {row['seconds']:.1f}s, "
              f"peak RSS {row['peak_rss_mib']:.0f} MiB + server {row['server_rss_mib']:.0f} MiB)", flush=True)
    report(rows, a)


def report(rows, a):
    from llama_cpp import Llama
    from compeffdist.models import resolve_model
    vocab = Llama(resolve_model(a.model).location, vocab_only=True, verbose=False)
    base = rows[0]
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end\n")
    print(f"{'engine':<12}{'tokens':>8}{'seconds':>9}{'tok/s':>8}{'x before':>10}{'RSS MiB':>9}{'server MiB':>12}"
          f"{'prompt tok reused':>19}{'differ':>8}")
    for r in rows:
        differ = [i for i, (x, y) in enumerate(zip(r["texts"], base["texts"])) if x != y]
        r["differ"] = differ
        reused = "-" if r["prompt_tokens_reused"] is None else f"{r['prompt_tokens_reused']}/{r['prompt_tokens']}"
        print(f"{r['engine']:<12}{r['tokens']:>8}{r['seconds']:>9.1f}{r['tok_s']:>8.1f}{r['tok_s'] / base['tok_s']:>10.2f}"
              f"{r['peak_rss_mib']:>9.0f}{r['server_rss_mib']:>12.0f}{reused:>19}{len(differ):>8}")
    best = max(rows[2:], key=lambda r: r["tok_s"])
    ratio = best["tok_s"] / base["tok_s"]
    print(f"\nbest: {best['engine']} at {ratio:.2f}x the engine before (target >= 2.5: {'met' if ratio >= 2.5 else 'MISSED'})")
    for r in rows[1:]:
        for i in r["differ"][:3]:
            print(f"  {r['engine']}: answer {i} differs from the single stream at {first_difference(r['texts'][i], base['texts'][i], vocab)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
