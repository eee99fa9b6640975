"""Ranking-based difficulty, three ways, in one process, on the same model and samples:

  (1) the plain reference procedure: per sample an unpadded forward pass, then a Python loop over the response
      positions with a full-vocabulary sort at each (compeffdist.difficulty.reference_rank_score);
  (2) compeffdist: batched, vectorised, no per-token loop and no full sort (DifficultyScorer, metric rank);
  (3) the bare batched forward pass over the same batches and tokens that (2) runs (tail_logits), nothing else.

Prints the times, the ratios and max |score(1) - score(2)|. Targets: (1)/(2) >= 20, max difference <= 1e-5,
(2)/(3) <= 1.3. (2) and (3) are timed batch by batch, interleaved, so that load from other processes affects both
alike. The scoring-only line compares the per-token loop with the vectorised scores on the same logits (the part
of the work the forward pass does not dominate; on a CPU the forward pass is most of (1), (2) and (3)).

    python benchmarks/difficulty.py                       # SmolLM2-135M-Instruct, 210 SentiBench samples, CPU
    python benchmarks/difficulty.py --model Qwen/Qwen3-4B --device cuda --n 400 --batch-size 16
"""
import argparse
import math
import os
import time

import torch

from compeffdist.difficulty import (DifficultyScorer, rank_token_scores, reference_rank_score,
                                    reference_rank_token_scores, sentibench_samples, tail_logits)
from compeffdist.models import load_causal_lm, pick_device


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=210, help="samples (SentiBench train splits, gold answers as responses)")
    ap.add_argument("--format", default="chat", choices=["chat", "raw"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--scoring-only", action="store_true", help="only the scoring step on shared logits (quick)")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = pick_device(a.device)
    per = math.ceil(a.n / 7)
    samples = sentibench_samples(n_per_dataset=per)[:a.n]
    model, tok = load_causal_lm(a.model, dtype=a.dtype, device=device)
    scorer = DifficultyScorer(model, tok, fmt=a.format, batch_size=a.batch_size, max_length=a.max_length,
                              metrics=["rank"])
    enc = scorer.encode(samples)
    order = sorted(range(len(samples)), key=lambda i: -len(enc[i].ids))
    batches = [order[s:s + a.batch_size] for s in range(0, len(order), a.batch_size)]
    n_tokens = sum(len(e.ids) for e in enc)
    n_resp = sum(len(e.targets) for e in enc)
    print(f"model {a.model} on {device} ({a.dtype}), {len(samples)} samples, {n_tokens} tokens "
          f"({n_resp} response tokens), format {a.format}, batch {a.batch_size}, torch threads {torch.get_num_threads()}")

    # warm-up (allocator, kernels)
    scorer.score([samples[i] for i in batches[0]])
    tail_logits(model, [enc[i].ids for i in batches[0]], max(len(enc[i].targets) for i in batches[0]), scorer.pad_id)

    if not a.scoring_only:
        # (2) and (3), interleaved batch by batch
        t2 = t3 = 0.0
        ours = [None] * len(samples)
        for b in batches:
            sync(device); t = time.perf_counter()
            tail_logits(model, [enc[i].ids for i in b], max(len(enc[i].targets) for i in b), scorer.pad_id)
            sync(device); t3 += time.perf_counter() - t
            t = time.perf_counter()
            for i, r in zip(b, scorer.score([samples[i] for i in b])):
                ours[i] = r["rank"]
            sync(device); t2 += time.perf_counter() - t

        # (1) the reference procedure
        sync(device); t = time.perf_counter()
        ref = [reference_rank_score(model, tok, s, a.format, a.max_length) for s in samples]
        sync(device); t1 = time.perf_counter() - t
        diff = max(abs(x - y) for x, y in zip(ref, ours))

    # scoring only, on the same logits: the per-token loop vs the vectorised scores, over >= 256 response tokens
    rows, tg = [], []
    for b in sorted(batches, key=lambda b: -sum(len(enc[i].targets) for i in b)):
        tails = [len(enc[i].targets) for i in b]
        lg = tail_logits(model, [enc[i].ids for i in b], max(tails), scorer.pad_id)
        rows += [lg[j, lg.shape[1] - t:] for j, t in enumerate(tails)]
        tg += [x for i in b for x in enc[i].targets]
        if len(tg) >= 256: break
    rows, tg = torch.cat(rows), torch.tensor(tg, device=device)
    sync(device); t = time.perf_counter(); loop = reference_rank_token_scores(rows, tg); sync(device); s1 = time.perf_counter() - t
    sync(device); t = time.perf_counter(); vec = rank_token_scores(rows, tg); sync(device); s2 = time.perf_counter() - t
    sdiff = (torch.tensor(loop, device=vec.device) - vec).abs().max().item()
    print(f"scoring only, {len(tg)} response tokens, the same logits: per-token loop {s1:.2f} s, vectorised {s2:.3f} s, "
          f"{s1 / s2:.1f}x, max diff {sdiff:.1e}")
    if a.scoring_only:
        return

    print(f"(1) reference loop (unpadded forward + per-token full sort): {t1:8.2f} s")
    print(f"(2) compeffdist (batched, vectorised):                       {t2:8.2f} s")
    print(f"(3) bare batched forward pass (same batches):                {t3:8.2f} s")
    print(f"speed-up (1)/(2) = {t1 / t2:.2f}x   [target >= 20]")
    print(f"overhead (2)/(3) = {t2 / t3:.3f}x   [target <= 1.3]")
    print(f"max |score(1) - score(2)| = {diff:.2e}   [target <= 1e-5]")


if __name__ == "__main__":
    main()
