"""tools/replicate.py: the replication's bookkeeping (metric, bootstrap, sampling of variants, the summary file),
on real SentiBench labels with the committed and with made-up predictions; evaluations run with the real eval
command on a tiny student; its one-line errors."""
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

from compeffdist.core import load_config, read_jsonl, write_json, write_jsonl
from compeffdist.sentibench import build_examples, prediction_path, result_path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import replicate  # noqa: E402


def test_macro_f1_is_sklearns():
    rng = np.random.default_rng(0)
    for _ in range(20):
        gold, pred = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
        assert replicate.macro_f1(gold, pred, 4) == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0))


def test_best_setting_prefers_the_validation_mean_then_fewer_epochs():
    rows = [{"learning_rate": 5e-5, "epochs": 1, "cap": 96, "val_mean": 50.0},
            {"learning_rate": 2e-4, "epochs": 3, "cap": 96, "val_mean": 52.0},
            {"learning_rate": 2e-4, "epochs": 1, "cap": 160, "val_mean": 52.0}]
    assert replicate.best(rows) == {"learning_rate": 2e-4, "epochs": 1, "cap": 160}


def test_variants_sample_the_share_they_name():
    cfg = load_config(ROOT / "configs" / "replication.yaml")
    corpus = [{"id": f"s{i}", "instruction_id": i % 5, "difficulty": {"rank": float(i % 7)}} for i in range(400)]
    assert len(replicate.variant_records(cfg, "full", corpus)) == 400
    d10, r10 = replicate.variant_records(cfg, "difficulty_10", corpus), replicate.variant_records(cfg, "random_10", corpus)
    assert len(d10) == len(r10) == 40 and d10 != r10
    assert np.mean([r["difficulty"]["rank"] for r in d10]) > np.mean([r["difficulty"]["rank"] for r in r10])
    assert len(replicate.variant_records(cfg, "full_300", corpus)) == 300


def _fake_evaluation(out: Path, name: str, cfg, datasets, seeds, right: float, rng, split="test", limit=None):
    "Write results/predictions of a model that gets a share `right` of the gold labels."
    e, limit = cfg.evaluation, limit or cfg.evaluation.limit
    res = {"name": name, "datasets": {},
           "protocol": {"limit": limit, "split": split, "shots": e.shots, "max_chars": e.max_chars, "fixed": e.fixed}}
    for d in datasets:
        res["datasets"][d] = {"seeds": {}}
        for s in seeds:
            gold = [x.gold for x in build_examples(d, e.shots, s, limit, e.max_chars, e.fixed, split=split)]
            labels = sorted(set(gold))
            preds = [g if rng.random() < right else labels[(labels.index(g) + 1) % len(labels)] for g in gold]
            write_jsonl(prediction_path(out, name, d, s, split),
                        [{"prediction": p, "key": str(i)} for i, p in enumerate(preds)])
            res["datasets"][d]["seeds"][str(s)] = {}
    write_json(out / (f"{name}.json" if split == "test" else f"{name}.{split}.json"), res)


def test_summary_from_committed_predictions(sentibench_root, tmp_path, monkeypatch):
    """The committed summary.json and summary.val.json are what `summary` makes of the committed predictions: every
    model's mean and interval, every paired difference and every label share, rebuilt and compared."""
    committed = ROOT / "results" / "replication"
    (tmp_path / "evals").symlink_to(committed / "evals")
    shutil.copy(committed / "trainings.json", tmp_path / "trainings.json")
    monkeypatch.setattr(replicate, "RESULTS", tmp_path)
    cfg = load_config(ROOT / "configs" / "replication.yaml")
    for split, name in (("test", "summary.json"), ("val", "summary.val.json")):
        rebuilt = json.loads(json.dumps(replicate.summarise(cfg, split)))
        assert rebuilt == json.loads((committed / name).read_text()), name
        assert json.loads((tmp_path / name).read_text()) == rebuilt
        assert rebuilt["models"] and rebuilt["differences"]
        if split == "test":  # the headline: the students against the base student and the teacher
            assert {"full", "base_student", "teacher"} <= set(rebuilt["models"])
            assert "full - base_student" in rebuilt["differences"]


