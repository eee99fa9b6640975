"""Packed rows without a variable-length attention kernel against padded batches, on a CPU, in one run.

    python benchmarks/packing.py                                  # about 5 minutes on 2 cores
    python benchmarks/packing.py --samples 96 --max-length 1024 --hidden 256

Without FlashAttention, `train_student` does not pack (`packing_plan`): it trains on padded batches drawn by length.
This measures what that fallback avoids. Each row trains a random tiny Llama (`make_tiny_student`: the bundled
student's tokenizer, `--hidden` wide, 4 layers, float32, SDPA) for one epoch over the same `--samples` records of
the replication's scored corpus (real teacher answers with their real lengths), 8 rows per device batch:
  packed   TRL's packing as it runs without the fallback: best-fit-decreasing rows of `--max-length` tokens, the 8 rows
           of a batch flattened into one padding-free sequence, which SDPA attends over densely under a block mask
  padded   the fallback: one sample a row, padded to the batch's longest, batches drawn by length
Each row is a child process; time is `train_student`'s training time, tokens/s counts the records' real tokens, and
the peak is the process's peak resident memory during training above what it held before (`/proc/self/clear_refs`).
The mean training loss is printed beside it (per token in both; the batches differ, so the losses differ a little).
Prints; asserts nothing.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from memory import rss_kib  # benchmarks/memory.py: this script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("packed", "padded")


def one_row(a) -> dict:
    "Train once in this process (called in a child process by main)."
    import compeffdist.training as training
    from compeffdist.core import ModelConfig, TrainingConfig, read_jsonl
    records = [{"instruction": r["instruction"], "output": r["output"]} for r in read_jsonl(a.records)][:a.samples]
    if a.one == "packed":  # what training did before the fallback: pack whatever the attention kernel
        training.varlen_attention = lambda attn: True
    cfg = TrainingConfig(epochs=1, per_device_batch_size=8, gradient_accumulation_steps=1, max_length=a.max_length,
                         packing=True, gradient_checkpointing=False, learning_rate=1e-4, logging_steps=1, bf16=False)
    with tempfile.TemporaryDirectory() as tmp:
        Path("/proc/self/clear_refs").write_text("5")
        before = rss_kib("VmRSS")
        card = training.train_student(a.model, records, os.path.join(tmp, "model"), cfg,
                                      ModelConfig(model=a.model, device="cpu", dtype="float32"), progress=False)
        peak = rss_kib("VmHWM")
    return {"row": a.one, "packing": card["packing"]["used"], "steps": card["steps"], "seconds": card["seconds"],
            "tokens": card["data"]["tokens"], "train_loss": card["train_loss"], "peak_gib": (peak - before) / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", default=str(ROOT / "results" / "replication" / "scored.jsonl"))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--one", choices=ROWS, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.one:
        print(json.dumps(one_row(a)))
        return 0
    from compeffdist.pipeline import make_tiny_student
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_tiny_student(Path(tmp) / "tiny", hidden=a.hidden, layers=4))
        for row in ROWS:
            cmd = [sys.executable, __file__, "--one", row, "--model", model, "--records", a.records,
                   "--samples", str(a.samples), "--max-length", str(a.max_length)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{row}: child failed\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"tiny Llama (hidden {a.hidden}, 4 layers, float32, SDPA) on {os.cpu_count()} CPU cores; one epoch over "
          f"{a.samples} replication samples ({results[0]['tokens']:,} tokens), 8 rows a batch, max_length {a.max_length}")
    print(f"{'row':<8}{'steps':>6}{'seconds':>9}{'tokens/s':>10}{'peak GiB':>10}{'loss':>8}")
    for r in results:
        print(f"{r['row']:<8}{r['steps']:>6}{r['seconds']:>9.1f}{r['tokens'] / r['seconds']:>10,.0f}"
              f"{r['peak_gib']:>10.2f}{r['train_loss']:>8.3f}")
    p, q = results
    print(f"padded batches: {p['seconds'] / q['seconds']:.2f}x the speed of packed rows without a varlen kernel, "
          f"{q['peak_gib'] / p['peak_gib']:.2f}x their peak memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
