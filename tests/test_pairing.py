"""Pairing: corpus size and balance per instruction and kind, no repeated pair, even text reuse, attribute matching
with counted fallback, demonstrations, bad input, the stage with real run-folder files."""
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from compeffdist.core import (CompeffdistError, Config, ModelConfig, PairingConfig, RunStore, StageStats, read_jsonl,
                              write_json, write_jsonl)
from compeffdist.engines import RunContext
from compeffdist.pairing import Deck, clean_instructions, pair_samples, render_prompt, run_pairing, text_clusters


def instructions(n_analysis, n_task, n_clusters=3, demos=4):
    out = [{"id": f"a{i}", "cluster_id": i % n_clusters, "kind": "analysis", "task_name": "analysis",
            "task_type": "analysis", "instruction": f"Analyze aspect {i} of this text.", "output_format": {},
            "demonstrations": []} for i in range(n_analysis)]
    out += [{"id": f"t{i}", "cluster_id": i % n_clusters, "kind": "task", "task_name": f"task {i}",
             "task_type": "closed_classification", "instruction": f"Classify property {i}. Answer yes or no.",
             "output_format": {"labels": ["yes", "no"]},
             "demonstrations": [{"input": f"demo text {j}", "output": "yes" if j % 2 else "no", "source": "seed"}
                                for j in range(demos)]} for i in range(n_task)]
    return out


def texts(n):
    return [{"id": f"x{i}", "text": f"user text number {i}, with an opinion.", "source": "test"} for i in range(n)]


@settings(max_examples=40, deadline=None)
@given(n_a=st.integers(0, 5), n_t=st.integers(0, 8), n_texts=st.integers(1, 40), n=st.integers(1, 120),
       seed=st.integers(0, 99))
def test_counts_balance_and_no_repeated_pairs(n_a, n_t, n_texts, n, seed):
    if n_a + n_t == 0:
        return
    stats = StageStats()
    got = pair_samples(instructions(n_a, n_t), texts(n_texts), PairingConfig(n_samples=n, seed=seed), stats=stats)
    assert len(got) + stats.counts["capped_pairs"] == n
    assert len({(s["instruction_id"], s["text_id"]) for s in got}) == len(got)
    assert len({s["id"] for s in got}) == len(got)
    per = Counter(s["instruction_id"] for s in got)
    if not stats.counts["capped_pairs"]:
        for kind in ("a", "t"):
            c = [per[i] for i in per if i.startswith(kind)] + [0] * sum(
                1 for i in range((n_a if kind == "a" else n_t)) if f"{kind}{i}" not in per)
            assert not c or max(c) - min(c) <= 1
        reuse = Counter(s["text_id"] for s in got)
        assert max(reuse.values()) - min(reuse.values(), default=0) <= 1 or len(reuse) < n_texts


def test_analysis_fraction():
    got = pair_samples(instructions(2, 6), texts(100), PairingConfig(n_samples=200, analysis_fraction=0.25))
    kinds = Counter(s["kind"] for s in got)
    assert kinds == {"analysis": 50, "task": 150}
    got = pair_samples(instructions(2, 6), texts(100), PairingConfig(n_samples=200))  # proportional: 2/8
    assert Counter(s["kind"] for s in got) == {"analysis": 50, "task": 150}
    got = pair_samples(instructions(0, 3), texts(100), PairingConfig(n_samples=30, analysis_fraction=0.5))
    assert Counter(s["kind"] for s in got) == {"task": 30}  # no analysis instruction: all to tasks


def test_unbalanced_draw_still_sums():
    got = pair_samples(instructions(3, 3), texts(50), PairingConfig(n_samples=90, balance=False, seed=1))
    per = Counter(s["instruction_id"] for s in got)
    assert len(got) == 90 and len(set(per.values())) > 1


def test_seeded():
    cfg = PairingConfig(n_samples=40, seed=5)
    a = pair_samples(instructions(2, 3), texts(30), cfg)
    assert a == pair_samples(instructions(2, 3), texts(30), cfg)
    assert a != pair_samples(instructions(2, 3), texts(30), PairingConfig(n_samples=40, seed=6))


def test_prompt_rendering_and_demonstrations():
    ins = instructions(1, 1, demos=5)
    ins[1]["demonstrations"].append({"input": "user text number 0, with an opinion.", "output": "no"})
    got = pair_samples(ins, texts(3), PairingConfig(n_samples=6, demos_per_task=2))
    for s in got:
        assert s["instruction"].endswith(f"Input: {s['text']}")
        n_demo = s["instruction"].count("\nOutput: ")
        assert n_demo == (2 if s["kind"] == "task" else 0)
        assert s["instruction"].count(s["text"]) == 1  # the paired text is never also a demonstration
        if s["kind"] == "analysis":
            assert s["instruction"].split("\n\nInput:")[0] == "Analyze aspect 0 of this text."
    assert render_prompt("Do X.", "t", [{"input": "i", "output": ["a", "b"]}]) == 'Do X.\n\nInput: i\nOutput: ["a", "b"]\n\nInput: t'