def test_summary_of_made_up_predictions(sentibench_root, tmp_path, monkeypatch):
    "Means, intervals, seeds, paired differences and label shares of models right on a known share of examples."
    cfg = load_config(ROOT / "configs" / "replication.yaml", {"evaluation.limit": 40,
                                                              "evaluation.datasets": ["sc/sst2", "sc/twitter"]})
    monkeypatch.setattr(replicate, "RESULTS", tmp_path)
    out, rng = tmp_path / "evals" / "test", np.random.default_rng(1)
    _fake_evaluation(out, "base_student", cfg, ["sc/sst2", "sc/twitter"], [42, 52], 0.5, rng)
    _fake_evaluation(out, "full", cfg, ["sc/sst2", "sc/twitter"], [42, 52], 0.9, rng)
    _fake_evaluation(out, "teacher", cfg, ["sc/sst2", "sc/twitter"], [42], 0.95, rng)  # one seed: bootstrapped apart
    shutil.copytree(out / "predictions" / "full", out / "predictions" / "full_300")  # the same answers as `full`
    (out / "full_300.json").write_text((out / "full.json").read_text().replace('"name": "full"', '"name": "full_300"'))
    replicate.summarise(cfg)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["protocol"]["limit"] == 40
    m = saved["models"]
    assert m["full"]["seeds"] == [42, 52] and m["teacher"]["seeds"] == [42]
    assert set(m["full"]["per_seed"]) == {"42", "52"} and set(m["full"]["per_seed"]["42"]) == {"sc/sst2", "sc/twitter"}
    mean_of_cells = np.mean([v for seed in m["full"]["per_seed"].values() for v in seed.values()])
    assert m["full"]["mean"] == pytest.approx(mean_of_cells, abs=0.01)
    assert m["full"]["ci95"][0] < m["full"]["mean"] < m["full"]["ci95"][1]
    diff = saved["differences"]["full - base_student"]
    assert diff["seeds"] == [42, 52] and saved["differences"]["teacher - full"]["seeds"] == [42]
    assert diff["ci95"][0] > 0  # 0.9 right against 0.5 right: beyond the noise
    # paired: two models with the same answers differ by exactly 0 on every resample
    assert saved["differences"]["full - full_300"] == {"mean": 0.0, "ci95": [0.0, 0.0], "seeds": [42, 52]}
    shares = saved["label_shares"]
    assert set(shares["gold"]) == {"sc/sst2", "sc/twitter"}
    assert set(shares["models"]) == {"base_student", "full", "full_300", "teacher"}
    assert all(sum(v.values()) == pytest.approx(1, abs=1e-3) for v in shares["gold"].values())
    # a model right on 95% of the examples predicts each label about as often as it is gold
    for label, g in shares["gold"]["sc/twitter"].items():
        assert shares["models"]["teacher"]["sc/twitter"].get(label, 0) == pytest.approx(g, abs=0.1)


def test_summary_against_another_replication_pairs_each_model_with_its_namesake(sentibench_root, tmp_path,
                                                                                 monkeypatch):
    """v3 against v2: each model of v3 paired with v2's model of that name on the seeds both have; the same answers
    differ by exactly 0, a better student's lead is beyond the noise, and a folder scored otherwise is refused."""
    ds = ["sc/sst2", "sc/twitter"]
    cfg = load_config(ROOT / "configs" / "replication.yaml", {"evaluation.limit": 40, "evaluation.datasets": ds})
    v2, v3, rng = tmp_path / "replication", tmp_path / "replication-paper", np.random.default_rng(3)
    _fake_evaluation(v2 / "evals" / "test", "base_student", cfg, ds, [42, 52], 0.5, rng)
    _fake_evaluation(v2 / "evals" / "test", "full", cfg, ds, [42, 52, 62], 0.5, rng)
    _fake_evaluation(v2 / "evals" / "test", "full_300", cfg, ds, [42], 0.5, rng)  # v3 has none: not compared
    shutil.copytree(v2 / "evals", v3 / "evals", ignore=shutil.ignore_patterns("full*"))  # base_student: reused
    _fake_evaluation(v3 / "evals" / "test", "full", cfg, ds, [42, 52], 0.95, rng)
    monkeypatch.setattr(replicate, "RESULTS", v3)
    against = replicate.summarise(cfg, against=v2)["against"]
    assert against["folder"] == str(v2) and set(against["models"]) == {"replication/base_student", "replication/full"}
    assert against["models"]["replication/full"]["seeds"] == [42, 52, 62]
    d = against["differences"]
    assert set(d) == {"base_student - replication/base_student", "full - replication/full"}
    assert d["base_student - replication/base_student"] == {"mean": 0.0, "ci95": [0.0, 0.0], "seeds": [42, 52]}
    assert d["full - replication/full"]["seeds"] == [42, 52] and d["full - replication/full"]["ci95"][0] > 0
    saved = json.loads((v3 / "summary.json").read_text())
    assert saved["against"] == json.loads(json.dumps(against)) and "replication/full" not in saved["models"]
    res = json.loads((v2 / "evals" / "test" / "full.json").read_text())
    res["protocol"]["shots"] += 1  # v2 scored with another number of shots: no pairing on other prompts
    write_json(v2 / "evals" / "test" / "full.json", res)
    with pytest.raises(replicate.CompeffdistError, match="was scored with"):
        replicate.summarise(cfg, against=v2)


