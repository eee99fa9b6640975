"""tools/replicate.py (the issue-7 replication driver): its macro-F1 and its paired bootstrap over SentiBench
test examples, on real SentiBench labels."""
import importlib.util
import json

import numpy as np
import pytest
from sklearn.metrics import f1_score

from compeffdist.core import load_config, write_jsonl
from compeffdist.sentibench import _slug, build_examples

from conftest import ROOT

spec = importlib.util.spec_from_file_location("replicate", ROOT / "tools" / "replicate.py")
replicate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(replicate)


def test_macro_f1_is_sklearns():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, k = int(rng.integers(1, 40)), int(rng.integers(1, 5))
        gold, pred = rng.integers(0, k, n), rng.integers(0, k + 1, n)
        assert replicate.macro_f1(gold, pred, k + 1) == pytest.approx(
            f1_score(gold, pred, average="macro", zero_division=0), abs=1e-12)


def test_bootstrap_on_real_labels(sentibench_root, tmp_path):
    datasets = ["sc/sst2", "multifaced/irony18"]
    cfg = load_config(ROOT / "configs" / "replication-v1.yaml",
                      {"evaluation.datasets": datasets, "evaluation.limit": 20, "evaluation.seeds": [42]})
    golds = {d: [x.gold for x in build_examples(d, 4, 42, 20, 1200)] for d in datasets}
    dirs = {"difficulty_10": tmp_path / "perfect", "random_10": tmp_path / "constant"}
    for d, gold in golds.items():
        write_jsonl(dirs["difficulty_10"] / f"{_slug(d)}.seed42.jsonl", [{"prediction": g} for g in gold])
        write_jsonl(dirs["random_10"] / f"{_slug(d)}.seed42.jsonl", [{"prediction": " " + gold[0].upper()} for _ in gold])
    b = replicate.bootstrap(cfg, dirs, reps=300)
    expected = np.mean([100 * f1_score(g, [g[0]] * len(g), average="macro", zero_division=0) for g in golds.values()])
    assert b["mean"] == {"difficulty_10": 100.0, "random_10": pytest.approx(expected, abs=0.01)}
    assert b["ci95"]["difficulty_10"] == [100.0, 100.0]
    lo, hi = b["ci95"]["random_10"]
    assert lo <= b["mean"]["random_10"] <= hi and lo < hi
    diff = b["differences"]["difficulty_10 - random_10"]
    assert diff["mean"] == pytest.approx(100 - expected, abs=0.01) and diff["p_le_0"] == 0.0
    assert json.dumps(b)  # what the script writes to results/replication.json


def test_eval_args_follow_the_config():
    cfg = load_config(ROOT / "configs" / "replication-v1.yaml")
    args = replicate.eval_args(cfg, "m", "n", ROOT / "out")
    assert args[args.index("--limit") + 1] == "50" and args[args.index("--max-chars") + 1] == "1200"
    assert args[args.index("--datasets") + 1].split(",") == cfg.evaluation.datasets
    cfg = load_config(ROOT / "configs" / "replication-v1.yaml",
                      {"evaluation.datasets": "all", "evaluation.limit": None, "evaluation.max_chars": None})
    args = replicate.eval_args(cfg, "m", "n", ROOT / "out")
    assert args[args.index("--datasets") + 1] == "all" and "--limit" not in args and "--max-chars" not in args


def test_the_mean_over_draws_is_bootstrapped_as_one_model(sentibench_root, tmp_path):
    datasets = ["sc/sst2"]
    cfg = load_config(ROOT / "configs" / "replication-v1.yaml",
                      {"evaluation.datasets": datasets, "evaluation.limit": 30, "evaluation.seeds": [42]})
    gold = [x.gold for x in build_examples(datasets[0], 4, 42, 30, 1200)]
    wrong = {"positive": "negative", "negative": "positive"}
    dirs = {}
    for group, members in replicate.DRAW_MEANS.items():
        for k, m in enumerate(members):  # draw k gets its first 10k predictions wrong
            dirs[m] = tmp_path / m
            write_jsonl(dirs[m] / f"{_slug(datasets[0])}.seed42.jsonl",
                        [{"prediction": wrong[g] if i < 10 * k else g} for i, g in enumerate(gold)])
    b = replicate.bootstrap(cfg, dirs, reps=200)
    for group, members in replicate.DRAW_MEANS.items():
        assert b["mean"][group] == pytest.approx(np.mean([b["mean"][m] for m in members]), abs=0.02)
        assert b["mean"][members[0]] == 100.0 > b["mean"][members[1]] > b["mean"][members[2]]
    diff = b["differences"]["difficulty_10_20steps_x3 - random_10_20steps_x3"]
    assert diff["mean"] == 0 and diff["ci95"] == [0.0, 0.0]  # the same predictions in both groups
    del dirs["random_10_20steps_seed2"]  # a group with a draw missing is not reported
    assert "random_10_20steps_x3" not in replicate.bootstrap(cfg, dirs, reps=10)["mean"]


def test_another_limit_is_evaluated_in_its_own_folder(tmp_path):
    cfg = load_config(ROOT / "configs" / "replication-v1.yaml")
    assert replicate.eval_dir(cfg, cfg.evaluation.limit, tmp_path / "eval") == tmp_path / "eval"
    cfg100 = load_config(ROOT / "configs" / "replication-v1.yaml", {"evaluation.limit": 100})
    assert replicate.eval_dir(cfg100, cfg.evaluation.limit, tmp_path / "eval") == tmp_path / "eval_limit100"


