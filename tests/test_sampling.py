"""Difficulty-prioritised sampling, checked statistically (never an exact float): the expected kept fraction over
many seeds, monotonicity in difficulty for a = 1, per-instruction balance, the hard / random baselines, groups,
reference-format keys, the stage and the CLI."""
import math
import random

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from compeffdist.cli import main
from compeffdist.core import (CompeffdistError, Config, ModelConfig, RunStore, SamplingConfig, StageStats, read_jsonl,
                              write_jsonl)
from compeffdist.engines import RunContext
from compeffdist.sampling import (difficulty_value, exponent_for_rate, group_key, keep_probabilities, run_sampling,
                                  sample_records, select, selection_probability, stochastic_round)


def values(n, seed=0):
    return np.random.default_rng(seed).gamma(1.5, 0.2, n).tolist()


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("a", [0.25, 0.6, 1.0])
def test_selection_function_integrates_to_the_rate(rate, a):
    b = exponent_for_rate(rate)
    xs = (np.arange(200_000) + 0.5) / 200_000
    assert abs(np.mean([selection_probability(x, a, b) for x in xs[::50]]) - rate) < 2e-3
    assert max(selection_probability(x, a, b) for x in xs[::50]) <= 1.0
    assert math.isclose(selection_probability(a, a, b), 1.0)


@pytest.mark.parametrize("n,rate,a", [(7, 0.5, 1.0), (40, 0.3, 1.0), (200, 0.1, 1.0), (333, 0.5, 0.4), (1000, 0.2, 0.8)])
def test_kept_fraction_matches_expectation_over_seeds(n, rate, a):
    v = values(n)
    counts = np.array([len(select(v, [0] * n, rate, "soft", a, seed=s)[0]) for s in range(400)])
    p = np.array(keep_probabilities(n, rate, a))
    expected, sd = p.sum(), math.sqrt((p * (1 - p)).sum())  # Poisson-binomial mean and standard deviation
    assert abs(counts.mean() - expected) < 4 * sd / math.sqrt(len(counts)) + 1e-9
    assert abs(counts.std() - sd) < 0.25 * sd + 0.5
    if n >= 200:
        assert abs(expected / n - rate) < 0.01  # the midpoint rule is close to the integral r


def test_keep_rate_is_monotone_in_difficulty_when_a_is_1():
    n, seeds = 500, 300
    v = values(n, 1)
    hits = np.zeros(n)
    for s in range(seeds):
        hits[select(v, [0] * n, 0.3, seed=s)[0]] += 1
    order = np.argsort(v)
    by_quintile = [hits[order[q * 100:(q + 1) * 100]].mean() / seeds for q in range(5)]
    assert all(np.diff(by_quintile) > 0), by_quintile
    expected = [np.mean(keep_probabilities(n, 0.3)[q * 100:(q + 1) * 100]) for q in range(5)]
    assert np.allclose(by_quintile, expected, atol=0.03)


def test_peak_in_the_middle_keeps_middle_difficulty():
    n = 600
    v = values(n, 2)
    hits = np.zeros(n)
    for s in range(200):
        hits[select(v, [0] * n, 0.4, a=0.5, seed=s)[0]] += 1
    order = np.argsort(v)
    thirds = [hits[order[t * 200:(t + 1) * 200]].mean() for t in range(3)]
    assert thirds[1] > thirds[0] and thirds[1] > thirds[2]