def test_validation_summary_pairs_each_sweep_student_with_the_base_student(sentibench_root, tmp_path, monkeypatch):
    "summary.val.json: the sweep's students on the first 100 validation examples, each against the base student."
    cfg = load_config(ROOT / "configs" / "replication.yaml", {"evaluation.datasets": ["sc/sst2", "sc/twitter"]})
    monkeypatch.setattr(replicate, "RESULTS", tmp_path)
    out, rng, ds = tmp_path / "evals" / "val", np.random.default_rng(2), ["sc/sst2", "sc/twitter"]
    _fake_evaluation(out, "base_student", cfg, ds, [42], 0.5, rng, "val", 100)
    _fake_evaluation(out, "sweep_a", cfg, ds, [42], 0.9, rng, "val", 100)
    _fake_evaluation(out, "sweep_b", cfg, ds, [42], 0.5, rng, "val", 100)
    s = json.loads((tmp_path / "summary.val.json").read_text()) if replicate.summarise(cfg, "val") else None
    assert s["protocol"]["split"] == "val" and s["protocol"]["limit"] == 100 and s["protocol"]["seeds"] == [42]
    assert set(s["differences"]) == {"sweep_a - base_student", "sweep_b - base_student"}
    assert s["differences"]["sweep_a - base_student"]["ci95"][0] > 0  # 0.9 right against 0.5: beyond the noise
    lo, hi = s["differences"]["sweep_b - base_student"]["ci95"]
    assert lo < 0 < hi  # the same share right: inside it
    assert not (tmp_path / "summary.json").exists()


def test_sweep_and_variants_need_the_scored_corpus_that_corpus_keeps(tmp_path, monkeypatch):
    "`corpus` copies the run's scored corpus into the results folder, which the sweep and the variants train on."
    import yaml
    monkeypatch.setattr(replicate, "RESULTS", replicate.RESULTS)  # main() moves them to the config's results folder
    monkeypatch.setattr(replicate, "SCORED", replicate.SCORED)
    data = yaml.safe_load((ROOT / "configs" / "replication.yaml").read_text())
    data["run"]["out"] = str(tmp_path / "run")
    data["run"]["calls_jsonl"] = str(tmp_path / "results" / "teacher_calls.jsonl")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(SystemExit, match="scored.jsonl missing.*--until difficulty"):
        replicate.main(["variants", "--config", str(config)])
    scored = [{"id": f"s{i}", "instruction": "q", "output": "a", "difficulty": {"rank": 0.5}} for i in range(3)]
    write_jsonl(tmp_path / "run" / "difficulty" / "scored.jsonl", scored)
    replicate.main(["corpus", "--config", str(config)])
    assert read_jsonl(replicate.SCORED) == scored
    with pytest.raises(SystemExit, match="unknown variant.*fulll"):  # a typo stops before any model is trained
        replicate.main(["variants", "--config", str(config), "--only", "full,fulll"])


