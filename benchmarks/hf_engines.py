"""Tokens/s of the hf engine (one by one, batched) and the in-process llamacpp engine on the same prompts and GGUF, in one run.

    python benchmarks/hf_engines.py                        # SmolLM2-135M (the bundled student), 16 prompts
    python benchmarks/hf_engines.py --threads 1,2          # the whole table once per thread count
    python benchmarks/hf_engines.py --model qwen2.5-coder-1.5b-instruct --prompts 8 --max-new-tokens 48

Rows: `hf` one conversation at a time, `hf` batched (8 and 16 conversations per forward pass, left-padded) and
`llamacpp` on the same GGUF file (transformers dequantises it to float32; llama.cpp runs it quantised). Greedy,
the same `max_new_tokens` for all, one warm-up call per engine before timing. tokens/s = completion tokens /
wall seconds of the whole batch (a batched row pays for the padding of sequences that ended early).
Targets: batched hf >= 3x one-by-one; llamacpp >= 2x hf. The script prints the ratios; it asserts nothing.
"""
import argparse
import json
import os
import platform
import time

import torch

from compeffdist.engines import HFEngine, LlamaCppEngine, SamplingParams

REVIEWS = [
    "The food was cold and the waiter ignored us for twenty minutes.",
    "Absolutely loved the new album, every track is a gem.",
    "The hotel room was fine, nothing special, but the location was great.",
    "I regret buying this phone; the battery barely lasts half a day.",
    "A touching film with a weak ending.",
    "Customer support solved my problem in five minutes. Impressive!",
    "The plot was predictable and the jokes fell flat.",
    "Decent laptop for the price, though the screen is dim.",
    "Worst airline experience of my life: lost luggage, no apology.",
    "The museum's new wing is stunning and well curated.",
    "Shipping took three weeks and the box arrived crushed.",
    "Not bad, not great. It does what it says.",
    "The soup was bland but the dessert made up for it.",
    "I can't recommend this course enough; the teacher is brilliant.",
    "The update broke my favourite feature. Please bring it back.",
    "Cozy cafe, friendly staff, and the best croissants in town.",
]


def prompts(n: int) -> list[list[dict]]:
    texts = (REVIEWS * (n // len(REVIEWS) + 1))[:n]
    return [[{"role": "user", "content": f"Explain the sentiment of this review in two sentences: {t}"}] for t in texts]


def measure(engine, batch, params) -> dict:
    t0 = time.perf_counter()
    out = engine.generate(batch, params)
    secs = time.perf_counter() - t0
    tokens = sum(g.completion_tokens for r in out for g in r)
    return {"tokens": tokens, "seconds": secs, "tok_s": tokens / secs, "texts": [r[0].text for r in out]}


def run(model: str, n: int, max_new: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    batch, params = prompts(n), SamplingParams(max_new_tokens=max_new)
    warm = [[{"role": "user", "content": "Hi"}]]
    rows = []
    t0 = time.perf_counter()
    hf = HFEngine(model, device="cpu", dtype="float32")
    print(f"  hf loaded in {time.perf_counter() - t0:.1f}s", flush=True)
    hf.generate(warm, SamplingParams(max_new_tokens=4))
    for label, bs in [("hf one-by-one", 1), ("hf batched 8", 8), ("hf batched 16", 16)]:
        hf.batch_size = bs
        rows.append({"engine": label, "threads": threads, **measure(hf, batch, params)})
        print(f"  {label:<15} {rows[-1]['tok_s']:7.1f} tok/s", flush=True)
    hf.close()
    t0 = time.perf_counter()
    lc = LlamaCppEngine(model, context_length=1024, n_threads=threads)
    print(f"  llamacpp loaded in {time.perf_counter() - t0:.1f}s", flush=True)
    lc.generate(warm, SamplingParams(max_new_tokens=4))
    rows.append({"engine": "llamacpp", "threads": threads, **measure(lc, batch, params)})
    print(f"  {'llamacpp':<15} {rows[-1]['tok_s']:7.1f} tok/s", flush=True)
    lc.close()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a GGUF model spec (alias or .gguf file)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", default=str(os.cpu_count()), help="comma-separated thread counts to run with")
    ap.add_argument("--json", help="also write the rows (with the generated texts) to this file")
    a = ap.parse_args()
    print(f"{a.model}, {a.prompts} prompts, greedy, max_new_tokens={a.max_new_tokens}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; torch {torch.__version__}")
    rows = []
    for t in [int(x) for x in a.threads.split(",")]:
        print(f"threads={t}")
        rows += run(a.model, a.prompts, a.max_new_tokens, t)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end\n")
    print(f"{'engine':<16}{'threads':>8}{'tokens':>8}{'seconds':>9}{'tok/s':>8}{'x one-by-one':>14}")
    for t in sorted({r["threads"] for r in rows}):
        rs = {r["engine"]: r for r in rows if r["threads"] == t}
        base = rs["hf one-by-one"]["tok_s"]
        for r in rs.values():
            print(f"{r['engine']:<16}{t:>8}{r['tokens']:>8}{r['seconds']:>9.1f}{r['tok_s']:>8.1f}{r['tok_s'] / base:>14.2f}")
        best_hf = max(rs["hf batched 8"]["tok_s"], rs["hf batched 16"]["tok_s"])
        batched = best_hf / base
        lc_vs_best = rs["llamacpp"]["tok_s"] / best_hf
        lc_vs_one = rs["llamacpp"]["tok_s"] / base
        print(f"  threads={t}: batched hf / one-by-one = {batched:.2f} (target >= 3: {'met' if batched >= 3 else 'MISSED'}); "
              f"llamacpp / best batched hf = {lc_vs_best:.2f}, llamacpp / hf one-by-one = {lc_vs_one:.2f} "
              f"(target >= 2: {'met' if lc_vs_best >= 2 else 'MISSED'} against batched, "
              f"{'met' if lc_vs_one >= 2 else 'MISSED'} against one-by-one)\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