def test_an_interrupted_evaluation_is_not_finished(tmp_path):
    from compeffdist.core import write_json
    over = {"evaluation.datasets": ["sc/sst2", "sc/imdb"], "evaluation.seeds": [42, 52]}
    cfg = load_config(ROOT / "configs" / "replication-v1.yaml", over)
    path = tmp_path / "m.json"
    assert not replicate.finished(cfg, path)
    res = {"protocol": {"limit": 50}, "datasets": {"sc/sst2": {"seeds": {"42": {}, "52": {}}}, "sc/imdb": {"seeds": {"42": {}}}}}
    write_json(path, res)
    assert not replicate.finished(cfg, path)  # sc/imdb seed 52 is missing
    res["datasets"]["sc/imdb"]["seeds"]["52"] = {}
    write_json(path, res)
    assert replicate.finished(cfg, path)
    assert not replicate.finished(load_config(ROOT / "configs" / "replication-v1.yaml", over | {"evaluation.limit": 100}), path)


def test_a_larger_limit_reuses_the_largest_earlier_evaluation(tmp_path):
    cfg200 = load_config(ROOT / "configs" / "replication-v1.yaml", {"evaluation.limit": 200})
    default = tmp_path / "eval"
    for folder in ("eval", "eval_limit100", "eval_limit400", "eval_limitx"):
        (tmp_path / folder / "predictions" / "m").mkdir(parents=True)
    (tmp_path / "eval_limit150").mkdir()  # no predictions of m in it
    assert replicate.earlier_dir(cfg200, 50, default, "m") == tmp_path / "eval_limit100"
    assert replicate.earlier_dir(cfg200, 50, default, "other") == default  # nothing to reuse: the default folder
    cfg100 = load_config(ROOT / "configs" / "replication-v1.yaml", {"evaluation.limit": 100})
    assert replicate.earlier_dir(cfg100, 50, default, "m") == default


def test_evaluate_copies_the_largest_earlier_predictions_then_runs_the_cli(tmp_path, monkeypatch):
    from compeffdist.core import write_json
    over = {"evaluation.datasets": ["sc/sst2"], "evaluation.seeds": [42], "evaluation.limit": 200}
    cfg = load_config(ROOT / "configs" / "replication-v1.yaml", over)
    for folder, rows in (("eval", 50), ("eval_limit100", 100)):
        write_jsonl(tmp_path / folder / "predictions" / "m" / "sc_sst2.seed42.jsonl", [{"key": i} for i in range(rows)])
    calls = []

    def fake_cli(*args):  # the evaluation itself: what it was given, then a finished results file
        out = tmp_path / "eval_limit200"
        calls.append((args, len((out / "predictions" / "m" / "sc_sst2.seed42.jsonl").read_text().splitlines())))
        write_json(out / "m.json", {"protocol": {"limit": 200}, "datasets": {"sc/sst2": {"seeds": {"42": {}}}}})

    monkeypatch.setattr(replicate, "cli", fake_cli)
    res = replicate.evaluate(cfg, 50, "model-path", "m", tmp_path / "eval")
    assert res["protocol"]["limit"] == 200 and len(calls) == 1
    args, rows_copied = calls[0]
    assert rows_copied == 100  # the limit-100 predictions, not the limit-50 ones
    assert args[args.index("--out") + 1] == str(tmp_path / "eval_limit200") and "200" in args
    replicate.evaluate(cfg, 50, "model-path", "m", tmp_path / "eval")
    assert len(calls) == 1  # finished: not evaluated again


def _config_in(tmp_path):
    "configs/replication-v1.yaml with its run folder under tmp_path."
    import yaml
    data = yaml.safe_load((ROOT / "configs" / "replication-v1.yaml").read_text())
    data["run"]["out"] = str(tmp_path / "run")
    path = tmp_path / "replication.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_variants_need_the_run_up_to_its_difficulty_stage(tmp_path):
    config = str(_config_in(tmp_path))
    with pytest.raises(SystemExit, match="scored.jsonl missing.*--until difficulty"):
        replicate.main(["--config", config, "--only", "full"])
    write_jsonl(tmp_path / "run" / "difficulty" / "scored.jsonl", [{"id": "s0"}])
    with pytest.raises(SystemExit, match="unknown variant.*fulll"):  # a typo stops before any model is run
        replicate.main(["--config", config, "--only", "full,fulll", "--seeds", "43"])


def test_a_pass_overrides_the_limit_and_the_seeds():
    config = ROOT / "configs" / "replication-v1.yaml"
    cfg = replicate.pass_config(config)
    assert (cfg.evaluation.limit, cfg.evaluation.seeds) == (50, [42])
    cfg = replicate.pass_config(config, limit=200, seeds="43,44")
    assert (cfg.evaluation.limit, cfg.evaluation.seeds) == (200, [43, 44])
    args = replicate.eval_args(cfg, "m", "n", ROOT / "out")
    assert args[args.index("--seeds") + 1] == "43,44" and args[args.index("--limit") + 1] == "200"
    with pytest.raises(SystemExit, match="--seeds.*integers"):
        replicate.pass_config(config, seeds="43,x")
