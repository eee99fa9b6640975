"""Parsers of the `attributes` stage over fuzzed teacher outputs, and the stage's bookkeeping (FakeEngine)."""
import json
from collections import Counter

from hypothesis import HealthCheck, given, settings, strategies as st

from compeffdist.attributes import aggregate_attributes, normalise_name, parse_attributes, run_attributes, text_attributes
from compeffdist.teacher import parse_json_lenient
from compeffdist.core import Config, ModelConfig, RunStore, read_jsonl, write_jsonl
from compeffdist.engines import FakeEngine, RunContext

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=30))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                            st.dictionaries(st.text(max_size=10), inner, max_size=5)),
                           max_leaves=25)
containers = st.one_of(st.lists(json_values, max_size=5), st.dictionaries(st.text(max_size=10), json_values, max_size=5))
prose = st.text(alphabet=st.characters(blacklist_characters="[]{}`\"'"), max_size=60)
item = st.fixed_dictionaries({"name": st.text(min_size=1, max_size=20), "description": st.text(max_size=40),
                              "value": st.text(max_size=20)})
any_field = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=5), scalars, max_size=2))
messy_item = st.dictionaries(st.sampled_from(["name", "Attribute Name", "description", "desc", "value", "other"]),
                             any_field, max_size=5)


@SETTINGS
@given(st.text(max_size=500))
def test_lenient_never_raises(text):
    value, how = parse_json_lenient(text)
    assert (value is None) == (how in ("empty", "no_json"))


@SETTINGS
@given(containers, prose, prose, st.sampled_from(["plain", "fenced", "prose"]))
def test_lenient_recovers_wrapped_json(value, before, after, wrap):
    blob = json.dumps(value, ensure_ascii=wrap == "plain", indent=None if wrap != "fenced" else 2)
    text = {"plain": blob, "fenced": f"{before}\n```json\n{blob}\n```\n{after}", "prose": f"{before} {blob} {after}"}[wrap]
    got, how = parse_json_lenient(text)
    assert got == value, (text, got, how)


@SETTINGS
@given(st.lists(item, min_size=1, max_size=6), st.data())
def test_lenient_truncated_keeps_complete_items(items, data):
    blob = json.dumps({"attributes": items}, ensure_ascii=False)
    cut = data.draw(st.integers(1, len(blob) - 1))
    got, how = parse_json_lenient("```json\n" + blob[:cut])
    if got is None:
        return
    got_items = got["attributes"] if isinstance(got, dict) and "attributes" in got else None
    if got_items is None:  # an inner value was the first complete JSON: it must be an original item or a part of one
        assert how in ("embedded", "repaired")
        return
    assert len(got_items) <= len(items)
    for i, g in enumerate(got_items[:-1]):
        assert g == items[i]
    if got_items:  # the last kept item may have been cut between two fields: its fields are the original's
        last, orig = got_items[-1], items[len(got_items) - 1]
        assert all(orig[k] == v for k, v in last.items())


@SETTINGS
@given(st.one_of(st.text(max_size=300),
                 st.lists(messy_item, max_size=5).map(lambda xs: json.dumps({"attributes": xs})),
                 st.lists(messy_item, max_size=5).map(lambda xs: "Here you go:\n```json\n" + json.dumps(xs)[:-3]),
                 st.lists(st.tuples(st.text(min_size=1, max_size=15), st.text(max_size=30), st.text(max_size=15)), max_size=5)
                 .map(lambda xs: "\n".join(f"{i}. **{n}**: Attribute Description - {d} Attribute Value - {v}"
                                           for i, (n, d, v) in enumerate(xs, 1)))))
def test_parse_attributes_total(answer):
    items, drops, how = parse_attributes(answer)
    for it in items:
        assert set(it) == {"raw_name", "description", "value"}
        assert all(isinstance(v, str) for v in it.values())
        assert it["raw_name"].strip()
    if not items:
        assert drops["empty_response"] + drops["no_attributes"] == 1
    recs, drops2 = text_attributes(items, max_per_text=4)
    assert len(recs) <= 4 and len({r["name"] for r in recs}) == len(recs)


def test_parse_attributes_unicode_and_very_long():
    long_item = {"name": "ton" * 5000, "description": "é" * 20000, "value": "🙂" * 1000}
    items, drops, how = parse_attributes(json.dumps({"attributes": [long_item] + [{"name": "ironie", "description": "ça",
                                                                                     "value": "oui"}] * 50}))
    assert how == "json" and len(items) == 51
    recs, d2 = text_attributes(items, max_per_text=20)
    assert [r["name"] for r in recs] == ["ton" * 5000, "ironie"] and d2["duplicate_in_text"] == 49
    items, drops, how = parse_attributes("x" * 200_000 + "[" * 5000)
    assert items == [] and drops["no_attributes"] == 1


