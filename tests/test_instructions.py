"""Parsers and checks of the `instructions` stage over fuzzed teacher outputs, and its orchestration (FakeEngine)."""
import json
from collections import Counter

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from compeffdist.core import (CompeffdistError, Config, InstructionsConfig, ModelConfig, RunStore, read_jsonl,
                              write_jsonl)
from compeffdist.engines import FakeEngine, RunContext
from compeffdist.instructions import (TASK_TYPES, check_output, demos_requests, demos_schema, format_clause,
                                      mentions_two_texts, output_format_of, parse_demos, parse_numbered_list,
                                      parse_rewrite, parse_tasks, rewrite_schema, run_instructions, tasks_schema)

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CFG = InstructionsConfig(max_seed_demos=3)

words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
sentence = st.lists(words, min_size=4, max_size=12).map(" ".join)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.floats(-10, 10, allow_nan=False),
                    st.text(max_size=20))
anything = st.recursive(scalars, lambda x: st.one_of(st.lists(x, max_size=4), st.dictionaries(st.text(max_size=8), x,
                                                                                               max_size=4)),
                        max_leaves=15)


def wrap(blob: str, how: str, cut: int) -> str:
    "A teacher-ish rendering of a JSON answer: as is, fenced with prose, or truncated."
    if how == "fenced": return f"Sure! Here it is:\n```json\n{blob}\n```\nDone."
    if how == "truncated": return blob[:max(1, cut % max(1, len(blob)))]
    if how == "long": return blob + " and more " * 3000
    return blob


@SETTINGS
@given(st.lists(st.tuples(sentence, st.sampled_from(["", ": ", ", and: "]), sentence), min_size=1, max_size=6))
def test_numbered_list_keeps_whole_items_with_colons(parts):
    prompts = list(dict.fromkeys(f"{a}{sep}{b}" if sep else a for a, sep, b in parts))
    text = "Here you go:\n" + "\n".join(f"{i}. {p}" for i, p in enumerate(prompts, 1)) + "\n\nHope it helps!"
    items, drops = parse_numbered_list(text)
    assert items == prompts and not drops


@SETTINGS
@given(st.text(max_size=400))
def test_numbered_list_total(text):
    items, drops = parse_numbered_list(text)
    assert all(len(i.split()) >= 4 for i in items) and len(set(items)) == len(items)
    if not items: assert sum(drops.values()) >= 1


task_item = st.fixed_dictionaries({"task_name": st.one_of(st.text(max_size=30), scalars),
                                   "task_type": st.one_of(st.sampled_from(TASK_TYPES + ("rating", "JSON", "weird")),
                                                          scalars),
                                   "task_description": st.one_of(sentence, st.text(max_size=60), scalars)})


@SETTINGS
@given(st.one_of(st.text(max_size=300), st.lists(st.one_of(task_item, anything), max_size=5)
                 .map(lambda xs: json.dumps({"tasks": xs}))),
       st.sampled_from(["plain", "fenced", "truncated", "long"]), st.integers(0, 10_000))
def test_parse_tasks_total(answer, how, cut):
    tasks, drops = parse_tasks(wrap(answer, how, cut))
    for t in tasks:
        assert t["task_type"] in TASK_TYPES and t["task_name"].strip() and len(t["task_description"].split()) >= 3
        assert not mentions_two_texts(t["task_name"], t["task_description"])
    if not tasks: assert sum(drops.values()) >= 1


def test_python_literal_answers_with_odd_keys():
    task = {"task_name": "T", "task_type": "closed_classification", "task_description": "Classify the text."}
    got, drops = parse_rewrite("Here: {1: 2, 'labels': ['a', 'b'], 'examples': [{'input': 'x y', 'output': 'a'}]}",
                               task, CFG)
    assert got["output_format"] == {"labels": ["a", "b"]} and got["demonstrations"][0]["output"] == "a"
    assert parse_tasks("[{'task_name': 'N', 2: 3, 'task_description': 'Do this to the text.'}]")[0][0]["task_name"] == "N"


def test_two_text_tasks_are_recognised():
    assert mentions_two_texts("Compare the tone of Text 1 and Text 2.")
    assert mentions_two_texts("Given review A and review B, say which is angrier.")
    assert mentions_two_texts("Decide whether both reviews share a sentiment.")
    assert not mentions_two_texts("Classify the tone of the text as positive or negative.")


def _rewrite_answer(draw_type, labels, examples, scale, fields):
    obj = {"task_name": "T", "task_description": "Do the task on the text, carefully.", "examples": examples}
    if draw_type == "closed_classification": obj["labels"] = labels
    if draw_type == "scoring": obj.update(scale_min=scale[0], scale_max=scale[1])
    if draw_type == "structured": obj["fields"] = fields
    return obj


