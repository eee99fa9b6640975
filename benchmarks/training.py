"""Student training throughput on a CPU: float32 against bf16 mixed precision, random batches against
length-grouped ones, in one run.

    python benchmarks/training.py                                        # the demo run's scored samples
    python benchmarks/training.py --records R.jsonl --samples 64 --config configs/replication.yaml

Each row fine-tunes the config's student for one epoch over the same `--samples` records (`instruction`/`output`
JSON lines: a run's responses or kept samples), with the config's training section (batch size, accumulation,
max_length, learning rate) and one change: `bf16` (mixed precision: float32 weights, bf16 matmuls through
autocast) and/or `group_by_length` (batches drawn from groups of samples of similar length, so less padding).
Each row is a separate process, started one after the other on an otherwise idle machine; its time is
`train_student`'s training time (model loading and saving excluded). tokens/s counts the real tokens of the
records (prompt and answer, no padding). The mean training loss is printed beside it, so that a speed-up is not
bought with a broken run (length grouping changes the order of the batches, so its loss differs a little).
Prints; asserts nothing.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

ROWS = [("float32", False, False), ("float32, grouped", False, True), ("bf16", True, False), ("bf16, grouped", True, True)]


def one_row(a) -> dict:
    "Train once in this process (called in a child process by main)."
    from compeffdist.core import load_config, read_jsonl
    from compeffdist.training import train_student
    cfg = load_config(a.config)
    records = read_jsonl(a.records)[:a.samples]
    if len(records) < a.samples:
        raise SystemExit(f"{a.records} has {len(records)} records, fewer than --samples {a.samples}")
    bf16, group = ROWS[a.one][1:]
    tc = cfg.training.model_copy(update={"epochs": 1, "max_steps": -1, "bf16": bf16, "group_by_length": group or None,
                                         "logging_steps": 1})
    with tempfile.TemporaryDirectory() as tmp:
        card = train_student(cfg.student.model, records, os.path.join(tmp, "model"), tc, cfg.student, progress=False)
    return {"seconds": card["seconds"], "steps": card["steps"], "tokens": card["data"]["tokens"],
            "samples": card["data"]["trained_samples"], "train_loss": card["train_loss"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", default="tests/fixtures/demo_run/difficulty/scored.jsonl")
    ap.add_argument("--config", default="configs/demo.yaml", help="student and training settings")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one row, print it as JSON
    a = ap.parse_args()
    if a.one is not None:
        print(json.dumps(one_row(a)))
        return
    print(f"{a.samples} records of {a.records}, student and training settings of {a.config}, one epoch; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
    rows = []
    for k, (name, *_rest) in enumerate(ROWS):
        args = [sys.executable, __file__, "--records", a.records, "--config", a.config, "--samples", str(a.samples),
                "--one", str(k)]
        out = subprocess.run(args, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"row {name} failed:\n{out.stderr[-2000:]}")
        row = {"name": name, **json.loads(out.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(f"  {name:<17} {row['seconds']:7.1f}s  {row['tokens'] / row['seconds']:6.1f} tokens/s  "
              f"loss {row['train_loss']:.4f}", flush=True)
    base = rows[0]
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end\n")
    print(f"{'row':<18}{'samples':>8}{'steps':>6}{'tokens':>8}{'seconds':>9}{'samples/s':>10}{'tokens/s':>9}"
          f"{'x float32':>10}{'mean loss':>10}")
    for r in rows:
        print(f"{r['name']:<18}{r['samples']:>8}{r['steps']:>6}{r['tokens']:>8}{r['seconds']:>9.1f}"
              f"{r['samples'] / r['seconds']:>10.2f}{r['tokens'] / r['seconds']:>9.1f}"
              f"{base['seconds'] / r['seconds']:>10.2f}{r['train_loss']:>10.4f}")


if __name__ == "__main__":
    main()