@SETTINGS
@given(st.text(max_size=80))
def test_normalise_name_invariants(raw):
    names = normalise_name(raw)
    for n in names:
        assert n == n.strip() and n and ":" not in n
        assert "/" not in n or ":" in raw
        assert n == n.lower()
    assert len(set(names)) == len(names)


def test_normalise_name_reference_rules():
    assert normalise_name("tone: sarcastic") == ["tone"]
    assert normalise_name("regret/anger") == ["regret", "anger"]
    assert normalise_name("use of sarcasm") == ["sarcasm"]
    assert normalise_name("Overall Sentiment") == ["overall sentiment"]


@SETTINGS
@given(st.lists(st.one_of(st.text(max_size=200),
                          st.lists(item, max_size=4).map(lambda xs: json.dumps({"attributes": xs}))),
                min_size=1, max_size=6))
def test_stage_counts_add_up(tmp_path_factory, answers):
    tmp = tmp_path_factory.mktemp("run")
    cfg = Config(teacher=ModelConfig(model="fake"), student=ModelConfig(model="fake"))
    cfg.attributes.min_count = 0
    by_text = {f"text number {i}": a for i, a in enumerate(answers)}
    eng = FakeEngine(lambda m, i: by_text[m[-1]["content"].rsplit("Input: ", 1)[1]])
    ctx = RunContext(cfg, RunStore(tmp), teacher=eng, progress=False)
    write_jsonl(ctx.store.path("texts", "texts.jsonl"), [{"id": str(i), "text": t, "source": "t"} for i, t in
                                                          enumerate(by_text)])
    stats = run_attributes(ctx)
    recs = read_jsonl(ctx.store.path("attributes", "text_attributes.jsonl"))
    kept = read_jsonl(ctx.store.path("attributes", "attributes.jsonl"))
    assert len(recs) == len(answers) == stats.counts["texts_in"]
    assert sum(len(r["attributes"]) for r in recs) == stats.counts["attribute_mentions"]
    assert sum(a["count"] for a in kept) == stats.counts["mentions_kept"] == stats.counts["attribute_mentions"]
    assert [a["count"] for a in kept] == sorted((a["count"] for a in kept), reverse=True)
    unreadable = sum(1 for r in recs if not r["attributes"])
    assert stats.drops["empty_response"] + stats.drops["no_attributes"] <= unreadable
    again = run_attributes(ctx)
    assert again.info["teacher"]["generated"] == 0 and eng.calls == len(answers)


def test_threshold_filters_rare_names(tmp_path):
    cfg = Config(teacher=ModelConfig(model="fake"), student=ModelConfig(model="fake"))
    cfg.attributes.min_count = 1
    answers = ['{"attributes": [{"name": "Tone", "description": "d", "value": "v"}, {"name": "Irony", '
               '"description": "d", "value": "v"}]}', '{"attributes": [{"name": "tone", "description": "e", "value": "w"}]}']
    eng = FakeEngine(lambda m, i: answers[int(m[-1]["content"].rsplit("Input: t", 1)[1])])
    ctx = RunContext(cfg, RunStore(tmp_path), teacher=eng, progress=False)
    write_jsonl(ctx.store.path("texts", "texts.jsonl"), [{"id": "a", "text": "t0", "source": "s"},
                                                          {"id": "b", "text": "t1", "source": "s"}])
    stats = run_attributes(ctx)
    kept = read_jsonl(ctx.store.path("attributes", "attributes.jsonl"))
    assert [(a["name"], a["count"]) for a in kept] == [("tone", 2)]
    assert stats.drops["below_min_count"] == 1
    assert aggregate_attributes(read_jsonl(ctx.store.path("attributes", "text_attributes.jsonl")))[1]["name"] == "irony"


def test_n_texts_enumerates_a_subset(tmp_path):
    "attributes.n_texts: only the first N user texts are sent to the teacher (pairing still sees them all)."
    cfg = Config(teacher=ModelConfig(model="fake"), student=ModelConfig(model="fake"))
    cfg.attributes.min_count, cfg.attributes.n_texts = 0, 2
    eng = FakeEngine(lambda m, i: '{"attributes": [{"name": "tone", "description": "d", "value": "v"}]}')
    ctx = RunContext(cfg, RunStore(tmp_path), teacher=eng, progress=False)
    write_jsonl(ctx.store.path("texts", "texts.jsonl"), [{"id": str(i), "text": f"t{i}", "source": "s"}
                                                          for i in range(5)])
    stats = run_attributes(ctx)
    assert eng.calls == 2 and stats.counts["texts_in"] == 2
    assert [r["id"] for r in read_jsonl(ctx.store.path("attributes", "text_attributes.jsonl"))] == ["0", "1"]