def test_sweep_is_a_coordinate_search_that_resumes(tmp_path, monkeypatch):
    "Learning rates first, then epochs at the best one, then caps at the best of both; done settings are reused."
    monkeypatch.setattr(replicate, "RESULTS", tmp_path)
    score = {(5e-5, 1, 384): 44.0, (2e-4, 1, 384): 47.0, (5e-4, 1, 384): 45.0, (2e-4, 2, 384): 48.0,
             (2e-4, 2, 256): 46.0}
    tried = []

    def point(setting):
        key = (setting["learning_rate"], setting["epochs"], setting["cap"])
        tried.append(key)
        if len(tried) == 4:
            raise KeyboardInterrupt  # stopped during the fourth training
        return {**setting, "val_mean": score[key]}

    with pytest.raises(KeyboardInterrupt):
        replicate.sweep(None, "", point=point)
    assert len(json.loads((tmp_path / "sweep.json").read_text())["rows"]) == 3
    out = replicate.sweep(None, "", point=lambda st: {**st, "val_mean": score[(st["learning_rate"], st["epochs"], st["cap"])]})
    assert [(r["learning_rate"], r["epochs"], r["cap"]) for r in out["rows"]] == list(score)
    assert out["chosen"] == {"learning_rate": 2e-4, "epochs": 2, "cap": 384}
    assert out["design"] == "coordinate search"


def test_sweep_trains_on_a_fixed_subset_and_a_smaller_cap_keeps_a_part_of_it(tmp_path, monkeypatch):
    cfg = load_config(ROOT / "configs" / "replication.yaml")
    monkeypatch.setattr(replicate, "SCORED", tmp_path / "scored.jsonl")
    monkeypatch.setattr(replicate, "teacher_tokens", lambda records, cfg: [len(r["output"].split()) for r in records])
    write_jsonl(replicate.SCORED, [{"id": f"s{i}", "instruction_id": i % 40, "instruction": f"q{i}",
                                    "output": "w " * (i % 380), "difficulty": {"rank": 0.5}} for i in range(3000)])
    full, short = replicate.sweep_records(cfg, 384), replicate.sweep_records(cfg, 256)
    assert len(full) == replicate.SWEEP_SAMPLES and full == replicate.sweep_records(cfg, 384)
    ids = {r["id"] for r in full}
    assert {r["id"] for r in short} < ids and all(len(r["output"].split()) <= 256 for r in short)


def test_teacher_time_counts_each_stage_and_leaves_out_the_breaks_between_sittings(tmp_path):
    cfg = load_config(ROOT / "configs" / "replication.yaml", {"run.out": str(tmp_path / "run"), "attributes.n_texts": 2,
                                                              "run.calls_jsonl": str(tmp_path / "calls.jsonl")})
    run = tmp_path / "run"
    assert replicate.teacher_time(cfg) == {}  # before the pairing: nothing to tell the calls apart with
    write_jsonl(run / "texts" / "texts.jsonl", [{"text": t} for t in ("good film", "bad soup", "not enumerated")])
    write_jsonl(run / "pairing" / "samples.jsonl", [{"instruction": "rate: good film"}, {"instruction": "rate: bad soup"}])
    enumerate_ = lambda t: replicate.attributes_request(t, cfg.attributes)[-1]["content"]
    params = {"temperature": 0.0, "max_new_tokens": 384}
    calls = [(0, enumerate_("good film"), params), (360, enumerate_("bad soup"), params),
             (900, enumerate_("not enumerated"), params),           # asked by no stage of this config: instructions
             (1260, "rate: good film", {**params, "max_new_tokens": 256}),  # an earlier cap: superseded
             (5000, "rate: good film", params),                     # after a break: its gap is not counted
             (5360, "rate: bad soup", params)]
    write_jsonl(cfg.run.calls_jsonl, [{"created": t, "model": "llamacpp:x", "request": {
        "messages": [{"role": "user", "content": c}], "params": p}} for t, c, p in calls]
        + [{"created": 7, "model": "embedder:x", "request": {}}])
    assert replicate.teacher_time(cfg) == {
        "attributes": {"calls": 2, "hours": 0.1}, "instructions": {"calls": 1, "hours": 0.15},
        "responses (superseded)": {"calls": 1, "hours": 0.1}, "responses": {"calls": 2, "hours": 0.1}}