def test_per_instruction_balance():
    rng = random.Random(0)
    recs = []
    for g in range(6):
        shift = 3.0 * (g == 0)  # one instruction is much harder than the others
        n = rng.randint(20, 120)
        recs += [{"cluster_id": g, "task_name": f"task{g}", "difficulty": {"rank": shift + rng.random()}} for _ in range(n)]
    sizes = {g: sum(r["cluster_id"] == g for r in recs) for g in range(6)}
    frac = {g: [] for g in range(6)}
    glob = []
    for s in range(200):
        kept = sample_records(recs, 0.3, group="instruction", seed=s)
        for g in range(6):
            frac[g].append(sum(k["cluster_id"] == g for k in kept) / sizes[g])
        glob.append(sum(k["cluster_id"] == 0 for k in sample_records(recs, 0.3, group="global", seed=s)) / sizes[0])
    for g in range(6):
        expected = sum(keep_probabilities(sizes[g], 0.3)) / sizes[g]
        assert abs(np.mean(frac[g]) - expected) < 0.03
    assert np.mean(glob) > 0.6  # a global ranking gives the hard instruction far more than its share


def test_hard_and_random_baselines():
    v = values(301)
    for s in range(20):
        kept, _ = select(v, [0] * 301, 0.3, "hard", seed=s)
        assert len(kept) in (90, 91)  # stochastic rounding of 90.3
        assert min(v[i] for i in kept) >= sorted(v)[-len(kept)]
    sizes = [len(select(v, [0] * 301, 0.3, "random", seed=s)[0]) for s in range(300)]
    assert set(sizes) <= {90, 91} and abs(np.mean(sizes) - 90.3) < 0.1
    groups = [i % 3 for i in range(301)]
    kept, _ = select(v, groups, 0.5, "hard", seed=0)
    for g in range(3):
        idx = [i for i in range(301) if groups[i] == g]
        mine = [i for i in kept if groups[i] == g]
        assert set(mine) == set(sorted(idx, key=lambda i: v[i])[len(idx) - len(mine):])


def test_stochastic_round_is_unbiased():
    rng = random.Random(0)
    xs = [stochastic_round(2.3, rng) for _ in range(20_000)]
    assert set(xs) == {2, 3} and abs(np.mean(xs) - 2.3) < 0.02


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 60), rate=st.floats(0.01, 1.0), a=st.floats(0.01, 1.0), seed=st.integers(0, 1000),
       method=st.sampled_from(["soft", "hard", "random"]))
def test_select_never_crashes_and_is_seeded(n, rate, a, seed, method):
    v = values(n, seed) if n else []
    groups = [i % 4 for i in range(n)]
    kept, prob = select(v, groups, rate, method, a, seed)
    assert kept == sorted(set(kept)) and all(0 <= i < n for i in kept)
    assert all(0 <= p <= 1 for p in prob)
    assert select(v, groups, rate, method, a, seed)[0] == kept


def test_ties_are_broken_at_random():
    v = [0.0] * 100  # every item equally easy: position in the input must not decide
    first = np.zeros(100)
    for s in range(400):
        first[select(v, [0] * 100, 0.5, seed=s)[0]] += 1
    assert abs(first[:50].mean() - first[50:].mean()) < 0.1 * 400


def test_groups_and_keys():
    assert group_key({"selected_cluster_id": 2, "task_name": "t"}) == (2, "t")
    assert group_key({"cluster_id": 1, "task_name": "analysis", "instruction_id": "a7"}) == (1, "analysis", "a7")
    a = {"cluster_id": 1, "task_name": "analysis", "instruction": "Analyze A.\n\nInput: x"}
    b = {"cluster_id": 1, "task_name": "analysis", "instruction": "Analyze B.\n\nInput: x"}
    assert group_key(a) != group_key(b)
    assert difficulty_value({"difficulty": {"rank": 1}}) == 1.0
    assert difficulty_value({"difficulty": {"rank": True}}) is None
    assert difficulty_value({"result": {"avg_rank_score": 0.3}}, "avg_rank_score") == 0.3


