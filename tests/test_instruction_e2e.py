"""End to end: SentiBench texts -> attributes -> clusters -> instruction set, with the bundled offline teacher
(qwen2.5-coder-1.5b-instruct on llama.cpp, CPU) behind a real SQLite call cache. Asserts structure and counts, never
wording. The default test uses a handful of texts and small token budgets; the slow one about 20 texts."""
import json

import pytest

from compeffdist.attributes import run_attributes
from compeffdist.clustering import run_clustering
from compeffdist.core import RunStore, parse_config, read_json, read_jsonl
from compeffdist.data import run_texts
from compeffdist.engines import RunContext
from compeffdist.instructions import TASK_TYPES, check_output, run_instructions

STAGES = [("texts", run_texts), ("attributes", run_attributes), ("clustering", run_clustering),
          ("instructions", run_instructions)]
TEACHER = {"model": "qwen2.5-coder-1.5b-instruct", "engine": "llamacpp", "context_length": 4096,
           "n_threads": 1}  # one thread: far faster than two on a small CPU shared with other jobs


@pytest.fixture(scope="module")
def teacher():
    pytest.importorskip("llama_cpp")
    from compeffdist.core import ModelConfig
    from compeffdist.engines import make_engine
    eng = make_engine(ModelConfig(**TEACHER))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def embedder():
    from compeffdist.models import load_embedder
    return load_embedder("all-minilm-l6-v2")


def config(out, n_texts: int, small: bool):
    tok = (lambda n, t=0.7: {"temperature": t, "max_new_tokens": n})
    instructions = ({"max_clusters": 1, "analysis_per_cluster": 2, "max_tasks_per_cluster": 1, "min_examples": 2,
                     "demo_prompts_per_task": 1, "analysis_decoding": tok(90), "tasks_decoding": tok(100),
                     "rewrite_decoding": tok(220), "demos_decoding": tok(120, 1.0)} if small else
                    {"max_clusters": 3, "analysis_per_cluster": 4, "max_tasks_per_cluster": 2, "min_examples": 4,
                     "demo_prompts_per_task": 2, "analysis_decoding": tok(200), "tasks_decoding": tok(256),
                     "rewrite_decoding": tok(400), "demos_decoding": tok(200, 1.0)})
    return parse_config({
        "run": {"name": "e2e", "out": str(out)},
        "teacher": TEACHER,
        "student": {"model": "smollm2-135m-instruct"},
        "data": {"sources": [{"type": "sentibench", "split": "train",
                              "datasets": ["sc/sst2", "sc/twitter"] if small else ["sc/yelp2", "sc/sst2", "sc/twitter"]}],
                 "n_texts": n_texts, "max_chars": 300},
        "attributes": {"decoding": tok(120 if small else 220, 1.0), "max_attributes_per_text": 3 if small else 6,
                       "min_count": 0},
        "clustering": {"percentile": 50},
        "instructions": instructions,
    })


def run_all(cfg, teacher, embedder):
    ctx = RunContext(cfg, RunStore(cfg.run.out), teacher=teacher, embedder=embedder, progress=False)
    stats = {name: fn(ctx) for name, fn in STAGES}
    return ctx, stats


def check_run(ctx, stats, n_texts):
    s = ctx.store
    texts = read_jsonl(s.path("texts", "texts.jsonl"))
    assert len(texts) == n_texts
    ta = read_jsonl(s.path("attributes", "text_attributes.jsonl"))
    kept = read_jsonl(s.path("attributes", "attributes.jsonl"))
    a = stats["attributes"]
    assert [r["id"] for r in ta] == [t["id"] for t in texts] and a.counts["texts_in"] == n_texts
    assert a.counts["texts_with_attributes"] >= 1 and kept
    assert sum(x["count"] for x in kept) == a.counts["mentions_kept"] == sum(len(r["attributes"]) for r in ta)
    for r in ta:
        for x in r["attributes"]:
            assert set(x) == {"name", "raw_name", "description", "value"} and x["name"] == x["name"].lower()
    assert a.info["teacher"]["generated"] + a.info["teacher"]["cached"] == n_texts

    clusters = read_jsonl(s.path("clustering", "clusters.jsonl"))
    a2c = read_json(s.path("clustering", "attribute_to_cluster.json"))
    assert sorted(a2c) == sorted(x["name"] for x in kept)
    assert [c["cluster_id"] for c in clusters] == list(range(len(clusters))) == list(range(stats["clustering"].counts["clusters"]))

    recs = read_jsonl(s.path("instructions", "instructions.jsonl"))
    i = stats["instructions"]
    n_clusters = min(len(clusters), ctx.cfg.instructions.max_clusters)
    assert i.counts["clusters"] == n_clusters
    assert len(recs) == i.counts["instructions"] == i.counts["analysis_instructions"] + i.counts["task_instructions"]
    assert len(recs) >= 1 and len({r["id"] for r in recs}) == len(recs)
    for r in recs:
        assert r["cluster_id"] < n_clusters and r["instruction"].strip()
        if r["kind"] == "analysis":
            assert (r["task_name"], r["task_type"], r["output_format"], r["demonstrations"]) == ("analysis", "analysis", {}, [])
        else:
            assert r["kind"] == "task" and r["task_type"] in TASK_TYPES and r["demonstrations"]
            for d in r["demonstrations"]:
                assert d["source"] in ("seed", "generated")
                assert check_output(r["task_type"], r["output_format"], d["input"], d["output"]) == (d["output"], "ok")
    return recs


def rerun_is_free(cfg, teacher, embedder):
    "A second run over the same folder and cache generates nothing and writes the same instruction set."
    before = open(cfg.run.out + "/instructions/instructions.jsonl", encoding="utf-8").read()
    ctx, stats = run_all(cfg, teacher, embedder)
    assert ctx.teacher.stats.misses == 0 and ctx.teacher.stats.hits > 0
    assert all(step["generated"] == 0 for step in stats["instructions"].info["teacher"].values())
    assert open(cfg.run.out + "/instructions/instructions.jsonl", encoding="utf-8").read() == before


def test_small_end_to_end(tmp_path, sentibench_root, teacher, embedder):
    cfg = config(tmp_path / "run", n_texts=3, small=True)
    ctx, stats = run_all(cfg, teacher, embedder)
    recs = check_run(ctx, stats, 3)
    print(json.dumps({k: v.to_dict() for k, v in stats.items()}, indent=1)[:4000])
    print(f"{len(recs)} instructions; teacher: {ctx.teacher.stats.to_dict()}")
    rerun_is_free(cfg, teacher, embedder)


@pytest.mark.slow
def test_twenty_texts_end_to_end(tmp_path, sentibench_root, teacher, embedder):
    cfg = config(tmp_path / "run", n_texts=20, small=False)
    ctx, stats = run_all(cfg, teacher, embedder)
    recs = check_run(ctx, stats, 20)
    kinds = [r["kind"] for r in recs]
    assert kinds.count("analysis") >= 2 and kinds.count("task") >= 1
    assert stats["attributes"].counts["texts_with_attributes"] >= 15
    print(json.dumps({k: v.to_dict() for k, v in stats.items()}, indent=1)[:6000])
    print(f"{len(recs)} instructions; teacher: {ctx.teacher.stats.to_dict()}")
    rerun_is_free(cfg, teacher, embedder)
