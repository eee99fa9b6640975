"""Teacher responses: constraints per declared output format, verification by reason, drop / flag, self-consistency,
resumability through the real SQLite call cache, and a real llama.cpp engine under a choice grammar and a schema."""
import json

import pytest

from compeffdist.core import (Config, DecodingConfig, ModelConfig, ResponsesConfig, RunStore, StageStats, read_jsonl,
                              write_jsonl)
from compeffdist.engines import CachedEngine, FakeEngine, Generation, LlamaCppEngine, RunContext, per_request
from compeffdist.responses import collect_responses, constraint_for, extract_spans, run_responses, verify_response

TEXT = "The battery died after two days, but the screen is gorgeous."


def sample(i, fmt, task_type="other", instruction=None):
    return {"id": f"s{i}", "instruction_id": f"i{i}", "cluster_id": 0, "task_name": f"task{i}", "kind": "task",
            "task_type": task_type, "output_format": fmt, "text_id": "x", "text": TEXT,
            "instruction": instruction or f"Task {i}.\n\nInput: {TEXT}"}


class Recording(FakeEngine):
    "A FakeEngine that also records the engine calls, and the constraint and sampling parameters of each request."

    def __init__(self, respond, status=None):
        super().__init__(respond)
        self.seen, self.status, self.engine_calls = [], status or {}, 0

    def generate_iter(self, batch, params, constraint=None):
        self.engine_calls += 1
        for m, (p, c) in zip(batch, per_request(batch, params, constraint)):
            self.seen.append((m[0]["content"], c, p))
        for i, gens in super().generate_iter(batch, params, constraint):
            reason = self.status.get(batch[i][0]["content"])
            yield i, [Generation(g.text, 1, 1, reason) for g in gens] if reason else gens


@pytest.mark.parametrize("fmt,output,reasons", [
    ({"labels": ["Positive", "Negative"]}, " positive. ", []),
    ({"labels": ["Positive", "Negative"]}, "'Negative'", []),
    ({"labels": ["Positive", "Negative"]}, "mixed", ["label_not_in_set"]),
    ({"json_schema": {"type": "array", "items": {"type": "string"}}}, '["a"]', []),
    ({"json_schema": {"type": "array", "items": {"type": "string"}}}, '[1]', ["schema_mismatch"]),
    ({"json_schema": {"type": "array"}}, "[unclosed", ["invalid_json"]),
    ({"scale": [1, 10]}, "7", []), ({"scale": [1, 10]}, "Score: 0", ["out_of_scale"]),
    ({"scale": [1, 10]}, "high", ["not_a_number"]),
    ({"spans": True}, '["battery died", "Gorgeous"]', []),
    ({"spans": True}, '{"aspect_terms": ["battery", "screen"], "sentiment": "mixed"}', []),
    ({"spans": True}, "1. battery\n2. keyboard", ["span_not_in_text"]),
    ({"spans": True}, "[]", []),
    ({}, "Anything goes.", []), ({}, "", ["empty"]),
])
def test_verify(fmt, output, reasons):
    assert verify_response({"text": TEXT, "output_format": fmt}, output) == reasons


def test_verify_finish_reasons():
    assert verify_response({}, "a long answer", "length") == ["truncated"]
    assert verify_response({}, "", "error") == ["teacher_error"]


def test_extract_spans():
    assert extract_spans('["a", "b"]') == ["a", "b"]
    assert extract_spans('[{"aspect": "x", "polarity": "positive"}]') == ["x"]
    assert extract_spans('- "a"\n* b\n3) c') == ["a", "b", "c"]
    assert extract_spans("none") == []


def test_constraints_follow_the_output_format():
    assert constraint_for({"labels": ["a", "b", "a"]}).choice == ("a", "b")
    assert constraint_for({"labels": []}) is None and constraint_for({"labels": "a"}) is None
    assert constraint_for({"json_schema": {"type": "object"}}).json_schema == {"type": "object"}


def test_batching_constraints_and_resume(tmp_path):
    samples = [sample(0, {"labels": ["yes", "no"]}), sample(1, {"json_schema": {"type": "array"}}), sample(2, {}),
               sample(3, {"labels": ["yes", "no"]})]
    answers = {"Task 0": "yes", "Task 1": "[]", "Task 2": "free text", "Task 3": "no"}
    eng = Recording(lambda m, j: answers[m[0]["content"][:6]])
    cached = CachedEngine(eng, tmp_path / "calls.sqlite", progress=False)
    got = collect_responses(cached, samples, ResponsesConfig())
    assert [g["output"] for g in got] == ["yes", "[]", "free text", "no"]
    assert eng.engine_calls == 1  # one call for every constraint: the engine schedules them together
    by = {c: k for c, k, _ in eng.seen}
    assert by[samples[0]["instruction"]].choice == ("yes", "no")
    assert by[samples[1]["instruction"]].json_schema == {"type": "array"}
    assert by[samples[2]["instruction"]] is None
    cached.close()
    # a fresh process on the same cache file: nothing is computed again
    eng2 = Recording(lambda m, j: "never called")
    cached2 = CachedEngine(eng2, tmp_path / "calls.sqlite", progress=False)
    assert collect_responses(cached2, samples, ResponsesConfig()) == got
    assert eng2.calls == 0 and cached2.stats.hits == 4
    # without constraints every request is free
    eng3 = Recording(lambda m, j: "yes")
    collect_responses(eng3, samples, ResponsesConfig(constrain=False))
    assert all(c is None for _, c, _ in eng3.seen)