def test_attribute_matching():
    ta = [{"id": f"x{i}", "text": "t", "attributes": [{"name": ["tone", "irony", "joy"][i % 3]}, {"name": "rare"}]}
          for i in range(30)]
    clusters = text_clusters(ta, {"tone": 0, "irony": 1, "joy": 2})
    assert clusters == {c: sorted(f"x{i}" for i in range(30) if i % 3 == c) for c in range(3)}
    stats = StageStats()
    got = pair_samples(instructions(3, 3), texts(30), PairingConfig(n_samples=72, method="attribute"),
                       clusters=clusters, stats=stats)
    assert len(got) == 72 and stats.counts["attribute_fallback"] == 6 * (12 - 10)
    for s in got:
        assert (s["text_id"] in clusters[s["cluster_id"]]) == (s["paired_by"] == "attribute")
    with pytest.raises(CompeffdistError, match="attribute"):
        pair_samples(instructions(1, 1), texts(5), PairingConfig(method="attribute"))


def test_bad_input():
    stats = StageStats()
    bad = [None, {"id": 1}, {"id": 2, "instruction": "x"}, {"id": 3, "instruction": "x", "kind": "task"},
           {"id": 3, "instruction": "y", "kind": "task"}, {"instruction": "z", "kind": "analysis"}]
    kept = clean_instructions(bad, stats)
    assert [k["id"] for k in kept] == [3] and kept[0]["task_name"] == "3" and kept[0]["output_format"] == {}
    assert stats.drops == {"instruction_not_a_record": 1, "instruction_without_text": 1, "instruction_bad_kind": 1,
                           "instruction_duplicate_id": 1, "instruction_without_id": 1}
    stats = StageStats()
    got = pair_samples(instructions(1, 0), texts(3) + [{"id": "e", "text": "  "}, {"text": "no id"}],
                       PairingConfig(n_samples=5), stats=stats)
    assert len(got) == 3 and stats.counts["capped_pairs"] == 2 and stats.drops["text_malformed"] == 2
    with pytest.raises(CompeffdistError, match="no valid instruction"):
        pair_samples(bad[:3], texts(3), PairingConfig())
    with pytest.raises(CompeffdistError, match="no user text"):
        pair_samples(instructions(1, 1), [], PairingConfig())


def test_deck_deals_evenly():
    import random
    d = Deck(range(10), random.Random(0))
    dealt = Counter(x for i in range(50) for x in d.deal(4, exclude={i % 10, (i + 3) % 10}))
    assert sum(dealt.values()) == 200 and max(dealt.values()) - min(dealt.values()) <= 1


def test_stage(tmp_path):
    store = RunStore(tmp_path / "run")
    write_jsonl(store.path("instructions", "instructions.jsonl"), instructions(2, 4))
    write_jsonl(store.path("texts", "texts.jsonl"), texts(20))
    cfg = Config(teacher=ModelConfig(model="x"), student=ModelConfig(model="x"), pairing=PairingConfig(n_samples=30))
    stats = run_pairing(RunContext(cfg, store))
    got = read_jsonl(store.path("pairing", "samples.jsonl"))
    assert len(got) == 30 == stats.counts["samples_out"]
    keys = {"id", "instruction_id", "cluster_id", "task_name", "kind", "task_type", "output_format", "text_id", "text",
            "instruction"}
    assert all(keys <= set(s) for s in got)
    cfg.pairing.method = "attribute"
    with pytest.raises(CompeffdistError, match="text_attributes.jsonl"):
        run_pairing(RunContext(cfg, store))
    write_jsonl(store.path("attributes", "text_attributes.jsonl"),
                [{"id": t["id"], "text": t["text"], "attributes": [{"name": "tone"}]} for t in texts(20)[:8]])
    write_json(store.path("clustering", "attribute_to_cluster.json"), {"tone": 1})
    stats = run_pairing(RunContext(cfg, store))
    got = read_jsonl(store.path("pairing", "samples.jsonl"))
    assert all(s["paired_by"] == "attribute" for s in got if s["cluster_id"] == 1)
    assert stats.info["clusters_with_texts"] == 1


def test_demo_run_pairing_is_reproduced():
    "The committed demo run: its instruction set, texts and config give exactly the samples the run wrote."
    from compeffdist.core import load_config
    from pathlib import Path
    fx = Path(__file__).resolve().parent / "fixtures" / "demo_run"
    cfg = load_config(fx / "config.yaml")
    st = StageStats()
    got = pair_samples(read_jsonl(fx / "instructions" / "instructions.jsonl"), read_jsonl(fx / "texts" / "texts.jsonl"),
                       cfg.pairing, stats=st)
    assert got == read_jsonl(fx / "pairing" / "samples.jsonl")
    import json
    assert dict(st.counts) == {k: v for k, v in json.loads((fx / "pairing" / "manifest.json").read_text())["stats"]["counts"].items()
                               if k not in ("instructions_in", "texts_in")}