example = st.fixed_dictionaries({"input": st.one_of(sentence, st.text(max_size=40), scalars),
                                 "output": st.one_of(anything, st.sampled_from(["pos", "neg", "3", "4/5"]),
                                                     st.lists(st.sampled_from(["pos", "the", "zz"]), max_size=3))})
field = st.fixed_dictionaries({"name": st.one_of(words, scalars), "type": st.sampled_from(
    ["string", "number", "integer", "boolean", "array", "object", "weird"]), "description": st.text(max_size=10)})


@SETTINGS
@given(st.sampled_from(TASK_TYPES), st.lists(st.one_of(st.sampled_from(["pos", "neg", "Neu"]), scalars), max_size=4),
       st.lists(example, max_size=8), st.tuples(st.integers(-3, 10), st.integers(-3, 10)),
       st.lists(field, max_size=3), st.sampled_from(["plain", "fenced", "truncated", "long"]), st.integers(0, 10_000))
def test_parse_rewrite_total_and_valid(task_type, labels, examples, scale, fields, how, cut):
    answer = wrap(json.dumps(_rewrite_answer(task_type, labels, examples, scale, fields)), how, cut)
    task = {"task_name": "T0", "task_type": task_type, "task_description": "Original description of the task."}
    got, drops = parse_rewrite(answer, task, CFG)
    if got is None:
        assert sum(drops.values()) >= 1
        return
    assert got["task_type"] == task_type and 1 <= len(got["demonstrations"]) <= CFG.max_seed_demos
    fmt = got["output_format"]
    if task_type == "closed_classification": assert len(fmt["labels"]) >= 2
    if task_type == "scoring": assert fmt["scale"][0] < fmt["scale"][1]
    if task_type == "extraction": assert fmt == {"spans": True}
    if task_type == "structured": jsonschema.Draft7Validator.check_schema(fmt["json_schema"])
    for d in got["demonstrations"]:
        assert d["source"] == "seed" and isinstance(d["output"], str)
        assert check_output(task_type, fmt, d["input"], d["output"]) == (d["output"], "ok")  # idempotent
    assert format_clause(task_type, fmt) or task_type == "other"


FORMATS = {"closed_classification": {"labels": ["pos", "neg"]}, "scoring": {"scale": [1, 5]},
           "extraction": {"spans": True}, "open_classification": {}, "other": {},
           "structured": {"json_schema": {"type": "object", "properties": {"a": {"type": "integer"}},
                                          "required": ["a"], "additionalProperties": False}}}


@SETTINGS
@given(st.sampled_from(TASK_TYPES), st.one_of(sentence, st.text(max_size=50), scalars), st.one_of(
    anything, st.sampled_from(["pos", " NEG. ", "3", "4.5", "9", '["the"]', '{"a": 2}', '{"a": "x"}', ""])))
def test_check_output_total_and_idempotent(task_type, inp, out):
    fmt = FORMATS[task_type]
    got, why = check_output(task_type, fmt, inp, out)
    assert (got is None) == (why != "ok")
    if got is not None:
        assert check_output(task_type, fmt, inp, got) == (got, "ok")
        if task_type == "closed_classification": assert got in fmt["labels"]
        if task_type == "extraction": assert all(s in inp for s in json.loads(got))
        if task_type == "structured": jsonschema.validate(json.loads(got), fmt["json_schema"])


@SETTINGS
@given(st.sampled_from(TASK_TYPES), st.lists(example, max_size=4), st.sampled_from(["plain", "fenced", "truncated"]),
       st.integers(0, 10_000))
def test_parse_demos_total(task_type, examples, how, cut):
    task = {"id": "c0-task-0", "task_name": "T", "task_type": task_type, "output_format": FORMATS[task_type],
            "instruction": "Do it.", "demonstrations": [{"input": "seen before", "output": "pos", "source": "seed"}]}
    got, drops = parse_demos(wrap(json.dumps({"examples": examples}), how, cut), task, ["a reference text"])
    keys = [" ".join(g["input"].lower().split()) for g in got]
    assert len(set(keys)) == len(keys) and "seen before" not in keys
    for g in got:
        assert g["source"] == "generated"
        assert check_output(task_type, FORMATS[task_type], g["input"], g["output"]) == (g["output"], "ok")
    assert all(k.startswith("demo:") for k in drops)