def test_drop_flag_and_errors():
    samples = [sample(0, {"labels": ["yes", "no"]}), sample(1, {"spans": True}), sample(2, {})]
    eng = Recording(lambda m, j: {"Task 0": "maybe", "Task 1": '["keyboard"]', "Task 2": "cut"}[m[0]["content"][:6]],
                    status={samples[2]["instruction"]: "error"})
    st = StageStats()
    assert collect_responses(eng, samples, ResponsesConfig(), st) == []
    assert st.drops == {"label_not_in_set": 1, "span_not_in_text": 1, "teacher_error": 1}
    st = StageStats()
    got = collect_responses(eng, samples, ResponsesConfig(on_fail="flag"), st)
    assert [g["id"] for g in got] == ["s0", "s1"]  # an engine error is never kept
    assert [g["verification"] for g in got] == [{"ok": False, "reasons": ["label_not_in_set"]},
                                                {"ok": False, "reasons": ["span_not_in_text"]}]
    assert st.counts["flagged"] == 2 and st.drops == {"teacher_error": 1}
    got = collect_responses(eng, samples[:2], ResponsesConfig(verify=False))
    assert len(got) == 2 and all(g["verification"]["ok"] for g in got)
    st = StageStats()
    assert collect_responses(eng, [{"id": "x"}, "junk"], ResponsesConfig(), st) == []
    assert st.drops == {"sample_without_instruction": 2}


def test_self_consistency():
    votes = {0: ["yes", "no", "yes", "yes", "no"], 1: ["yes", "no", "no", "yes", "maybe"]}
    samples = [sample(0, {"labels": ["yes", "no"]}), sample(1, {"labels": ["yes", "no"]}), sample(2, {})]
    eng = Recording(lambda m, j: votes[int(m[0]["content"][5])][j] if m[0]["content"][5] in "01" else "free")
    st = StageStats()
    got = collect_responses(eng, samples, ResponsesConfig(self_consistency=5, decoding=DecodingConfig(temperature=0.0)), st)
    assert [g["id"] for g in got] == ["s0", "s2"]
    assert got[0]["output"] == "yes" and got[0]["verification"]["agreement"] == 0.6
    assert st.drops == {"no_majority": 1}
    params = {c: p for c, _, p in eng.seen}
    assert params[samples[0]["instruction"]].n == 5 and params[samples[0]["instruction"]].temperature == 1.0
    assert params[samples[2]["instruction"]].n == 1  # only closed-set tasks vote
    assert eng.engine_calls == 1  # voting and free requests in the same call, each with its own parameters


def test_stage_with_fake_teacher(tmp_path):
    store = RunStore(tmp_path / "run")
    write_jsonl(store.path("pairing", "samples.jsonl"), [sample(0, {"labels": ["yes", "no"]}), sample(1, {})])
    cfg = Config(teacher=ModelConfig(model="x"), student=ModelConfig(model="x"))
    ctx = RunContext(cfg, store, teacher=FakeEngine(lambda m, j: "yes"), progress=False)
    st = run_responses(ctx)
    out = read_jsonl(store.path("responses", "samples.jsonl"))
    assert [o["output"] for o in out] == ["yes", "yes"] and st.info["labels"] == {"yes": 1}
    assert st.info["teacher"]["misses"] == 2
    assert all({"output", "finish_reason", "verification", "text_id", "instruction"} <= set(o) for o in out)
    ctx.close()


@pytest.fixture(scope="module")
def smol_llamacpp():
    eng = LlamaCppEngine("smollm2-135m-instruct", context_length=1024, n_threads=2)
    yield eng
    eng.close()


def test_real_engine_constraints(tmp_path, smol_llamacpp):
    "A real llama.cpp model (SmolLM2 as a small stand-in teacher) under a choice grammar and a JSON schema."
    schema = {"type": "object", "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative"]}},
              "required": ["sentiment"]}
    samples = [sample(0, {"labels": ["positive", "negative", "mixed"]},
                      instruction=f"Is the sentiment positive, negative or mixed?\n\nInput: {TEXT}"),
               sample(1, {"json_schema": schema}, instruction=f"Give the sentiment as JSON.\n\nInput: {TEXT}")]
    teacher = CachedEngine(smol_llamacpp, tmp_path / "calls.sqlite", progress=False)
    st = StageStats()
    cfg = ResponsesConfig(decoding=DecodingConfig(temperature=0.0, max_new_tokens=24))
    got = collect_responses(teacher, samples, cfg, st)
    assert len(got) == 2, st.to_dict()
    assert got[0]["output"] in ("positive", "negative", "mixed")
    assert json.loads(got[1]["output"])["sentiment"] in ("positive", "negative")
    assert teacher.stats.misses == 2 and len(teacher.cache) == 2


def test_the_demo_runs_answers_verify_again():
    "The committed demo run: every answer it kept passes verification again, and the samples it lost were cut."
    from pathlib import Path
    from compeffdist.core import read_json, read_jsonl
    from compeffdist.responses import verify_response
    fx = Path(__file__).parent / "fixtures" / "demo_run"
    answers = read_jsonl(fx / "responses" / "samples.jsonl")
    assert all(verify_response(r, r["output"], r["finish_reason"]) == [] for r in answers)
    lost = len(read_jsonl(fx / "pairing" / "samples.jsonl")) - len(answers)
    assert read_json(fx / "responses" / "manifest.json")["stats"]["drops"] == {"truncated": lost}
