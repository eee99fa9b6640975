"""The offline replication's experiments (`nbs/20_replication.ipynb`) on the corpus of `configs/replication.yaml`.

Everything it measures accumulates in `results/replication/` (committed): the teacher's calls, the corpus summary,
the scored corpus, the sweep table, what each training did (`trainings.json`), every evaluation's predictions and
`summary.json`.
Model weights stay in `<run.out>/variants/`; a student is retrained to the same weights from the committed corpus on
the same machine.

    python tools/replicate.py corpus                     # the corpus summary (stages, counts, teacher time per stage)
                                                         # and, once scored, the corpus itself (scored.jsonl)
    python tools/replicate.py sweep                      # settings on validation (first 100 examples, seed 42),
                                                         # trained on 1,000 samples of the corpus: learning rate,
                                                         # then epochs, then length cap
    python tools/replicate.py variants --only full,difficulty_10,random_10 --seeds 42,52,62   # students on test
    python tools/replicate.py variants --config configs/replication-paper.yaml --only full,difficulty_10,random_10 \
        --settings-from results/replication              # v3's students with the settings v2's sweep chose
    python tools/replicate.py variants --only base_student --seeds 42   # the untrained student alone, on test
    python tools/replicate.py variants --only difficulty_50,random_50 --device cuda   # students on a GPU
    python tools/replicate.py ceiling --device cuda     # the student taught the benchmark itself (train splits, in
                                                         # the evaluation's prompt format): settings on validation,
                                                         # then test; a reference row, not a method variant
    python tools/replicate.py teacher --datasets sc/sst2  # the teacher on test, a dataset at a time
    python tools/replicate.py reuse --config configs/replication-paper.yaml --from results/replication
                                                         # the base student's and the teacher's evaluations of
                                                         # another replication (same weights, same protocol)
    python tools/replicate.py summary                    # results/replication/summary.json from the predictions
                                                         # (and summary.val.json: the sweep against the base student)
    python tools/replicate.py summary --config configs/replication-paper.yaml --against results/replication
                                                         # v3's summary, each model paired with v2's namesake

The corpus itself is built (in slices, each committed) by
`compeffdist run --config configs/replication.yaml --until difficulty --max-minutes 60`.
Every step is resumable: a trained student is not trained again, a killed training resumes from its newest
checkpoint (`training.save_steps`), a seed already scored with the same weights is not scored again, and an
evaluation with more seeds or examples reuses the predictions already made. A model is known by the content of its
weights (`compeffdist.models`): a student trained again into its folder to other weights is scored again.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from compeffdist.attributes import attributes_request
from compeffdist.core import CompeffdistError, load_config, read_json, read_jsonl, write_json, write_jsonl
from compeffdist.models import resolve_model
from compeffdist.pipeline import STAGES
from compeffdist.sampling import sample_records
from compeffdist.sentibench import (benchmark_train_records, build_examples, prediction_path, resolve_datasets,
                                    result_path)
from compeffdist.training import data_hash

RESULTS = Path("results/replication")  # the results folder of the config in use (`use_results`)
SCORED = RESULTS / "scored.jsonl"  # the scored corpus, which the sweep and the variants train on (committed)


def use_results(cfg) -> Path:
    """Work in the results folder of `cfg`: the folder of its committed call cache (`run.calls_jsonl`), so that each
    replication (`configs/replication.yaml`, `configs/replication-paper.yaml`) keeps its own results."""
    global RESULTS, SCORED
    if cfg.run.calls_jsonl:
        RESULTS = Path(cfg.run.calls_jsonl).parent
        SCORED = RESULTS / "scored.jsonl"
    return RESULTS
VAL = {"split": "val", "limit": 100, "seeds": [42]}  # where settings are chosen
# Sampled variants: (method, rate). `full` is every sample of the (length-capped) corpus.
VARIANTS = {"full": ("random", 1.0)} | {f"{m}_{int(100 * r)}": ("soft" if m == "difficulty" else "random", r)
                                        for r in (0.10, 0.25, 0.50) for m in ("difficulty", "random")}
CURVE = (300, 1000)  # the learning curve: random subsets of the corpus of these sizes, besides `full`
# The sweep is a coordinate search in this order: the learning rates at the first epoch count and cap, then the epoch
# counts at the best learning rate, then the caps at the best of both (5 trainings instead of the grid's 12).
SWEEP = {"learning_rate": (5e-5, 2e-4, 5e-4), "epochs": (1, 2), "cap": (384, 256)}
# The sweep trains on a fixed random subset of the corpus: one epoch of the whole corpus takes most of a sitting on
# the 2-core CPU, and a student must be trained and scored in the same sitting (its weights are not kept).
SWEEP_SAMPLES = 1000
PAIRS = [("full", "base_student"), ("difficulty_10", "base_student"), ("random_10", "base_student"),
         ("difficulty_10", "random_10"), ("difficulty_25", "random_25"),
         ("difficulty_50", "random_50"), ("difficulty_10", "full"), ("difficulty_50", "full"), ("teacher", "full"),
         ("full", "full_1000"), ("full", "full_300"), ("ceiling", "base_student"), ("ceiling", "full")]


def cli(*args: str) -> None:
    "Run one `compeffdist` command in a fresh process (each frees its model's memory on exit)."
    cmd = [sys.executable, "-m", "compeffdist.cli", *args]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


# --- the corpus -----------------------------------------------------------------------------------------------------

def corpus_summary(cfg) -> dict:
    "Per finished stage of the run: wall seconds, counts, drops by reason and teacher calls (from its manifest)."
    run, out = Path(cfg.run.out), {}
    for stage in STAGES:
        if (m := run / stage.name / "manifest.json").is_file():
            man = read_json(m)
            st, t = man["stats"], man["stats"]["info"].get("teacher")
            out[stage.name] = {"seconds": round(man["seconds"], 1), "counts": st["counts"], "drops": st["drops"]}
            if t:
                out[stage.name]["teacher"] = {k: t[k] for k in ("misses", "hits", "completion_tokens", "seconds")}
    return out


def teacher_time(cfg, max_gap: float = 600.0) -> dict:
    """Teacher calls and hours per stage over every sitting, from the call cache's timestamps (`run.calls_jsonl`):
    the gap before each call counts to that call's stage, gaps over `max_gap` seconds (between sittings) do not. A
    call is a response if its prompt is one of the pairing's samples (`superseded` when made with another decoding
    than the config's, as with an earlier cap), an enumeration if its prompt is one the attributes stage asks, else
    an instructions call."""
    run = Path(cfg.run.out)
    if not (run / "pairing" / "samples.jsonl").is_file() or not Path(cfg.run.calls_jsonl).is_file():
        return {}  # the stages that tell the calls apart have not run yet
    rows = sorted((r for r in read_jsonl(cfg.run.calls_jsonl) if not r["model"].startswith("embedder:")),
                  key=lambda r: r["created"])
    pairs = {s["instruction"] for s in read_jsonl(run / "pairing" / "samples.jsonl")}
    enumerations = {attributes_request(t["text"], cfg.attributes)[-1]["content"]
                    for t in read_jsonl(run / "texts" / "texts.jsonl")[:cfg.attributes.n_texts]}
    decoding = cfg.responses.decoding

    def stage(r) -> str:
        prompt, params = r["request"]["messages"][-1]["content"], r["request"]["params"]
        if prompt in pairs:
            same = all(params[k] == getattr(decoding, k) for k in ("temperature", "max_new_tokens"))
            return "responses" if same else "responses (superseded)"
        return "attributes" if prompt in enumerations else "instructions"

    out: dict = {}
    for prev, r in zip([None] + rows[:-1], rows):
        entry = out.setdefault(stage(r), {"calls": 0, "hours": 0.0})
        entry["calls"] += 1
        if prev is not None and r["created"] - prev["created"] <= max_gap:
            entry["hours"] += (r["created"] - prev["created"]) / 3600
    return {k: {"calls": v["calls"], "hours": round(v["hours"], 2)} for k, v in out.items()}


def teacher_tokens(records: list[dict], cfg) -> list[int]:
    "Length of each response in teacher tokens (the unit of the response length cap)."
    from llama_cpp import Llama
    vocab = Llama(resolve_model(cfg.teacher.model).location, vocab_only=True, verbose=False)
    return [len(vocab.tokenize(r["output"].encode(), add_bos=False, special=False)) for r in records]


def capped_corpus(cfg, cap: int) -> list[dict]:
    """The scored corpus as if the teacher had been cut at `cap` new tokens: greedy decoding gives the same first
    tokens whatever the cap, so the responses longer than `cap` are the ones a smaller cap would have cut (and the
    responses stage would have dropped as truncated)."""
    scored = read_jsonl(SCORED)
    return [r for r, n in zip(scored, teacher_tokens(scored, cfg)) if n <= cap]


def keep_scored_corpus(cfg) -> int:
    """Copy the run's scored corpus (every response with its difficulty) into results/replication: a fresh clone then
    trains the sweep and the variants without repeating the warm-up and the scoring."""
    return write_jsonl(SCORED, read_jsonl(Path(cfg.run.out) / "difficulty" / "scored.jsonl"))


# --- training and evaluation ----------------------------------------------------------------------------------------

def trained_before(cfg, records: list[dict], settings: dict) -> Path | None:
    """A student of `<run.out>/variants` already trained on the same samples with the same training settings (under
    another name: a learning-curve subset can repeat the sweep's chosen point), else None."""
    h = data_hash(records)
    for card in sorted(Path(cfg.run.out).glob("variants/*/model/card.json")):
        c = read_json(card)
        if c["data"]["hash"] == h and c["config"] == settings:
            return card.parent
    return None


def train(cfg, config_path: str, name: str, records: list[dict], lr: float, epochs: float, seed: int = 0,
          chosen_in: str | None = None, max_length: int | None = None) -> Path:
    """Fine-tune the student on `records` (unless already trained, under this name or another); its folder under
    `<run.out>/variants/<name>`. `chosen_in`: the sweep that chose the settings, recorded with the training;
    `max_length`: another length cap than the config's `training.max_length`."""
    vdir = Path(cfg.run.out) / "variants" / name
    settings = {**cfg.training.model_dump(mode="json"), "learning_rate": lr, "epochs": epochs,
                "seed": cfg.training.seed + seed} | ({"max_length": max_length} if max_length else {})
    model = vdir / "model" if (vdir / "model" / "card.json").is_file() else trained_before(cfg, records, settings)
    if model is None:
        vdir.mkdir(parents=True, exist_ok=True)
        write_jsonl(vdir / "kept.jsonl", records)
        cli("train", "--config", config_path, "--data", str(vdir / "kept.jsonl"), "--out", str(vdir / "model"),
            "--lr", str(lr), "--epochs", str(epochs), "--seed", str(settings["seed"]), "--device", cfg.student.device,
            "--max-length", str(settings["max_length"]))
        model = vdir / "model"
    elif model != vdir / "model":
        print(f"{name}: the student of {model.parent.name} (same samples, same settings)", flush=True)
    record_training(name, model, chosen_in)
    return model


def record_training(name: str, model: Path, chosen_in: str | None = None) -> None:
    "Keep what a training did in results/replication/trainings.json (committed; the weights are not)."
    path, card = RESULTS / "trainings.json", read_json(model / "card.json")
    done = read_json(path) if path.is_file() else {}
    done[name] = {"samples": card["data"]["trained_samples"], "data_hash": card["data"]["hash"],
                  "learning_rate": card["config"]["learning_rate"], "epochs": card["config"]["epochs"],
                  "steps": card["steps"], "final_loss": card["final_loss"], "seconds": card["seconds"],
                  "resumed_from_step": card.get("resumed_from_step", 0), "bf16": card["bf16"],
                  "device": card["device"]} | ({"settings_chosen_in": chosen_in} if chosen_in else {})
    write_json(path, dict(sorted(done.items())))


def evaluate(cfg, model: str, name: str, split: str, limit: int, seeds: list[int], engine: str = "hf",
             datasets: list[str] | None = None) -> dict:
    """Evaluate `model` with the config's protocol on `split` into results/replication/evals/<split> (resumable):
    the eval command runs for the seeds not yet scored with these weights (the result's model identity is the
    content of the weights), and for every seed when the weights or the number of examples changed."""
    e, out = cfg.evaluation, RESULTS / "evals" / split
    names = datasets or resolve_datasets(e.datasets)
    res_path = result_path(out, name, split)
    res = read_json(res_path) if res_path.is_file() else {}
    same = res.get("identity") == resolve_model(model).identity and res.get("protocol", {}).get("limit") == limit
    todo = [s for s in seeds if not same or any(str(s) not in res["datasets"].get(d, {}).get("seeds", {})
                                                for d in names)]
    if todo:
        args = ["eval", "--model", model, "--name", name, "--out", str(out), "--split", split, "--engine", engine,
                "--datasets", ",".join(names), "--shots", str(e.shots), "--seeds", ",".join(map(str, todo)),
                "--limit", str(limit), "--batch-size", str(e.batch_size or cfg.student.batch_size)]
        args += ["--max-chars", str(e.max_chars)] if e.max_chars is not None else []
        args += ["--device", cfg.student.device, "--dtype", cfg.student.dtype] if engine == "hf" else ["--threads", "2"]
        cli(*args)
    return read_json(res_path)


def train_settings(source: Path | None = None) -> dict:
    """The settings the variants train with: the best on validation of this replication's sweep (`sweep.json`), or
    of another replication's (`source`; v3 trains with the settings v2's sweep chose, so that the two differ in their
    corpus only). `chosen_in` says which sweep chose them."""
    sweep = (source or RESULTS) / "sweep.json"
    if not sweep.is_file():
        raise CompeffdistError(f"{sweep} is missing: run `python tools/replicate.py sweep` first, or train with "
                               "another replication's settings (--settings-from)")
    return read_json(sweep)["chosen"] | {"chosen_in": str(sweep)}


# --- the sweep ------------------------------------------------------------------------------------------------------

def sweep(cfg, config_path: str, grid: dict = SWEEP, point=None, name: str = "sweep.json") -> dict:
    """Choose the training settings on validation by a coordinate search over `grid`: one axis at a time, in the
    grid's order, each value tried with the other axes at the best setting so far (their first values at the start).
    `point(setting)` trains and scores one setting (default `sweep_point`); settings already in `name` (under
    results/replication) are reused."""
    point = point or (lambda setting: sweep_point(cfg, config_path, setting))
    path = RESULTS / name
    rows = read_json(path)["rows"] if path.is_file() else []
    current = {axis: values[0] for axis, values in grid.items()}
    for axis, values in grid.items():
        for v in values:
            setting = {**current, axis: v}
            if not any(all(r[k] == setting[k] for k in grid) for r in rows):
                rows.append(point(setting))
                write_json(path, {"protocol": VAL, "design": "coordinate search", "train_samples": SWEEP_SAMPLES,
                              "grid": grid, "rows": rows,
                                  "chosen": best(rows, grid)})
        current = best(rows, grid)
    return read_json(path)


def sweep_name(setting: dict) -> str:
    return f"sweep_lr{setting['learning_rate']:g}_ep{setting['epochs']:g}_cap{setting['cap']}"


def sweep_records(cfg, cap: int) -> list[dict]:
    """The sweep's training samples: a fixed random subset of `SWEEP_SAMPLES` of the scored corpus, less the answers
    longer than `cap` teacher tokens (so a smaller cap trains on a subset of the same samples)."""
    s, corpus = cfg.sampling, read_jsonl(SCORED)
    subset = sample_records(corpus, min(1.0, SWEEP_SAMPLES / len(corpus)), "random", "global", s.a, s.seed, s.key)
    return [r for r, n in zip(subset, teacher_tokens(subset, cfg)) if n <= cap]


def sweep_point(cfg, config_path: str, setting: dict) -> dict:
    "Train the sweep's samples (cut at the setting's cap) with the setting, and score on validation: one sweep row."
    records, name = sweep_records(cfg, setting["cap"]), sweep_name(setting)
    model = train(cfg, config_path, name, records, setting["learning_rate"], setting["epochs"])
    res, card = evaluate(cfg, str(model), name, **VAL), read_json(model / "card.json")
    print(f"{name}: val mean {res['mean']:.2f}", flush=True)
    return {"name": name, **setting, "samples": len(records), "steps": card["steps"],
            "final_loss": round(card["final_loss"], 4), "train_seconds": card["seconds"], "bf16": card["bf16"],
            "val_mean": round(res["mean"], 2)}


def best(rows: list[dict], grid: dict = SWEEP) -> dict:
    "The setting (the grid's axes) with the best validation mean (ties: fewer epochs, then the smaller learning rate)."
    top = max(rows, key=lambda r: (r["val_mean"], -r["epochs"], -r["learning_rate"]))
    return {k: top[k] for k in grid}


# --- variants -------------------------------------------------------------------------------------------------------

def variant_records(cfg, name: str, corpus: list[dict], seed: int = 0) -> list[dict]:
    "The training samples of variant `name` (a sampled share, or a learning-curve subset `full_<n>`)."
    s = cfg.sampling
    if name.startswith("full_"):
        n = int(name.split("_")[1])
        return sample_records(corpus, n / len(corpus), "random", "global", s.a, s.seed + seed, s.key)
    method, rate = VARIANTS[name]
    return sample_records(corpus, rate, method, s.group, s.a, s.seed + seed, s.key)


def run_variants(cfg, config_path: str, names: list[str], seeds: list[int], settings_from: Path | None = None) -> None:
    tuned = train_settings(settings_from)
    corpus = capped_corpus(cfg, tuned["cap"])
    evaluate(cfg, cfg.student.model, "base_student", "test", cfg.evaluation.limit, seeds)
    for name in (n for n in names if n != "base_student"):  # the base student is scored above, untrained
        records = corpus if name == "full" else variant_records(cfg, name, corpus)
        model = train(cfg, config_path, name, records, tuned["learning_rate"], tuned["epochs"],
                      chosen_in=tuned.get("chosen_in"))
        res = evaluate(cfg, str(model), name, "test", cfg.evaluation.limit, seeds)
        print(f"{name}: test mean {res['mean']:.2f} (seeds {','.join(map(str, seeds))})", flush=True)


# --- the ceiling -----------------------------------------------------------------------------------------------------
# A reference row, not a method variant: the base student fine-tuned on the benchmark's own train splits, written in
# the evaluation's prompt format, about as many samples as the full corpus (an equal share from each dataset). Its
# settings are chosen on validation as the corpus's are (on 1,000 of its samples), then it is scored on test.
CEILING_SAMPLES = 3000
# The evaluation's 4-shot prompts are long (texts cut to 1,200 characters each): up to about 1,530 student tokens. At
# the corpus's `training.max_length` (768) every imdb prompt and half of yelp2's would be dropped as too long, so the
# ceiling trains with a cap that holds them all.
CEILING_MAX_LENGTH = 2048
CEILING_GRID = {"learning_rate": SWEEP["learning_rate"], "epochs": SWEEP["epochs"]}


def ceiling_records(cfg, n: int = CEILING_SAMPLES) -> list[dict]:
    "`n` SentiBench train examples (n / datasets from each evaluated dataset) as training records, shuffled."
    e, rng = cfg.evaluation, np.random.default_rng(cfg.run.seed)
    names = resolve_datasets(e.datasets)
    recs = [r for d in names for r in benchmark_train_records(d, n // len(names), e.shots, cfg.run.seed, e.max_chars)]
    return [recs[i] for i in rng.permutation(len(recs))]


def ceiling_point(cfg, config_path: str, setting: dict) -> dict:
    "Train the ceiling's sweep samples with `setting` and score on validation: one row of ceiling_sweep.json."
    name = f"ceiling_lr{setting['learning_rate']:g}_ep{setting['epochs']:g}"
    records = ceiling_records(cfg, SWEEP_SAMPLES)
    model = train(cfg, config_path, name, records, setting["learning_rate"], setting["epochs"],
                  max_length=CEILING_MAX_LENGTH)
    res, card = evaluate(cfg, str(model), name, **VAL), read_json(model / "card.json")
    print(f"{name}: val mean {res['mean']:.2f}", flush=True)
    return {"name": name, **setting, "samples": len(records), "steps": card["steps"],
            "final_loss": round(card["final_loss"], 4), "train_seconds": card["seconds"], "val_mean": round(res["mean"], 2)}


def run_ceiling(cfg, config_path: str, seeds: list[int]) -> dict:
    "The ceiling: its settings chosen on validation, then trained on `CEILING_SAMPLES` and scored on test."
    chosen = sweep(cfg, config_path, CEILING_GRID, lambda s: ceiling_point(cfg, config_path, s),
                   "ceiling_sweep.json")["chosen"]
    model = train(cfg, config_path, "ceiling", ceiling_records(cfg), chosen["learning_rate"], chosen["epochs"],
                  chosen_in=str(RESULTS / "ceiling_sweep.json"), max_length=CEILING_MAX_LENGTH)
    res = evaluate(cfg, str(model), "ceiling", "test", cfg.evaluation.limit, seeds)
    print(f"ceiling: test mean {res['mean']:.2f} (seeds {','.join(map(str, seeds))})", flush=True)
    return res


# --- summary --------------------------------------------------------------------------------------------------------

REUSABLE = {"base_student": "student", "teacher": "teacher"}  # rows a corpus does not change, and their config section


def reuse(cfg, source: Path, names: list[str], split: str = "test") -> list[str]:
    """Copy the evaluations `names` (of `REUSABLE`) from another replication's results folder `source` into this
    config's, when they scored the same weights (by content) with this config's protocol on every dataset it
    evaluates: the untrained student and the teacher do not depend on the corpus, so v3 need not score them again.
    The copies keep the source's results and predictions byte for byte; this folder's summary then stands alone."""
    e = cfg.evaluation
    out = RESULTS / "evals" / split
    for name in names:
        src = result_path(source / "evals" / split, name, split)
        if name not in REUSABLE:
            raise CompeffdistError(f"{name} depends on the corpus; reusable: {', '.join(REUSABLE)}")
        if not src.is_file():
            raise CompeffdistError(f"{src} missing: no evaluation of {name} to reuse")
        res, model = read_json(src), getattr(cfg, REUSABLE[name]).model
        if res["identity"] != (identity := resolve_model(model).identity):
            raise CompeffdistError(f"{src} scored {res['identity']}; this config's {name} is {identity}")
        same_protocol(cfg, res, src, split)
        if missing := sorted(set(resolve_datasets(e.datasets)) - set(res["datasets"])):
            raise CompeffdistError(f"{src} has no scores on {', '.join(missing)}")
        for d, entry in res["datasets"].items():
            for s in entry["seeds"]:
                dst = prediction_path(out, name, d, int(s), split)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(prediction_path(source / "evals" / split, name, d, int(s), split), dst)
        shutil.copyfile(src, result_path(out, name, split))
    return names


def macro_f1(gold: np.ndarray, pred: np.ndarray, n_labels: int) -> float:
    "Macro-F1 over the labels seen in gold or pred (sklearn's `f1_score(average='macro', zero_division=0)`)."
    tp = np.bincount(gold[gold == pred], minlength=n_labels)
    n_gold, n_pred = np.bincount(gold, minlength=n_labels), np.bincount(pred, minlength=n_labels)
    seen = (n_gold + n_pred) > 0
    f1 = np.divide(2 * tp, n_gold + n_pred, out=np.zeros(n_labels), where=seen)
    return float(f1[seen].mean())


def protocol(cfg, split: str) -> dict:
    "Where each split is scored: test as the config says, validation as the sweep does (`VAL`)."
    e = cfg.evaluation
    return {"split": "test", "limit": e.limit, "seeds": e.seeds} if split == "test" else VAL


def same_protocol(cfg, res: dict, source: Path, split: str) -> None:
    "Refuse an evaluation `res` (read from `source`) that was not scored with this config's protocol on `split`."
    e = cfg.evaluation
    want = {"split": split, "shots": e.shots, "limit": protocol(cfg, split)["limit"], "max_chars": e.max_chars,
            "fixed": e.fixed}
    if (got := {k: res["protocol"].get(k) for k in want}) != want:
        raise CompeffdistError(f"{source} was scored with {got}; this config scores with {want}")


def scored_cells(cfg, split: str = "test", folder: Path | None = None,
                 prefix: str = "") -> dict[str, dict[tuple[str, int], list[str]]]:
    """Model -> (dataset, seed) -> predictions, for every evaluation of the split in this replication's results
    folder, or in another one's (`folder`, its models named `prefix` + name, each checked for this config's
    protocol)."""
    out: dict = {}
    evals, limit = (folder or RESULTS) / "evals" / split, protocol(cfg, split)["limit"]
    for res_file in sorted(evals.glob("*.json")):
        res = read_json(res_file)
        if folder is not None:
            same_protocol(cfg, res, res_file, split)
        for d, entry in res["datasets"].items():
            for s in entry["seeds"]:
                rows = read_jsonl(prediction_path(evals, res["name"], d, int(s), split))
                out.setdefault(prefix + res["name"], {})[(d, int(s))] = \
                    [r["prediction"].strip().lower() for r in rows][:limit]
    return out


def gold_labels(cfg, dataset: str, seed: int, split: str = "test") -> list[str]:
    "The gold labels of the examples `split` is scored on (see `protocol`), in order."
    e = cfg.evaluation
    return [x.gold for x in build_examples(dataset, e.shots, seed, protocol(cfg, split)["limit"], e.max_chars, e.fixed,
                                           split=split)]


def bootstrap_mean(cfg, weights: dict[str, float], cells: dict, seeds: list[int], reps: int = 2000, seed: int = 0,
                   split: str = "test") -> tuple[float, list[float]]:
    """A weighted sum of models' mean macro-F1 (x100) over the datasets and `seeds` (`{m: 1}`: one model's mean,
    `{a: 1, b: -1}`: a paired difference) on the split's examples, and its 95% percentile interval from
    `scipy.stats.bootstrap` over `reps` resamples: one sample of example indices per dataset, each resampled on its
    own, and the statistic scores every model and seed on the same resample of a dataset (paired)."""
    from scipy.stats import bootstrap
    datasets = resolve_datasets(cfg.evaluation.datasets)
    coded = []  # per dataset, per seed: gold labels, each model's predictions (label indices), number of labels
    for d in datasets:
        coded.append([])
        for s in seeds:
            gold, preds = gold_labels(cfg, d, s, split), {m: cells[m][(d, s)] for m in weights}
            labels = {l: i for i, l in enumerate(sorted(set(gold).union(*map(set, preds.values()))))}
            coded[-1].append((np.array([labels[x] for x in gold]),
                              {m: np.array([labels[x] for x in p]) for m, p in preds.items()}, len(labels)))

    def statistic(*samples) -> float:
        means = dict.fromkeys(weights, 0.0)
        for per_seed, i in zip(coded, samples):
            for gold, preds, n_labels in per_seed:
                for m in weights:
                    means[m] += 100 * macro_f1(gold[i], preds[m][i], n_labels) / (len(datasets) * len(seeds))
        return sum(w * means[m] for m, w in weights.items())

    data = [np.arange(len(per_seed[0][0])) for per_seed in coded]
    ci = bootstrap(data, statistic, n_resamples=reps, vectorized=False, paired=False, method="percentile",
                   rng=seed).confidence_interval
    return statistic(*data), [round(float(ci.low), 2), round(float(ci.high), 2)]


def summarise(cfg, split: str = "test", against: Path | None = None) -> dict:
    """results/replication/summary.json: every model scored on test (mean and 95% interval over examples and its
    seeds), and the paired differences of `PAIRS` over the seeds both models have. With `split="val"`, the same for
    the sweep's students (summary.val.json), each paired with the base student. With `against`, another
    replication's results folder scored with the same protocol (v2's for v3): in `against`, the namesakes there of
    this replication's models (`replication/full`), and each model paired with its namesake
    (`full - replication/full`)."""
    e = cfg.evaluation
    cells = scored_cells(cfg, split)
    trainings = read_json(RESULTS / "trainings.json") if (RESULTS / "trainings.json").is_file() else {}
    models = {m: row | {"n_samples": trainings.get(m, {}).get("samples"),
                        "per_seed": per_seed_scores(cfg, got, row["seeds"], split)}
              for m, got in cells.items() if (row := model_row(cfg, m, cells, split))}
    pairs = PAIRS if split == "test" else [(m, "base_student") for m in models if m != "base_student"]
    summary = {"protocol": {**protocol(cfg, split), "shots": e.shots, "max_chars": e.max_chars,
                            "datasets": resolve_datasets(e.datasets)},
               "models": models, "differences": paired_differences(cfg, cells, models, pairs, split)}
    if split == "test":
        summary["label_shares"] = label_shares(cfg, cells, models)
    if against is not None:
        summary["against"] = compare_with(cfg, against, cells, models, split)
    write_json(RESULTS / ("summary.json" if split == "test" else f"summary.{split}.json"), summary)
    return summary


def model_row(cfg, m: str, cells: dict, split: str) -> dict | None:
    "Model `m`'s mean and 95% interval over the seeds it has on every dataset (None: no such seed)."
    datasets, got = resolve_datasets(cfg.evaluation.datasets), cells[m]
    seeds = sorted({s for (_, s) in got if all((d, s) in got for d in datasets)})
    if not seeds:
        return None
    mean, ci95 = bootstrap_mean(cfg, {m: 1}, cells, seeds, split=split)
    return {"mean": round(float(mean), 2), "ci95": ci95, "seeds": seeds}


def per_seed_scores(cfg, got: dict, seeds: list[int], split: str) -> dict:
    return {str(s): {d: round(100 * macro_f1_of(cfg, d, s, got[(d, s)], split), 2)
                     for d in resolve_datasets(cfg.evaluation.datasets)} for s in seeds}


def paired_differences(cfg, cells: dict, models: dict, pairs: list[tuple[str, str]], split: str) -> dict:
    "`a - b` for each pair of scored models, over the seeds both have (pairs without a shared seed left out)."
    diffs = {}
    for a, b in pairs:
        common = sorted(set(models.get(a, {}).get("seeds", [])) & set(models.get(b, {}).get("seeds", [])))
        if common:
            mean, ci95 = bootstrap_mean(cfg, {a: 1, b: -1}, cells, common, split=split)
            diffs[f"{a} - {b}"] = {"mean": round(float(mean), 2), "ci95": ci95, "seeds": common}
    return diffs


def compare_with(cfg, folder: Path, cells: dict, models: dict, split: str) -> dict:
    """The namesakes of this replication's models in another one (`<folder name>/<model>`), and each model paired with
    its namesake there, on the seeds both scored: the same test examples, so the difference is paired."""
    prefix = f"{Path(folder).name}/"
    theirs = scored_cells(cfg, split, Path(folder), prefix)
    if not theirs:
        raise CompeffdistError(f"{Path(folder) / 'evals' / split} holds no evaluation to compare with")
    both = cells | theirs
    rows = {prefix + m: row for m in models
            if prefix + m in theirs and (row := model_row(cfg, prefix + m, both, split))}
    pairs = [(m, prefix + m) for m in models if prefix + m in rows]
    return {"folder": str(folder), "models": rows,
            "differences": paired_differences(cfg, both, models | rows, pairs, split)}


def label_shares(cfg, cells: dict, models: dict) -> dict:
    """Per dataset, the share of each label among the gold labels and among each model's predictions (its seeds
    pooled): where a model's predictions lean to one label, macro-F1 pays for it."""
    datasets = resolve_datasets(cfg.evaluation.datasets)
    share = lambda xs: {label: round(n / len(xs), 4) for label, n in sorted(Counter(xs).items())}
    gold = {d: share(gold_labels(cfg, d, cfg.evaluation.seeds[0])) for d in datasets}  # the seed draws only the shots
    return {"gold": gold, "models": {m: {d: share([p for s in v["seeds"] for p in cells[m][(d, s)]]) for d in datasets}
                                     for m, v in models.items()}}


def macro_f1_of(cfg, dataset: str, seed: int, preds: list[str], split: str = "test") -> float:
    gold = gold_labels(cfg, dataset, seed, split)
    labels = {l: i for i, l in enumerate(sorted(set(gold) | set(preds)))}
    return macro_f1(np.array([labels[x] for x in gold]), np.array([labels[x] for x in preds]), len(labels))


# --- command line ---------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["corpus", "sweep", "variants", "ceiling", "teacher", "reuse", "summary"])
    ap.add_argument("--config", default="configs/replication.yaml")
    ap.add_argument("--only", default="", help="variants: comma-separated names (default: all, and the learning curve)")
    ap.add_argument("--seeds", help="comma-separated evaluation seeds (default: the config's)")
    ap.add_argument("--datasets", help="teacher: comma-separated datasets (default: the config's)")
    ap.add_argument("--from", dest="source", help="reuse: another replication's results folder, e.g. results/replication")
    ap.add_argument("--settings-from", help="variants: train with the settings another replication's sweep chose, "
                                            "e.g. results/replication (default: this replication's sweep.json)")
    ap.add_argument("--against", help="summary: another replication's results folder to pair this one's models with, "
                                      "e.g. results/replication (v2) for v3")
    ap.add_argument("--device", help="sweep, variants: where the students train and are scored, e.g. cuda "
                                     "(default: the config's student.device)")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, {"student.device": a.device} if a.device else None)
    use_results(cfg)
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else cfg.evaluation.seeds
    if a.command in ("sweep", "variants") and not SCORED.is_file():
        sys.exit(f"error: {SCORED} missing: run `compeffdist run --config {a.config} --until difficulty`, "
                 f"then `python tools/replicate.py corpus`")
    if a.command == "corpus":
        write_json(RESULTS / "corpus.json", corpus_summary(cfg) | {"teacher_time": teacher_time(cfg)})
        if (Path(cfg.run.out) / "difficulty" / "scored.jsonl").is_file():
            print(f"{keep_scored_corpus(cfg)} scored samples kept in {SCORED}")
    elif a.command == "sweep":
        print(json.dumps(sweep(cfg, a.config)["chosen"]))
    elif a.command == "variants":
        names = [n for n in a.only.split(",") if n] or list(VARIANTS) + [f"full_{n}" for n in CURVE]
        if unknown := [n for n in names if n not in VARIANTS and n != "base_student"
                       and not (n.startswith("full_") and n[5:].isdigit())]:
            sys.exit(f"error: unknown variant(s) {', '.join(unknown)}; known: base_student, {', '.join(VARIANTS)}, "
                     "full_<n>")
        run_variants(cfg, a.config, names, seeds, Path(a.settings_from) if a.settings_from else None)
    elif a.command == "ceiling":
        run_ceiling(cfg, a.config, seeds)
    elif a.command == "teacher":
        datasets = a.datasets.split(",") if a.datasets else None
        evaluate(cfg, cfg.teacher.model, "teacher", "test", cfg.evaluation.limit, seeds, "llamacpp", datasets)
    elif a.command == "reuse":
        if not a.source:
            sys.exit("error: reuse needs --from, another replication's results folder")
        names = [n for n in a.only.split(",") if n] or list(REUSABLE)
        print(f"copied from {a.source}: {', '.join(reuse(cfg, Path(a.source), names))}")
    else:
        for split in ("val", "test"):
            summary = summarise(cfg, split, Path(a.against) if a.against else None)
            for m, v in summary["models"].items():
                print(f"{split:<4} {m:<26} {v['mean']:6.2f} ({v['ci95'][0]:.2f} .. {v['ci95'][1]:.2f}), "
                      f"seeds {v['seeds']}")
            for pair, v in summary.get("against", {}).get("differences", {}).items():
                print(f"{split:<4} {pair:<26} {v['mean']:+6.2f} ({v['ci95'][0]:+.2f} .. {v['ci95'][1]:+.2f}), "
                      f"seeds {v['seeds']}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CompeffdistError as e:  # bad input: one line and a non-zero exit
        sys.exit(f"error: {e}")