def test_a_training_repeated_under_another_name_reuses_the_student(tmp_path, monkeypatch):
    cfg = load_config(ROOT / "configs" / "replication.yaml", {"run.out": str(tmp_path / "run")})
    monkeypatch.setattr(replicate, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(replicate, "cli", lambda *a: pytest.fail("trained again"))
    records = [{"instruction": f"q{i}", "output": "a"} for i in range(5)]
    settings = {**cfg.training.model_dump(mode="json"), "learning_rate": 2e-4, "epochs": 2, "seed": cfg.training.seed}
    model = tmp_path / "run" / "variants" / "sweep_point" / "model"
    write_json(model / "card.json", {"data": {"hash": replicate.data_hash(records), "trained_samples": 5},
                                     "config": settings, "steps": 2, "final_loss": 0.5, "seconds": 9.0,
                                     "bf16": False, "device": "cpu"})
    assert replicate.trained_before(cfg, records, settings) == model
    assert replicate.trained_before(cfg, records, {**settings, "learning_rate": 5e-4}) is None
    assert replicate.trained_before(cfg, records[:4], settings) is None
    assert replicate.train(cfg, "unused.yaml", "full_5", records, 2e-4, 2) == model
    recorded = json.loads((tmp_path / "results" / "trainings.json").read_text())["full_5"]
    assert recorded["samples"] == 5 and recorded["device"] == "cpu"


def test_variants_base_student_alone_scores_it_without_training(monkeypatch):
    "`variants --only base_student` scores the untrained student on test and trains nothing."
    evaluated, trained = [], []
    monkeypatch.setattr(replicate, "train_settings",
                        lambda source=None: {"learning_rate": 5e-5, "epochs": 1, "cap": 384})
    monkeypatch.setattr(replicate, "capped_corpus", lambda cfg, cap: [])
    monkeypatch.setattr(replicate, "evaluate", lambda cfg, model, name, split, limit, seeds, *a, **k:
                        evaluated.append((name, split, seeds)) or {"mean": 0.0})
    monkeypatch.setattr(replicate, "train", lambda *a, **k: trained.append(a))
    replicate.main(["variants", "--only", "base_student", "--seeds", "42"])
    assert evaluated == [("base_student", "test", [42])] and trained == []


def test_v3_variants_train_with_the_settings_v2s_sweep_chose_and_say_so(tmp_path, monkeypatch):
    """`--settings-from results/replication`: v3's students train with v2's chosen settings (the two replications then
    differ in their corpus only), and trainings.json records which sweep chose them; without either sweep, one line."""
    committed = ROOT / "results" / "replication"
    chosen = json.loads((committed / "sweep.json").read_text())["chosen"]
    monkeypatch.setattr(replicate, "RESULTS", tmp_path / "v3")
    (tmp_path / "v3").mkdir()
    monkeypatch.setattr(replicate, "SCORED", tmp_path / "v3" / "scored.jsonl")
    monkeypatch.setattr(replicate, "use_results", lambda cfg: replicate.RESULTS)  # v3's folder, here in tmp_path
    write_jsonl(replicate.SCORED, [{"id": "s0"}])
    caps, trained = [], []
    monkeypatch.setattr(replicate, "capped_corpus", lambda cfg, cap: caps.append(cap) or [{"id": "s0"}])
    monkeypatch.setattr(replicate, "evaluate", lambda *a, **k: {"mean": 0.0})
    monkeypatch.setattr(replicate, "train", lambda cfg, path, name, records, lr, epochs, **k:
                        trained.append((name, lr, epochs, k["chosen_in"])))
    replicate.main(["variants", "--config", "configs/replication-paper.yaml", "--only", "full", "--seeds", "42",
                    "--settings-from", str(committed)])
    assert caps == [chosen["cap"]]
    assert trained == [("full", chosen["learning_rate"], chosen["epochs"], str(committed / "sweep.json"))]
    with pytest.raises(replicate.CompeffdistError, match="sweep.json is missing.*--settings-from"):
        replicate.main(["variants", "--config", "configs/replication-paper.yaml", "--only", "full", "--seeds", "42"])


def _eval_command_spy(monkeypatch) -> list:
    "The eval command, run for real (in this process); returns the list of the seeds each run was asked for."
    from compeffdist.cli import main
    asked = []
    monkeypatch.setattr(replicate, "cli", lambda *args: asked.append(args[args.index("--seeds") + 1])
                        or main(list(args)))
    return asked


def _tiny_eval_config(tmp_path, monkeypatch):
    monkeypatch.setattr(replicate, "RESULTS", tmp_path / "results")
    return load_config(ROOT / "configs" / "replication.yaml", {
        "evaluation.datasets": ["sc/sst2"], "student.device": "cpu", "student.dtype": "float32",
        "student.batch_size": 4})


def test_evaluate_runs_the_eval_command_only_for_a_seed_not_scored(sentibench_root, tmp_path, monkeypatch):
    "A (dataset, seed) already scored with the same weights is not asked for again; a new seed is, alone."
    from compeffdist.pipeline import make_tiny_student
    student, cfg = str(make_tiny_student(tmp_path / "student")), _tiny_eval_config(tmp_path, monkeypatch)
    asked, out = _eval_command_spy(monkeypatch), tmp_path / "results" / "evals" / "test"
    replicate.evaluate(cfg, student, "student", "test", 4, [52, 62])
    scored = json.loads(result_path(out, "student").read_text())["datasets"]["sc/sst2"]["seeds"]
    stamp = prediction_path(out, "student", "sc/sst2", 52).stat().st_mtime_ns
    replicate.evaluate(cfg, student, "student", "test", 4, [52])  # scored: the command does not run
    res = replicate.evaluate(cfg, student, "student", "test", 4, [42, 52])
    assert asked == ["52,62", "42"]
    got = res["datasets"]["sc/sst2"]["seeds"]
    assert set(got) == {"42", "52", "62"} and got["52"] == scored["52"] and got["62"] == scored["62"]
    assert prediction_path(out, "student", "sc/sst2", 52).stat().st_mtime_ns == stamp  # seed 52 not scored again
    replicate.evaluate(cfg, student, "student", "test", 6, [42])  # more examples: every seed asked is scored
    assert asked[-1] == "42"


def test_evaluate_scores_a_student_retrained_in_place_again(sentibench_root, tmp_path, monkeypatch):
    "Other weights in the student's folder (same names and sizes): its seeds are scored again, nothing reused."
    from compeffdist.pipeline import make_tiny_student
    student, cfg = make_tiny_student(tmp_path / "student", seed=0), _tiny_eval_config(tmp_path, monkeypatch)
    other = make_tiny_student(tmp_path / "other", seed=1)
    asked, out = _eval_command_spy(monkeypatch), tmp_path / "results" / "evals" / "test"
    first = replicate.evaluate(cfg, str(student), "student", "test", 4, [42])
    shutil.copyfile(other / "model.safetensors", student / "model.safetensors")  # retrained into the same folder
    second = replicate.evaluate(cfg, str(student), "student", "test", 4, [42])
    assert asked == ["42", "42"] and second["identity"] != first["identity"]
    assert second["datasets"]["sc/sst2"]["seeds"]["42"]["reused"] == 0
    rows = read_jsonl(prediction_path(out, "student", "sc/sst2", 42))
    assert {r["model"] for r in rows} == {second["identity"]}


def test_device_reaches_the_training_and_the_scoring_of_each_student(tmp_path, monkeypatch):
    "`--device cuda` trains and scores the students there; without it, the config's `student.device` (cpu)."
    seen = []
    monkeypatch.setattr(replicate, "run_variants", lambda cfg, *a: seen.append(cfg.student.device))
    monkeypatch.setattr(replicate, "SCORED", tmp_path / "scored.jsonl")
    (tmp_path / "scored.jsonl").write_text("")
    replicate.main(["variants", "--only", "difficulty_50", "--device", "cuda"])
    replicate.main(["variants", "--only", "difficulty_50"])
    assert seen == ["cuda", "cpu"]
    cfg = load_config(ROOT / "configs" / "replication.yaml",
                      {"run.out": str(tmp_path / "run"), "student.device": "cuda", "evaluation.datasets": ["sc/sst2"]})
    monkeypatch.setattr(replicate, "RESULTS", tmp_path / "results")
    calls = []

    def fake_cli(*args):
        calls.append(args)
        if args[0] == "train":
            out = Path(args[args.index("--out") + 1])
            write_json(out / "card.json", {"data": {"hash": "h", "trained_samples": 1}, "config": {"learning_rate": 5e-5,
                       "epochs": 2}, "steps": 1, "final_loss": 1.0, "seconds": 1.0, "bf16": True, "device": "cuda"})
        else:
            raise SystemExit("scored")

    monkeypatch.setattr(replicate, "cli", fake_cli)
    model = replicate.train(cfg, "unused.yaml", "difficulty_50", [{"instruction": "q", "output": "a"}], 5e-5, 2)
    with pytest.raises(SystemExit):
        replicate.evaluate(cfg, str(model), "difficulty_50", "test", 10, [42])
    assert [c[c.index("--device") + 1] for c in calls] == ["cuda", "cuda"]
    assert json.loads((tmp_path / "results" / "trainings.json").read_text())["difficulty_50"]["device"] == "cuda"


def test_ceiling_records_are_the_benchmarks_train_splits_in_its_prompt_format(sentibench_root):
    "An equal share of each evaluated dataset's train split, each an evaluation prompt whose answer is its label."
    from compeffdist.data import load_sentibench, sentibench_dataset
    cfg = load_config(ROOT / "configs" / "replication.yaml")
    recs = replicate.ceiling_records(cfg, 80)
    assert len(recs) == 80 and Counter(r["source"] for r in recs) == {d: 10 for d in cfg.evaluation.datasets}
    assert replicate.ceiling_records(cfg, 80) == recs and [r["source"] for r in recs] != sorted(r["source"] for r in recs)
    for r in recs:
        ds = sentibench_dataset(r["source"])
        assert r["instruction"].count("\nLabel:") == cfg.evaluation.shots + 1 and r["instruction"].endswith("Label:")
        assert r["output"].split("(")[0] in {l.lower() for l in ds.labels}
        test_texts = {x["sentence"] for x in load_sentibench(ds.name, "test")}
        own = r["instruction"].rsplit("Sentence: ", 1)[1]
        assert own[:-len("\nLabel:")].strip() not in test_texts


def test_ceiling_settings_are_chosen_on_validation_in_their_own_sweep(tmp_path, monkeypatch):
    "The ceiling's coordinate search (learning rate, then epochs) is kept apart from the corpus's sweep.json."
    monkeypatch.setattr(replicate, "RESULTS", tmp_path)
    score = {(5e-5, 1): 50.0, (2e-4, 1): 53.0, (5e-4, 1): 49.0, (2e-4, 2): 52.0}
    out = replicate.sweep(None, "", replicate.CEILING_GRID,
                          lambda st: {**st, "val_mean": score[(st["learning_rate"], st["epochs"])]}, "ceiling_sweep.json")
    assert out["chosen"] == {"learning_rate": 2e-4, "epochs": 1} and not (tmp_path / "sweep.json").exists()


def test_ceiling_trains_every_record_whole(sentibench_root, tmp_path, monkeypatch):
    """The evaluation's prompts are longer than the corpus's samples: at `training.max_length` every imdb record would
    be dropped, at `CEILING_MAX_LENGTH` none is cut; each ceiling training is asked for that cap."""
    from compeffdist.models import load_tokenizer
    from compeffdist.training import tokenize_records
    cfg = load_config(ROOT / "configs" / "replication-paper.yaml", {"run.out": str(tmp_path / "run")})
    recs, tok = replicate.ceiling_records(cfg, 160), load_tokenizer(cfg.student.model)
    imdb = [r for r in recs if r["source"] == "sc/imdb"]
    assert len(imdb) == 20
    cap = cfg.training.max_length
    with pytest.raises(replicate.CompeffdistError, match=f"no training record fits max_length={cap}"):
        tokenize_records(tok, imdb, cap)  # every imdb prompt is longer than the corpus's cap
    whole = tokenize_records(tok, recs, replicate.CEILING_MAX_LENGTH)[1]
    assert whole["truncated"] == whole["dropped_too_long"] == 0 and whole["trained_samples"] == 160
    monkeypatch.setattr(replicate, "RESULTS", tmp_path / "results")
    asked = []

    def fake_cli(*args):  # the train command: say what it was asked, leave a model card
        asked.append(args[args.index("--max-length") + 1])
        write_json(Path(args[args.index("--out") + 1]) / "card.json", {
            "data": {"hash": str(len(asked)), "trained_samples": 1}, "steps": 1, "final_loss": 0.1,
            "config": {"learning_rate": float(args[args.index("--lr") + 1]),
                       "epochs": float(args[args.index("--epochs") + 1])},
            "seconds": 1.0, "bf16": False, "device": "cpu"})
    monkeypatch.setattr(replicate, "cli", fake_cli)
    monkeypatch.setattr(replicate, "ceiling_records", lambda cfg, n=3000: recs[:2])
    monkeypatch.setattr(replicate, "evaluate", lambda *a, **k: {"mean": 50.0})
    replicate.run_ceiling(cfg, "unused.yaml", [42])
    assert asked == [str(replicate.CEILING_MAX_LENGTH)] * 5  # four sweep points and the ceiling itself
    trainings = json.loads((tmp_path / "results" / "trainings.json").read_text())
    assert trainings["ceiling"]["settings_chosen_in"] == str(tmp_path / "results" / "ceiling_sweep.json")


def test_each_replication_keeps_its_own_results_folder(monkeypatch):
    "The folder of the config's committed call cache: v2's results/replication, v3's results/replication-paper."
    monkeypatch.setattr(replicate, "RESULTS", replicate.RESULTS)
    monkeypatch.setattr(replicate, "SCORED", replicate.SCORED)
    for name, folder in (("replication-paper", "results/replication-paper"), ("replication", "results/replication")):
        assert replicate.use_results(load_config(ROOT / "configs" / f"{name}.yaml")) == Path(folder)
        assert replicate.SCORED == Path(folder) / "scored.jsonl"


def test_reuse_copies_the_rows_a_corpus_does_not_change_and_refuses_others(sentibench_root, tmp_path, monkeypatch):
    "v3 takes v2's base student and teacher (same weights, same protocol) byte for byte; anything else is refused."
    committed = ROOT / "results" / "replication"
    monkeypatch.setattr(replicate, "RESULTS", tmp_path / "v3")
    cfg = load_config(ROOT / "configs" / "replication-paper.yaml")
    assert replicate.reuse(cfg, committed, ["base_student", "teacher"]) == ["base_student", "teacher"]
    for name in ("base_student", "teacher"):
        assert result_path(tmp_path / "v3" / "evals" / "test", name).read_bytes() == \
            result_path(committed / "evals" / "test", name).read_bytes()
    cells = replicate.scored_cells(cfg)
    monkeypatch.setattr(replicate, "RESULTS", committed)
    v2 = replicate.scored_cells(cfg)
    assert set(cells) == {"base_student", "teacher"} and all(cells[m] == v2[m] for m in cells)
    with pytest.raises(replicate.CompeffdistError, match="depends on the corpus"):
        replicate.reuse(cfg, committed, ["full"])
    other = tmp_path / "other"  # the same files, scored with another number of examples
    shutil.copytree(committed / "evals" / "test" / "predictions" / "base_student",
                    other / "evals" / "test" / "predictions" / "base_student")
    res = json.loads(result_path(committed / "evals" / "test", "base_student").read_text())
    res["protocol"]["limit"] = 100
    write_json(result_path(other / "evals" / "test", "base_student"), res)
    with pytest.raises(replicate.CompeffdistError, match="scored with"):
        replicate.reuse(cfg, other, ["base_student"])
    res["protocol"]["limit"], res["identity"] = 200, "smollm2-135m-instruct@1-000000000000"
    write_json(result_path(other / "evals" / "test", "base_student"), res)
    with pytest.raises(replicate.CompeffdistError, match="this config's base_student is"):
        replicate.reuse(cfg, other, ["base_student"])
