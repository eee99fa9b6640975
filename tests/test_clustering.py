"""The `clustering` stage with the real offline embedder (all-MiniLM-L6-v2) and scikit-learn."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from compeffdist.clustering import (build_clusters, cluster_attributes, embed_names, failure_signatures,
                                    frequency_copies, run_clustering)
from compeffdist.core import (ClusteringConfig, CompeffdistError, Config, ModelConfig, RunStore, read_json,
                              read_jsonl, write_jsonl)
from compeffdist.engines import RunContext

NAMES = {  # groups of near-synonymous attribute names a teacher produces
    "tone": ["tone", "overall tone", "tone of voice", "writing tone"],
    "intensity": ["emotional intensity", "intensity of emotion", "strength of feeling"],
    "sarcasm": ["sarcasm", "sarcastic remarks", "irony"],
    "target": ["target of criticism", "criticized aspect", "object of complaint"],
    "politeness": ["politeness", "courtesy", "rudeness"],
    "recommendation": ["recommendation", "willingness to recommend", "advice to readers"],
    "price": ["price sensitivity", "value for money", "cost complaints"],
    "humor": ["humor", "humour", "jokes"],
}


@pytest.fixture(scope="module")
def embedder():
    from compeffdist.models import load_embedder
    return load_embedder("all-minilm-l6-v2")


def _attrs():
    rng = np.random.default_rng(0)
    return [{"name": n, "count": int(rng.integers(1, 60)), "description": f"how the text shows {n}"}
            for group in NAMES.values() for n in group]


def _ctx(tmp_path, embedder, **clustering):
    cfg = Config(teacher=ModelConfig(model="fake"), student=ModelConfig(model="fake"),
                 clustering=ClusteringConfig(**clustering))
    return RunContext(cfg, RunStore(tmp_path), embedder=embedder, progress=False)


@pytest.mark.parametrize("method,extra", [("affinity", {"percentile": 50}), ("affinity", {}),
                                          ("kmeans", {"n_clusters": 8})])
def test_stage_outputs_are_consistent(tmp_path, embedder, method, extra):
    ctx = _ctx(tmp_path, embedder, method=method, **extra)
    attrs = _attrs()
    write_jsonl(ctx.store.path("attributes", "attributes.jsonl"), attrs)
    stats = run_clustering(ctx)
    clusters = read_jsonl(ctx.store.path("clustering", "clusters.jsonl"))
    a2c = read_json(ctx.store.path("clustering", "attribute_to_cluster.json"))
    assert stats.counts["clusters"] == len(clusters) >= 1
    assert [c["cluster_id"] for c in clusters] == list(range(len(clusters)))
    assert [c["total_count"] for c in clusters] == sorted((c["total_count"] for c in clusters), reverse=True)
    assert sorted(a2c) == sorted(a["name"] for a in attrs)
    assert sum(c["total_count"] for c in clusters) == sum(a["count"] for a in attrs)
    for c in clusters:
        assert [a["count"] for a in c["attributes"]] == sorted((a["count"] for a in c["attributes"]), reverse=True)
        assert all(a2c[a["name"]] == c["cluster_id"] for a in c["attributes"])
        assert c["exemplar"] in {a["name"] for a in c["attributes"]}
    if method == "kmeans":
        assert len(clusters) == 8


def test_synonyms_share_a_cluster_without_weighting(embedder):
    attrs = _attrs()
    emb = embed_names(embedder, [a["name"] for a in attrs])
    labels, report = cluster_attributes(emb, [a["count"] for a in attrs],
                                        ClusteringConfig(percentile=0.5, frequency_weighting=False))
    lab = dict(zip((a["name"] for a in attrs), labels))
    assert report["converged"] and 2 <= labels.max() + 1 < len(attrs)
    # the closest spellings end up together; unrelated groups do not all merge
    assert lab["humor"] == lab["humour"] and lab["tone"] == lab["overall tone"]
    assert lab["emotional intensity"] == lab["intensity of emotion"]
    assert len({lab[g[0]] for g in NAMES.values()}) >= 5


def test_reference_percentile_gives_fewer_clusters(embedder):
    attrs = _attrs()
    emb = embed_names(embedder, [a["name"] for a in attrs])
    counts = [a["count"] for a in attrs]
    low, _ = cluster_attributes(emb, counts, ClusteringConfig(percentile=0.5))
    high, _ = cluster_attributes(emb, counts, ClusteringConfig(percentile=90))
    assert low.max() < high.max()


def test_non_convergence_falls_back_and_is_reported(tmp_path, embedder):
    ctx = _ctx(tmp_path, embedder, max_iter=2, convergence_iter=1)
    write_jsonl(ctx.store.path("attributes", "attributes.jsonl"), _attrs())
    with pytest.warns(UserWarning, match="non_convergence"):
        stats = run_clustering(ctx)
    assert stats.counts["failure_non_convergence"] == 1 and stats.info["fallback"] == "kmeans"
    assert stats.counts["clusters"] == round(len(_attrs()) / 10)


def test_failure_signatures():
    cfg = ClusteringConfig(giant_cluster_fraction=0.25)
    sig = lambda labels: [f["signature"] for f in failure_signatures(np.asarray(labels), cfg)]
    assert sig([0] * 40) == ["collapse", "giant_cluster"]
    assert sig(list(range(40))) == []
    assert sig([0] * 11 + list(range(1, 30))) == ["giant_cluster"]
    assert sig([0] * 9) == []  # too few names to judge
    assert sig([0, 1] * 60) == ["collapse", "giant_cluster", "giant_cluster"]


def test_empty_and_single(tmp_path, embedder):
    ctx = _ctx(tmp_path, embedder)
    write_jsonl(ctx.store.path("attributes", "attributes.jsonl"), [])
    with pytest.raises(CompeffdistError, match="nothing to cluster"):
        run_clustering(ctx)
    write_jsonl(ctx.store.path("attributes", "attributes.jsonl"), [{"name": "tone", "count": 3, "description": "d"}])
    run_clustering(ctx)
    assert read_jsonl(ctx.store.path("clustering", "clusters.jsonl"))[0]["attributes"][0]["name"] == "tone"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 100)), min_size=1, max_size=30))
def test_build_clusters_invariants(pairs):
    attrs = [{"name": f"a{i}", "count": c, "description": ""} for i, (_, c) in enumerate(pairs)]
    clusters = build_clusters(attrs, [lab for lab, _ in pairs])
    assert len(clusters) == len({lab for lab, _ in pairs})
    assert sorted(a["name"] for c in clusters for a in c["attributes"]) == sorted(a["name"] for a in attrs)
    assert [c["total_count"] for c in clusters] == sorted((c["total_count"] for c in clusters), reverse=True)
    assert all(c["size"] == len(c["attributes"]) for c in clusters)


def test_frequency_copies_match_reference():
    assert frequency_copies([1, 2, 10, 100, 11702]).tolist() == [int(np.log1p(c)) for c in [1, 2, 10, 100, 11702]]