def test_schemas_are_valid_json_schemas():
    for t in TASK_TYPES:
        jsonschema.Draft7Validator.check_schema(rewrite_schema(t, 8))
        jsonschema.Draft7Validator.check_schema(demos_schema(t, FORMATS[t]))
    jsonschema.Draft7Validator.check_schema(tasks_schema(6))


def test_output_format_fallbacks():
    ex = [{"input": "x", "output": "happy"}, {"input": "y", "output": "sad"}]
    assert output_format_of("closed_classification", {"labels": []}, ex) == {"labels": ["happy", "sad"]}
    assert output_format_of("closed_classification", {}, ex[:1]) is None
    assert output_format_of("scoring", {"scale_min": 5, "scale_max": 1, "task_description": "on a 0-10 scale"}, []) \
        == {"scale": [0, 10]}
    assert output_format_of("structured", {"fields": "nope"}, [{"input": "x", "output": '{"k": [1]}'}]) == \
        {"json_schema": {"type": "object", "properties": {"k": {"type": "array"}}, "required": ["k"],
                         "additionalProperties": False}}


def test_demos_requests_are_deterministic_and_styled():
    task = {"id": "c1-task-0", "task_name": "T", "task_type": "other", "output_format": {}, "instruction": "Do it.",
            "demonstrations": [{"input": f"seed {i}", "output": "o", "source": "seed"} for i in range(3)]}
    pool = [f"real user text number {i}" for i in range(20)]
    a = demos_requests(task, pool, InstructionsConfig(demo_prompts_per_task=5), seed=1)
    assert a == demos_requests(task, pool, InstructionsConfig(demo_prompts_per_task=5), seed=1)
    assert a != demos_requests(task, pool, InstructionsConfig(demo_prompts_per_task=5), seed=2)
    for req, refs in a:
        assert len(refs) == 2 and all(r in pool and r in req[0]["content"] for r in refs)
        assert 1 <= req[0]["content"].count("Input: seed") <= 2


# --- orchestration with a scripted teacher ---------------------------------------------------------------

def _answers(kind: str):
    "A scripted teacher: each step answers sensibly, or (kind='garbage') with rubbish of every sort."
    def respond(messages, i):
        p = messages[-1]["content"]
        if kind == "garbage":
            return ["", "```json\n{\"tasks\": [{\"task_na", "I cannot do that.", "[1, 2, 3]", "{" * 50][len(p) % 5]
        if p.startswith("You write prompts"):
            return ("1. Analyze how the emotional tone of this text shapes its message.\n"
                    "2. Analyze how the emotional tone of this text shapes the message.\n"
                    "3. Which words in this text carry its strongest feelings?")
        if p.startswith("Design tasks"):
            return json.dumps({"tasks": [
                {"task_name": "Polarity", "task_type": "closed_classification",
                 "task_description": "Classify the sentiment of the text as positive or negative."},
                {"task_name": "Sentiment Polarity", "task_type": "closed_classification",
                 "task_description": "Classify the sentiment of the text as positive or negative."},
                {"task_name": "Intensity", "task_type": "scoring",
                 "task_description": "Rate the intensity of the feelings in the text from 1 to 5."}]})
        if p.startswith("Rewrite the task"):
            if "scoring" in p:
                return json.dumps({"task_name": "Intensity", "task_description": "Rate the intensity.",
                                   "scale_min": 1, "scale_max": 5,
                                   "examples": [{"input": "I am furious!!!", "output": 5}, {"input": "ok", "output": 2}]})
            return json.dumps({"task_name": "Polarity", "task_description": "Classify the sentiment.",
                               "labels": ["positive", "negative"],
                               "examples": [{"input": "Great!", "output": "positive"}, {"input": "Bad.", "output": "negative"}]})
        return json.dumps({"examples": [{"input": f"new text {len(p)} {i}", "output": 3 if "Rate" in p else "negative"},
                                        {"input": "Great!", "output": 4 if "Rate" in p else "positive"}]})
    return respond


@pytest.fixture(scope="module")
def embedder():
    from compeffdist.models import load_embedder
    return load_embedder("all-minilm-l6-v2")


def _ctx(tmp_path, embedder, kind="good", **cfg):
    c = Config(teacher=ModelConfig(model="fake"), student=ModelConfig(model="fake"),
               instructions=InstructionsConfig(demo_prompts_per_task=2, **cfg))
    ctx = RunContext(c, RunStore(tmp_path), teacher=FakeEngine(_answers(kind)), embedder=embedder, progress=False)
    write_jsonl(ctx.store.path("texts", "texts.jsonl"), [{"id": str(i), "text": f"user text {i}", "source": "s"}
                                                          for i in range(6)])
    write_jsonl(ctx.store.path("clustering", "clusters.jsonl"), [
        {"cluster_id": i, "total_count": 10 - i, "attributes": [{"name": n, "count": 10 - i, "description": "d."}]}
        for i, n in enumerate(["emotion", "tone", "sarcasm"])])
    return ctx


