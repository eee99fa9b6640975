"""`compeffdist eval` and `compeffdist eval score`: a real SmolLM2 run, re-scoring its predictions, and bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compeffdist.cli import main

BIN = Path(sys.executable).parent / "compeffdist"


def _eval(out, datasets, limit, extra=()):
    return main(["eval", "--model", "smollm2-135m-instruct", "--datasets", datasets, "--seeds", "42",
                 "--limit", str(limit), "--max-chars", "600", "--batch-size", "8", "--out", str(out), *extra])


def _check_run(out, datasets, limit, capsys):
    res = json.loads((out / "smollm2-135m-instruct.json").read_text())
    assert set(res["datasets"]) == set(datasets)
    assert res["protocol"] == {"split": "test", "shots": 4, "seeds": [42], "limit": limit, "max_chars": 600,
                               "fixed": False}
    for name, entry in res["datasets"].items():
        m = entry["seeds"]["42"]
        assert m["n"] == limit and 0 <= m["f1"] <= 1
        assert entry["score"] == pytest.approx(100 * m["f1"])
        pred = out / "predictions" / "smollm2-135m-instruct" / f"{name.replace('/', '_')}.seed42.jsonl"
        lines = pred.read_text().splitlines()
        assert len(lines) == limit and all("prediction" in json.loads(l) for l in lines)
        if entry["family"] != "FSA":
            assert 0 <= m["top1_in_verbalizer"] <= 1
        # the predictions file re-scores to the same number
        capsys.readouterr()
        assert main(["eval", "score", "--dataset", name, "--predictions", str(pred), "--limit", str(limit),
                     "--max-chars", "600"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["f1"] == pytest.approx(m["f1"]) and printed["dataset"] == name
    assert res["mean"] == pytest.approx(sum(e["score"] for e in res["datasets"].values()) / len(datasets))
    table = (out / "table.md").read_text()
    assert "| smollm2-135m-instruct |" in table and f"{res['mean']:.1f}" in table
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.sentibench
def test_eval_smollm2_one_dataset_per_family(sentibench_root, tmp_path, capsys):
    datasets = ["sc/sst2", "multifaced/pstance", "absa/acsa_rest16"]
    assert _eval(tmp_path, ",".join(datasets), 2) == 0
    _check_run(tmp_path, datasets, 2, capsys)
    # a second run with the same protocol reuses the finished entries (resume) and keeps the results
    before = (tmp_path / "smollm2-135m-instruct.json").read_text()
    assert _eval(tmp_path, ",".join(datasets), 2) == 0
    assert json.loads((tmp_path / "smollm2-135m-instruct.json").read_text()) == json.loads(before)


@pytest.mark.sentibench
def test_eval_smollm2_all_12_datasets(sentibench_root, tmp_path, capsys):  # ~3.5 min on 2 CPU cores
    from compeffdist.data import SENTIBENCH
    env = {**os.environ, "COMPEFFDIST_SENTIBENCH": str(sentibench_root)}
    r = subprocess.run([str(BIN), "eval", "--model", "smollm2-135m-instruct", "--seeds", "42", "--limit", "10",
                        "--max-chars", "600", "--out", str(tmp_path)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    _check_run(tmp_path, list(SENTIBENCH), 10, capsys)


def _error(capsys, argv):
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


@pytest.mark.sentibench
def test_unknown_dataset(sentibench_root, capsys):
    rc, err = _error(capsys, ["eval", "--model", "smollm2-135m-instruct", "--datasets", "sst2,sst5", "--out", "/tmp/x"])
    assert rc == 2 and len(err) == 1 and "unknown SentiBench dataset 'sst5'" in err[0]
    rc, err = _error(capsys, ["eval", "score", "--dataset", "sc/sst5", "--predictions", "/tmp/p.jsonl"])
    assert rc == 2 and len(err) == 1 and "unknown SentiBench dataset" in err[0]


def test_missing_sentibench_folder(tmp_path, capsys):
    rc, err = _error(capsys, ["eval", "--model", "smollm2-135m-instruct", "--sentibench", str(tmp_path / "nope"),
                              "--out", str(tmp_path)])
    assert rc == 2 and len(err) == 1 and "SentiBench folder not found" in err[0]


@pytest.mark.sentibench
def test_predictions_with_the_wrong_number_of_lines(sentibench_root, tmp_path):
    pred = tmp_path / "p.jsonl"
    pred.write_text("\n".join(json.dumps({"prediction": "positive"}) for _ in range(5)) + "\n")
    env = {**os.environ, "COMPEFFDIST_SENTIBENCH": str(sentibench_root)}
    r = subprocess.run([str(BIN), "eval", "score", "--dataset", "sc/sst2", "--predictions", str(pred)],
                       env=env, capture_output=True, text=True)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "5 predictions, but sc/sst2 has 1821 test examples" in err[0]
    # with --limit 5 the same file is complete
    r = subprocess.run([str(BIN), "eval", "score", "--dataset", "sc/sst2", "--predictions", str(pred), "--limit", "5"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["metric"] == "macro_f1"


@pytest.mark.sentibench
def test_malformed_predictions(sentibench_root, tmp_path, capsys):
    pred = tmp_path / "p.jsonl"
    pred.write_text('{"prediction": "positive"}\n{"label": "negative"}\n')
    rc, err = _error(capsys, ["eval", "score", "--dataset", "sc/sst2", "--predictions", str(pred), "--limit", "2"])
    assert rc == 2 and len(err) == 1 and "record 2" in err[0]
    pred.write_text('{"prediction": "positive"}\nnot json\n')
    rc, err = _error(capsys, ["eval", "score", "--dataset", "sc/sst2", "--predictions", str(pred), "--limit", "2"])
    assert rc == 2 and len(err) == 1 and "not valid JSON" in err[0]
    rc, err = _error(capsys, ["eval", "score", "--dataset", "sc/sst2", "--predictions", str(tmp_path / "none.jsonl")])
    assert rc == 2 and len(err) == 1 and "file not found" in err[0]


@pytest.mark.sentibench
def test_evaluation_stage(sentibench_root, tmp_path):
    from compeffdist.core import CompeffdistError, RunStore, load_config
    from compeffdist.engines import RunContext
    from compeffdist.sentibench import run_evaluation
    cfg = load_config("configs/demo.yaml", {"run.out": str(tmp_path), "data.sentibench": str(sentibench_root),
                                            "evaluation.datasets": ["sc/sst2"], "evaluation.limit": 2,
                                            "evaluation.models": ["base_student", "student"]})
    ctx = RunContext(cfg, RunStore(cfg.run.out), progress=False)
    with pytest.raises(CompeffdistError, match="run the training stage first"):
        run_evaluation(ctx)
    ctx.cfg.evaluation.models = ["base_student"]
    stats = run_evaluation(ctx)
    res = json.loads((tmp_path / "evaluation" / "base_student.json").read_text())
    assert res["model"] == "smollm2-135m-instruct" and res["protocol"]["limit"] == 2
    assert stats.info["base_student_mean"] == pytest.approx(round(res["mean"], 2))
    assert (tmp_path / "evaluation" / "table.md").is_file() and (tmp_path / "evaluation" / "scores.png").is_file()


class _CountingBackend:
    "Scores each prompt by its length (a fake model): the prompts it was asked are recorded."
    name = "fake"

    def __init__(self, identity="fake@1"):
        from types import SimpleNamespace
        self.ref, self.asked = SimpleNamespace(identity=identity, spec="fake"), []

    def first_token(self, text):
        return {" positive": 1, " negative": 2}[text]

    def next_token_scores(self, prompts, token_ids):
        self.asked += prompts
        return [([float(len(p) % 2), 0.5], 1) for p in prompts]


def test_predict_reuses_known_rows_of_the_same_model_only():
    from compeffdist.sentibench import Example, predict
    ex = [Example(i, f"prompt {'x' * i}", "s", "positive", {}) for i in range(5)]
    first, diag = predict(_CountingBackend(), "sc/sst2", ex[:3])
    assert diag["reused"] == 0 and len({r["key"] for r in first}) == 3
    model = _CountingBackend()
    rows, diag = predict(model, "sc/sst2", ex, known={r["key"]: r for r in first})
    assert model.asked == [e.prompt for e in ex[3:]] and diag["reused"] == 3
    assert rows[:3] == first and [r["prediction"] for r in rows] == ["negative", "positive"] * 2 + ["negative"]
    other = _CountingBackend("fake@2")  # another model: nothing of the first one is reused
    _, diag = predict(other, "sc/sst2", ex, known={r["key"]: r for r in first})
    assert other.asked == [e.prompt for e in ex] and diag["reused"] == 0


@pytest.mark.sentibench
def test_a_larger_limit_runs_only_the_new_examples(sentibench_root, tmp_path, capsys):
    "Raising --limit reuses the predictions already made; the new rows are those of a fresh run with that limit."
    datasets = "sc/sst2,absa/atsa_rest16"
    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    pred = lambda out, d: [json.loads(l) for l in
                           (out / "predictions" / "smollm2-135m-instruct" / f"{d}.seed42.jsonl").read_text().splitlines()]
    assert _eval(grown, datasets, 2) == 0
    before = {d: pred(grown, d) for d in ("sc_sst2", "absa_atsa_rest16")}
    capsys.readouterr()
    assert _eval(grown, datasets, 4) == 0
    assert capsys.readouterr().out.count("(4 examples, 2 reused,") == 2
    assert _eval(fresh, datasets, 4) == 0
    res = json.loads((grown / "smollm2-135m-instruct.json").read_text())
    assert res["protocol"]["limit"] == 4 and all(e["seeds"]["42"]["reused"] == 2 for e in res["datasets"].values())
    for d, rows in before.items():
        now, new = pred(grown, d), pred(fresh, d)
        assert now[:2] == rows and [r["key"] for r in now] == [r["key"] for r in new]
    assert [r["prediction"] for r in pred(grown, "sc_sst2")] == [r["prediction"] for r in pred(fresh, "sc_sst2")]
    for d, name in (("sc_sst2", "sc/sst2"), ("absa_atsa_rest16", "absa/atsa_rest16")):  # each row says what it is
        rows = pred(grown, d)
        assert [(r["model"], r["dataset"], r["split"], r["seed"], r["index"]) for r in rows] == \
               [(res["identity"], name, "test", 42, i) for i in range(4)]


def test_the_split_is_part_of_the_prediction_key():
    from compeffdist.sentibench import Example, predict
    ex = [Example(0, "the same prompt", "s", "positive", {})]
    test, _ = predict(_CountingBackend(), "sc/sst2", ex)
    model = _CountingBackend()
    val, diag = predict(model, "sc/sst2", ex, known={r["key"]: r for r in test}, split="val")
    assert val[0]["key"] != test[0]["key"] and model.asked == ["the same prompt"] and diag["reused"] == 0


@pytest.mark.sentibench
def test_eval_on_the_validation_split(sentibench_root, tmp_path, capsys):
    "--split val: the same protocol on val.json (demonstrations from train), in files of its own next to test's."
    name = "smollm2-135m-instruct"
    assert _eval(tmp_path, "sc/sst2,absa/opener", 2, ["--split", "val"]) == 0
    assert not (tmp_path / f"{name}.json").exists() and not (tmp_path / "table.md").exists()
    val = json.loads((tmp_path / f"{name}.val.json").read_text())
    assert val["protocol"]["split"] == "val" and set(val["datasets"]) == {"sc/sst2", "absa/opener"}
    assert "validation split" in (tmp_path / "table.val.md").read_text()
    from compeffdist.sentibench import build_examples
    for d, slug in (("sc/sst2", "sc_sst2"), ("absa/opener", "absa_opener")):
        pred = tmp_path / "predictions" / name / f"{slug}.val.seed42.jsonl"
        assert len(pred.read_text().splitlines()) == 2
        capsys.readouterr()
        assert main(["eval", "score", "--dataset", d, "--split", "val", "--predictions", str(pred), "--limit", "2",
                     "--max-chars", "600"]) == 0
        assert json.loads(capsys.readouterr().out)["f1"] == pytest.approx(val["datasets"][d]["seeds"]["42"]["f1"])
    sentences = {e.sentence for e in build_examples("sc/sst2", limit=2, split="val")}
    assert sentences.isdisjoint(e.sentence for e in build_examples("sc/sst2", limit=50))  # val examples, not test
    before = (tmp_path / f"{name}.val.json").read_text()
    assert _eval(tmp_path, "sc/sst2", 2) == 0  # the test split into the same folder: kept apart
    test = json.loads((tmp_path / f"{name}.json").read_text())
    assert test["protocol"]["split"] == "test" and (tmp_path / f"{name}.val.json").read_text() == before
    assert (tmp_path / "predictions" / name / "sc_sst2.seed42.jsonl").is_file()
    assert "test split" in (tmp_path / "table.md").read_text()


@pytest.mark.sentibench
def test_a_dataset_without_a_validation_split(sentibench_root, tmp_path, capsys):
    rc, err = _error(capsys, ["eval", "--model", "smollm2-135m-instruct", "--datasets", "sst2,atsa_rest16",
                              "--split", "val", "--out", str(tmp_path)])
    assert rc == 2 and len(err) == 1 and "no val split in SentiBench for absa/atsa_rest16" in err[0]