def test_bad_records_are_counted_not_fatal():
    recs = [{"cluster_id": 0, "task_name": "t", "difficulty": {"rank": x}} for x in values(50)]
    recs += [{"cluster_id": 0, "task_name": "t"}, {"difficulty": {"rank": float("inf")}}, "junk", {"difficulty": None}]
    stats = StageStats()
    kept = sample_records(recs, 0.5, stats=stats)
    assert stats.drops == {"no_rank": 3, "not_a_record": 1}
    assert all(isinstance(k, dict) and difficulty_value(k) is not None for k in kept)
    with pytest.raises(CompeffdistError, match="rate"):
        sample_records(recs, 1.5)
    with pytest.raises(CompeffdistError, match="group"):
        sample_records(recs, 0.5, group="cluster")


def test_stage(tmp_path):
    store = RunStore(tmp_path / "run")
    recs = [{"id": i, "cluster_id": i % 4, "task_name": "t", "difficulty": {"rank": x, "ifd": 1 - x}}
            for i, x in enumerate(values(200))]
    write_jsonl(store.path("difficulty", "scored.jsonl"), recs)
    cfg = Config(teacher=ModelConfig(model="x"), student=ModelConfig(model="x"),
                 sampling=SamplingConfig(rate=0.25, method="hard", key="ifd"))
    stats = run_sampling(RunContext(cfg, store))
    kept = read_jsonl(store.path("sampling", "kept.jsonl"))
    assert len(kept) == stats.counts["samples_kept"] == 50 and stats.info["groups"] == 4
    assert [k["id"] for k in kept] == sorted(k["id"] for k in kept)
    for g in range(4):  # hardest by ifd = easiest by rank
        ids = {k["id"] for k in kept if k["cluster_id"] == g}
        grp = sorted((r for r in recs if r["cluster_id"] == g), key=lambda r: r["difficulty"]["ifd"])
        assert ids == {r["id"] for r in grp[-len(ids):]}
    write_jsonl(store.path("difficulty", "scored.jsonl"), [{"id": 1}])
    with pytest.raises(CompeffdistError, match="kept no sample"):
        run_sampling(RunContext(cfg, store))


def test_cli(tmp_path, capsys):
    recs = [{"id": i, "selected_cluster_id": i % 5, "task_name": "t", "avg_rank_score": x}
            for i, x in enumerate(values(400))]
    write_jsonl(tmp_path / "scored.jsonl", recs)
    sizes = []
    for seed in range(30):
        assert main(["sample", "--input", str(tmp_path / "scored.jsonl"), "--output", str(tmp_path / "kept.jsonl"),
                     "--rate", "0.5", "--method", "soft", "--group", "instruction", "--a", "1", "--seed", str(seed),
                     "--key", "avg_rank_score"]) == 0
        sizes.append(len(read_jsonl(tmp_path / "kept.jsonl")))
    assert abs(np.mean(sizes) - 200) < 4 * math.sqrt(100 / 30) + 1 and len(set(sizes)) > 1
    assert "5 group(s)" in capsys.readouterr().err
    for bad, msg in [(["--rate", "0"], "rate"), (["--rate", "0.5", "--a", "0"], "peak"),
                     (["--rate", "0.5", "--key", "rank"], "no record has a 'rank' difficulty")]:
        rc = main(["sample", "--input", str(tmp_path / "scored.jsonl"), "--output", str(tmp_path / "k.jsonl"), *bad])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1
    assert main(["sample", "--input", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "k.jsonl"),
                 "--rate", "0.5"]) == 2


def test_demo_run_sampling_is_reproduced():
    "The committed demo run: its scored corpus and sampling config give exactly the samples the run kept."
    import json
    from pathlib import Path
    from compeffdist.core import load_config, read_jsonl as _read
    fx = Path(__file__).resolve().parent / "fixtures" / "demo_run"
    c = load_config(fx / "config.yaml").sampling
    kept = sample_records(_read(fx / "difficulty" / "scored.jsonl"), c.rate, c.method, c.group, c.a, c.seed, c.key)
    assert kept == _read(fx / "sampling" / "kept.jsonl")
    assert len(kept) == json.loads((fx / "sampling" / "manifest.json").read_text())["stats"]["counts"]["samples_kept"]