def _check_records(recs, clusters=range(3)):
    assert len({r["id"] for r in recs}) == len(recs)
    for r in recs:
        assert r["cluster_id"] in clusters and r["kind"] in ("analysis", "task") and isinstance(r["instruction"], str)
        if r["kind"] == "analysis":
            assert r["task_name"] == "analysis" and r["task_type"] == "analysis" and r["output_format"] == {}
        else:
            assert r["task_type"] in TASK_TYPES and r["demonstrations"]
            for d in r["demonstrations"]:
                assert check_output(r["task_type"], r["output_format"], d["input"], d["output"]) == (d["output"], "ok")


def test_stage_with_dedup(tmp_path, embedder):
    ctx = _ctx(tmp_path, embedder, max_clusters=2)
    stats = run_instructions(ctx)
    recs = read_jsonl(ctx.store.path("instructions", "instructions.jsonl"))
    _check_records(recs, clusters=(0, 1))
    # per cluster: 3 analysis prompts (one a near-copy), 3 tasks (one a near-copy); cluster 1 repeats cluster 0
    assert Counter(r["kind"] for r in recs) == Counter(analysis=2, task=2)
    assert stats.drops["dedup_analysis"] == 4 and stats.drops["dedup_task"] == 4
    assert len(stats.info["dedup"]["task"]) == 4
    assert stats.counts["instructions"] == len(recs) and stats.info["task_types"] == {"closed_classification": 1,
                                                                                      "scoring": 1}
    scoring = next(r for r in recs if r["task_type"] == "scoring")
    assert scoring["output_format"] == {"scale": [1, 5]} and "number from 1 to 5" in scoring["instruction"]
    assert [d["source"] for d in scoring["demonstrations"]].count("generated") >= 1
    calls = ctx.teacher.stats.misses
    again = run_instructions(ctx)
    assert ctx.teacher.stats.misses == calls and again.info["teacher"]["demos"]["generated"] == 0


def test_stage_without_dedup_keeps_everything(tmp_path, embedder):
    ctx = _ctx(tmp_path, embedder, dedup=False)
    stats = run_instructions(ctx)
    recs = read_jsonl(ctx.store.path("instructions", "instructions.jsonl"))
    _check_records(recs)
    assert Counter(r["kind"] for r in recs) == Counter(analysis=9, task=9)
    assert "dedup_task" not in stats.drops


def test_stage_survives_garbage(tmp_path, embedder):
    ctx = _ctx(tmp_path, embedder, kind="garbage")
    stats = run_instructions(ctx)
    recs = read_jsonl(ctx.store.path("instructions", "instructions.jsonl"))
    _check_records(recs)
    assert stats.counts["task_instructions"] == 0 and sum(stats.drops.values()) >= 3


def test_stage_needs_clusters(tmp_path, embedder):
    ctx = _ctx(tmp_path, embedder)
    write_jsonl(ctx.store.path("clustering", "clusters.jsonl"), [])
    with pytest.raises(CompeffdistError, match="no perspectives"):
        run_instructions(ctx)


class _Calls(FakeEngine):
    "A FakeEngine that records each call the stage makes: its size and the constraints of its requests."

    def __init__(self, respond):
        super().__init__(respond)
        self.log = []

    def generate_iter(self, batch, params, constraint=None):
        from compeffdist.engines import per_request
        self.log.append([json.dumps(c.to_dict(), sort_keys=True) if c else None
                         for _, c in per_request(batch, params, constraint)])
        yield from super().generate_iter(batch, params, constraint)


def test_one_engine_call_per_step_whatever_the_schemas(tmp_path, embedder):
    "Requests with different JSON schemas (rewrites of a classification and a scoring task) share one engine call."
    ctx = _ctx(tmp_path, embedder, dedup=False, max_clusters=1)
    ctx._teacher = _Calls(_answers("good"))
    stats = run_instructions(ctx)
    log = ctx.teacher.engine.log
    assert len(log) == 4  # analysis, task lists, rewrites, demonstrations
    assert log[0] == [None] and len(set(log[1])) == 1  # free analysis; one task-list schema
    assert len(log[2]) == 3 and len(set(log[2])) == 2  # three rewrites under two schemas, together
    assert len(set(log[3])) == 2 and stats.counts["task_instructions"] == 3  # demonstrations of both kinds, together
