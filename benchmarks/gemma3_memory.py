"""Peak memory of a Gemma-3 training step's loss on CPU, with the real vocabulary: the full logits (the model's own
loss, as transformers computes it: the bf16 logits of every position, upcast to float32 for the cross-entropy)
against TRL's fused LM head (what `SFTTrainer.compute_loss` runs in the pinned TRL 1.16: `add_fused_lm_head`,
log-probabilities computed in tiles of 4,096 tokens x 32,768 vocabulary entries, the logits never whole), in one run.

    python benchmarks/gemma3_memory.py                  # about 10 minutes on 2 cores
    python benchmarks/gemma3_memory.py --tokens 1024 2048 --fused-tokens 2048 8192 16384

The model is a shrunken Gemma-3 (`make_tiny_gemma3`: the real architecture and its 262,208-row embedding and tied
output layer, hidden size 64, 6 layers) in bf16 (the GPU training dtype), fully trainable, with activation
checkpointing, so that what the step allocates is mostly the loss's own memory: the logits' share. Each row is a
child process that loads the model, builds one packed row of N tokens (every position labelled, as packed
completion tokens), resets its peak resident memory (`/proc/self/clear_refs`), runs one forward and backward
pass, and reports the peak above what it held before the step. The logits' memory grows with tokens x vocabulary
and does not depend on the hidden size, so its per-token cost measured here is the 4B student's; the fused head's
fixed buffers do depend on it (a float32 gradient of the output layer, vocabulary x hidden). Prints; asserts nothing.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memory import rss_kib  # benchmarks/memory.py: this script's folder is on sys.path

GIB = 2 ** 30


def one_row(a) -> dict:
    "Run one step in this process (called in a child process by main); returns the measurement."
    import gc
    import torch
    from trl.trainer.utils import add_fused_lm_head
    from compeffdist.models import load_text_lm
    torch.manual_seed(0)
    model = load_text_lm(a.model, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model.train()
    if a.path == "fused":
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
    vocab = model.config.vocab_size
    ids = torch.randint(0, 262_000, (1, a.tokens))
    pos = torch.arange(a.tokens)[None]
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current size
    before = rss_kib("VmRSS")
    t = time.perf_counter()
    if a.path == "fused":
        out = model(input_ids=ids, position_ids=pos, labels=ids, fused_lm_head=True)
        loss = -out.log_probs.sum() / out.label_mask.sum()
    else:
        loss = model(input_ids=ids, position_ids=pos, labels=ids).loss
    loss.backward()
    seconds = time.perf_counter() - t
    peak = rss_kib("VmHWM")
    return {"path": a.path, "tokens": a.tokens, "vocab": vocab, "hidden": model.config.hidden_size,
            "peak_gib": (peak - before) * 1024 / GIB, "seconds": seconds, "loss": loss.item()}


def run_child(model: str, path: str, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--one", path, "--model", model, "--tokens", str(tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{path} {tokens}: child failed\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048], help="full-logits rows (tokens)")
    ap.add_argument("--fused-tokens", type=int, nargs="+", default=[2048, 16384], help="fused-head rows (tokens)")
    ap.add_argument("--paper-tokens", type=int, default=8 * 2048, help="tokens of one device step in the paper config")
    ap.add_argument("--one", choices=["full", "fused"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.one:
        a.tokens = a.tokens[0]
        a.path = a.one
        print(json.dumps(one_row(a)))
        return 0
    from compeffdist.models import make_tiny_gemma3
    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_tiny_gemma3(Path(tmp) / "gemma3"))
        rows = [run_child(model, "full", n) for n in a.tokens] + [run_child(model, "fused", n) for n in a.fused_tokens]
    v, h = rows[0]["vocab"], rows[0]["hidden"]
    print(f"shrunken Gemma-3 in bf16: vocabulary {v:,} (output layer rows), hidden {h}; one forward + backward; "
          f"peak resident memory above the memory held before the step")
    print(f"{'loss':<12}{'tokens':>8}{'peak GiB':>10}{'bytes/token':>13}{'seconds':>9}{'loss':>9}")
    for r in rows:
        print(f"{r['path']:<12}{r['tokens']:>8}{r['peak_gib']:>10.2f}{r['peak_gib'] * GIB / r['tokens']:>13,.0f}"
              f"{r['seconds']:>9.1f}{r['loss']:>9.3f}")
    full = [r for r in rows if r["path"] == "full"]
    fused = [r for r in rows if r["path"] == "fused"]
    both = sorted({r["tokens"] for r in full} & {r["tokens"] for r in fused})
    for n in both:
        f1 = next(r for r in full if r["tokens"] == n)["peak_gib"]
        f2 = next(r for r in fused if r["tokens"] == n)["peak_gib"]
        print(f"at {n} tokens: full logits {f1:.2f} GiB / fused head {f2:.2f} GiB = {f1 / f2:.1f}x")
    if len(full) >= 2:
        (n1, p1), (n2, p2) = [(r["tokens"], r["peak_gib"]) for r in (full[0], full[-1])]
        slope = (p2 - p1) * GIB / (n2 - n1)
        print(f"full logits: {slope:,.0f} bytes per token between {n1} and {n2} tokens = {slope / v:.1f} bytes per token "
              f"and vocabulary entry; on the line through these two points, one device step of {a.paper_tokens:,} "
              f"tokens needs {(p1 + (a.paper_tokens - n1) * slope / GIB):.1f} GiB for its loss")
    if len(fused) >= 2:
        (n1, p1), (n2, p2) = [(r["tokens"], r["peak_gib"]) for r in (fused[0], fused[-1])]
        print(f"fused head: {p1:.2f} GiB at {n1} tokens, {p2:.2f} GiB at {n2} tokens ({p2 / p1:.2f}x for "
              f"{n2 / n1:.0f}x the tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
