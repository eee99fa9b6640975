"""The data-efficiency variants of the offline replication (issue 7, `nbs/20_replication.ipynb`).

Once `compeffdist run --config configs/replication.yaml` has scored the corpus (its difficulty stage), this script
evaluates the base student (and the pipeline's own difficulty-prioritised 50% student, if the run trained it),
samples the scored corpus again for every other variant, fine-tunes a student on each subset with the run's training
settings, evaluates it with the run's SentiBench protocol, and collects every result in one JSON file.

    python tools/replicate.py --config configs/replication.yaml --results results/replication.json

`--limit N` evaluates the students again with the first N test examples of each dataset (in `<eval>_limit<N>`
folders, reusing the predictions of the examples they share with the largest smaller limit already evaluated);
`--seeds` evaluates them with other evaluation seeds (other demonstrations drawn; the predictions of each seed are
kept beside the others'); `--only` picks variants. The variants need the run only up to its difficulty stage
(`compeffdist run --config ... --until difficulty`).

Each variant is resumable: a trained variant is not trained again, a finished evaluation not run again. Model weights stay in
`<run.out>/variants/` (not in the repository).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from compeffdist.core import CompeffdistError, load_config, read_json, read_jsonl, write_jsonl
from compeffdist.pipeline import STAGES
from compeffdist.sampling import sample_records
from compeffdist.sentibench import _slug, build_examples, resolve_datasets

# name: (method, group, rate, max optimizer steps or None for the config's epochs, seed). The pipeline's own student
# is the soft, per-instruction 50% variant. One epoch gives a subset fewer optimizer steps than the full corpus (2 at
# 10%, 20 for all 306 samples), so the `_20steps` variants train the same subsets for the full corpus's 20 steps.
# Seed k > 0 adds k to both the sampler's seed (another subset drawn) and the training seed (another data order).
VARIANTS = {  # in the order they run: the comparisons at 50% and 10% first
    "random_50": ("random", "instruction", 0.50, None, 0),
    "difficulty_10": ("soft", "instruction", 0.10, None, 0),
    "random_10": ("random", "instruction", 0.10, None, 0),
    "full": ("random", "instruction", 1.0, None, 0),
    "difficulty_25": ("soft", "instruction", 0.25, None, 0),
    "random_25": ("random", "instruction", 0.25, None, 0),
    "difficulty_10_20steps": ("soft", "instruction", 0.10, 20, 0),
    "random_10_20steps": ("random", "instruction", 0.10, 20, 0),
    "global_50": ("soft", "global", 0.50, None, 0),
    "difficulty_25_20steps": ("soft", "instruction", 0.25, 20, 0),
    "random_25_20steps": ("random", "instruction", 0.25, 20, 0),
} | {f"{name}_seed{k}": (method, "instruction", 0.10, 20, k)  # two more draws of the equal-step 10% pair
     for k in (1, 2) for name, method in (("difficulty_10_20steps", "soft"), ("random_10_20steps", "random"))} | {
    "full_seed1": ("random", "instruction", 1.0, None, 1)}  # the whole corpus again, in another training order
# The mean over the three draws of a variant (bootstrapped like one model: the average of its draws' scores).
DRAW_MEANS = {f"{name}_x3": [name, f"{name}_seed1", f"{name}_seed2"]
              for name in ("difficulty_10_20steps", "random_10_20steps")}


def cli(*args: str) -> None:
    "Run one `compeffdist` command in a fresh process (each frees its model's memory on exit)."
    cmd = [sys.executable, "-m", "compeffdist.cli", *args]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def eval_args(cfg, model: str, name: str, out: Path) -> list[str]:
    "The `compeffdist eval` arguments of the config's evaluation protocol (unset limits left out)."
    e = cfg.evaluation
    datasets = e.datasets if isinstance(e.datasets, str) else ",".join(e.datasets)
    args = ["eval", "--model", model, "--name", name, "--out", str(out), "--datasets", datasets,
            "--shots", str(e.shots), "--seeds", ",".join(map(str, e.seeds)), "--batch-size", str(e.batch_size),
            "--device", cfg.student.device, "--dtype", cfg.student.dtype]
    args += ["--limit", str(e.limit)] if e.limit is not None else []
    args += ["--max-chars", str(e.max_chars)] if e.max_chars is not None else []
    return args + (["--fixed"] if e.fixed else [])


def eval_dir(cfg, default_limit, default: Path) -> Path:
    "Where a model's evaluation goes: `default` under the config's own limit, `<default>_limit<N>` under another."
    n = cfg.evaluation.limit
    return default if n == default_limit else default.with_name(f"{default.name}_limit{n}")


def earlier_dir(cfg, default_limit, default: Path, name: str) -> Path:
    """The evaluation folder of model `name` with the most test examples below `cfg`'s limit (`default` itself, or a
    `<default>_limit<N>` one): its predictions are the ones a larger limit reuses."""
    limits = {default_limit: default} | {int(p.name.rsplit("_limit", 1)[1]): p
                                         for p in default.parent.glob(f"{default.name}_limit*")
                                         if p.name.rsplit("_limit", 1)[1].isdigit()}
    below = [n for n, p in limits.items() if n < cfg.evaluation.limit and (p / "predictions" / name).is_dir()]
    return limits[max(below)] if below else default


def finished(cfg, result: Path) -> bool:
    "Whether a results JSON holds every dataset and seed of `cfg`'s protocol (an interrupted evaluation does not)."
    if not result.exists():
        return False
    res, e = read_json(result), cfg.evaluation
    return res.get("protocol", {}).get("limit") == e.limit and all(
        str(s) in res["datasets"].get(d, {}).get("seeds", {}) for d in resolve_datasets(e.datasets) for s in e.seeds)


def evaluate(cfg, default_limit, model: str, name: str, default: Path) -> dict:
    """The results of `model` under `cfg`'s protocol (`<eval_dir>/<name>.json`), evaluated now if missing. The
    predictions of its largest earlier evaluation (`earlier_dir`, fewer test examples) are copied in first, so the
    prompts they share are not run again."""
    out = eval_dir(cfg, default_limit, default)
    result = out / f"{name}.json"
    if not finished(cfg, result):
        src, dst = earlier_dir(cfg, default_limit, default, name) / "predictions" / name, out / "predictions" / name
        if src.is_dir() and not dst.exists():
            shutil.copytree(src, dst)
        cli(*eval_args(cfg, model, name, out))
    return read_json(result)


def run_variant(cfg, default_limit, config_path: str, run_dir: Path, name: str, method: str, group: str, rate: float,
                max_steps: int | None, seed: int) -> tuple[dict, Path]:
    "Sample, train (unless trained) and evaluate (unless evaluated) one variant; its results and predictions folder."
    vdir = run_dir / "variants" / name
    if not (vdir / "model" / "card.json").exists():
        vdir.mkdir(parents=True, exist_ok=True)
        scored = read_jsonl(run_dir / "difficulty" / "scored.jsonl")
        kept = sample_records(scored, rate, method, group, cfg.sampling.a, cfg.sampling.seed + seed, cfg.sampling.key)
        write_jsonl(vdir / "kept.jsonl", kept)
        t0 = time.time()
        steps = ["--max-steps", str(max_steps)] if max_steps else []
        steps += ["--seed", str(cfg.training.seed + seed)] if seed else []
        cli("train", "--config", config_path, "--data", str(vdir / "kept.jsonl"), "--out", str(vdir / "model"), *steps)
        (vdir / "train_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
    res = evaluate(cfg, default_limit, str(vdir / "model"), name, vdir / "eval")
    out = eval_dir(cfg, default_limit, vdir / "eval")
    return ({"method": method, "group": group, "rate": rate, "seed": seed, "kept": len(read_jsonl(vdir / "kept.jsonl")),
             **train_card(vdir / "model"), "train_seconds": float((vdir / "train_seconds.txt").read_text()),
             **summary(res)}, out / "predictions" / name)


def train_card(model_dir: Path) -> dict:
    "Optimizer steps and final training loss of a trained student (from its model card)."
    card = read_json(model_dir / "card.json")
    return {"steps": card["steps"], "final_loss": round(card["final_loss"], 4)}


def summary(res: dict) -> dict:
    return {"mean": res["mean"], "family_means": res.get("family_means", {}),
            "datasets": {d: v["score"] for d, v in res["datasets"].items()}, "eval_seconds": res.get("seconds")}


# Paired comparisons reported with a bootstrap over test examples (the same resampled examples for every model).
PAIRS = [("full", "base_student"), ("difficulty_50", "base_student"), ("difficulty_10", "random_10"),
         ("difficulty_25", "random_25"), ("difficulty_50", "random_50"), ("difficulty_50", "global_50"),
         ("difficulty_10", "full"), ("difficulty_50", "full"), ("difficulty_10_20steps", "random_10_20steps"),
         ("difficulty_25_20steps", "random_25_20steps"), ("difficulty_10_20steps", "full"),
         ("difficulty_25_20steps", "full"), ("difficulty_10_20steps_seed1", "random_10_20steps_seed1"),
         ("difficulty_10_20steps_seed2", "random_10_20steps_seed2"),
         ("difficulty_10_20steps_x3", "random_10_20steps_x3"), ("difficulty_10_20steps_x3", "full"),
         ("full_seed1", "full"), ("full_seed1", "base_student"),
         # the random subsets against the full corpus too: is a subset's gap to it the sampler's, or the subset's?
         ("random_50", "full"), ("random_25_20steps", "full"), ("random_10_20steps_x3", "full")]


def macro_f1(gold: np.ndarray, pred: np.ndarray, n_labels: int) -> float:
    "Macro-F1 over the labels seen in gold or pred (sklearn's `f1_score(average='macro', zero_division=0)`)."
    tp = np.bincount(gold[gold == pred], minlength=n_labels)
    n_gold, n_pred = np.bincount(gold, minlength=n_labels), np.bincount(pred, minlength=n_labels)
    seen = (n_gold + n_pred) > 0
    f1 = np.divide(2 * tp, n_gold + n_pred, out=np.zeros(n_labels), where=seen)
    return float(f1[seen].mean())


def bootstrap(cfg, pred_dirs: dict[str, Path], reps: int = 2000, seed: int = 0) -> dict:
    """95% intervals of each model's SentiBench mean and of paired differences, resampling the test examples of
    every dataset (the same draw for all models and seeds)."""
    e = cfg.evaluation
    datasets = resolve_datasets(e.datasets)
    rng = np.random.default_rng(seed)
    means = {m: np.zeros(reps + 1) for m in pred_dirs}  # column 0: the full test set (the reported mean)
    for d in datasets:
        for s in e.seeds:
            gold = [x.gold for x in build_examples(d, e.shots, s, e.limit, e.max_chars, e.fixed)]
            preds = {m: [r["prediction"].strip().lower() for r in read_jsonl(p / f"{_slug(d)}.seed{s}.jsonl")]
                     for m, p in pred_dirs.items()}
            labels = {l: i for i, l in enumerate(sorted(set(gold).union(*map(set, preds.values()))))}
            g = np.array([labels[x] for x in gold])
            draws = [np.arange(len(g))] + [rng.integers(0, len(g), len(g)) for _ in range(reps)]
            for m, p in preds.items():
                p = np.array([labels[x] for x in p])
                means[m] += [100 * macro_f1(g[i], p[i], len(labels)) / (len(datasets) * len(e.seeds)) for i in draws]
    for group, members in DRAW_MEANS.items():
        if all(m in means for m in members):
            means[group] = sum(means[m] for m in members) / len(members)
    ci = lambda x: [round(float(v), 2) for v in np.percentile(x[1:], [2.5, 97.5])]
    out = {"reps": reps, "mean": {m: round(float(v[0]), 2) for m, v in means.items()},
           "ci95": {m: ci(v) for m, v in means.items()}, "differences": {}}
    for a, b in PAIRS:
        if a in means and b in means:
            diff = means[a] - means[b]
            out["differences"][f"{a} - {b}"] = {"mean": round(float(diff[0]), 2), "ci95": ci(diff),
                                                "p_le_0": round(float((diff[1:] <= 0).mean()), 3)}
    return out


def pipeline_summary(run_dir: Path) -> dict:
    "Per stage of the run: wall seconds, counts, drops by reason and teacher calls (from its manifest)."
    out = {}
    for stage in STAGES:
        if not (m := run_dir / stage.name / "manifest.json").is_file():
            continue
        man = read_json(m)
        st, t = man["stats"], man["stats"]["info"].get("teacher")
        out[man["stage"]] = {"seconds": round(man["seconds"], 1), "counts": st["counts"], "drops": st["drops"]}
        if t:
            out[man["stage"]]["teacher"] = {k: t[k] for k in ("misses", "hits", "completion_tokens", "seconds")}
    return out


def pass_config(config: str, limit: int | None = None, seeds: str | None = None):
    "The config of one evaluation pass: the config's protocol, with another test limit or other seeds if given."
    override = {"evaluation.limit": limit} if limit else {}
    if seeds:
        try:
            override["evaluation.seeds"] = [int(s) for s in seeds.split(",")]
        except ValueError:
            sys.exit(f"error: --seeds {seeds!r}: give comma-separated integers, e.g. 43,44")
    return load_config(config, override)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/replication.yaml")
    ap.add_argument("--results", default="results/replication.json")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--limit", type=int, help="evaluate with the first N test examples of each dataset instead of the "
                    "config's limit (in separate folders; the predictions already made are reused)")
    ap.add_argument("--seeds", help="comma-separated evaluation seeds instead of the config's")
    a = ap.parse_args(argv)
    cfg = pass_config(a.config, a.limit, a.seeds)
    default_limit = load_config(a.config).evaluation.limit
    run_dir = Path(cfg.run.out)
    ev0 = run_dir / "evaluation"
    if not (run_dir / "difficulty" / "scored.jsonl").exists():
        sys.exit(f"error: {run_dir}/difficulty/scored.jsonl missing: run `compeffdist run --config {a.config} "
                 "--until difficulty` first")
    names = [n for n in a.only.split(",") if n] or list(VARIANTS)
    if unknown := [n for n in names if n not in VARIANTS]:
        sys.exit(f"error: unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    ev = eval_dir(cfg, default_limit, ev0)
    base = evaluate(cfg, default_limit, cfg.student.model, "base_student", ev0)
    results = {"config": a.config, "protocol": base["protocol"],
               "corpus": len(read_jsonl(run_dir / "difficulty" / "scored.jsonl")),
               "pipeline": pipeline_summary(run_dir),
               "instructions": [{k: r.get(k) for k in ("id", "attribute", "task_name", "task_type")}
                                | {"instruction": r["instruction"][:200]}
                                for r in read_jsonl(run_dir / "instructions" / "instructions.jsonl")],
               "models": {"base_student": summary(base)}}
    pred_dirs = {"base_student": ev / "predictions" / "base_student"}
    if (run_dir / "training" / "model" / "card.json").exists():  # the pipeline's own student, when it was trained
        student = evaluate(cfg, default_limit, str(run_dir / "training" / "model"), "student", ev0)
        results["models"]["difficulty_50"] = {"method": cfg.sampling.method, "group": cfg.sampling.group,
                                              "rate": cfg.sampling.rate, "seed": 0,
                                              "kept": len(read_jsonl(run_dir / "sampling" / "kept.jsonl")),
                                              **train_card(run_dir / "training" / "model"), **summary(student)}
        pred_dirs["difficulty_50"] = ev / "predictions" / "student"
    out = Path(a.results)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # called after every variant, so the results file is whole: nothing finished is lost
        results["bootstrap"] = bootstrap(cfg, pred_dirs)
        for m, v in results["bootstrap"]["mean"].items():  # the rescored predictions give the reported means
            assert m in DRAW_MEANS or abs(v - results["models"][m]["mean"]) < 0.01, (m, v)
        out.write_text(json.dumps(results, indent=1) + "\n")

    save()
    for name in names:
        results["models"][name], pred_dirs[name] = run_variant(cfg, default_limit, a.config, run_dir, name,
                                                               *VARIANTS[name])
        print(f"{name}: mean {results['models'][name]['mean']:.2f}", flush=True)
        save()
    for k, v in results["bootstrap"]["differences"].items():
        print(f"{k}: {v['mean']:+.2f} (95% CI {v['ci95'][0]:+.2f} .. {v['ci95'][1]:+.2f})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CompeffdistError as e:  # bad input: one line and a non-zero exit
        sys.exit(f"error: {e}")
