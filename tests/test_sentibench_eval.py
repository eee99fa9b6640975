"""SentiBench prompts against the reference protocol on the real data, and the model backends on SmolLM2."""
import json
import random

import pytest

from compeffdist.core import CompeffdistError
from compeffdist.data import SENTIBENCH, load_sentibench
from compeffdist.sentibench import (CLASSIFICATION_INSTRUCTIONS, HFBackend, LlamaCppBackend, answer_complete,
                                    answer_json, build_examples, extract_answer, fsa_instruction, gold_items,
                                    verbalizer)

pytestmark = pytest.mark.sentibench


def reference_demos(name, seed, n, k=4):
    "The reference's draw: random.seed(seed), then random.sample(train, k) per test example in order."
    pool = load_sentibench(name, "train")
    random.seed(seed)
    return [random.sample(pool, k) for _ in range(n)]


@pytest.mark.parametrize("name", ["sc/twitter", "multifaced/pstance", "multifaced/intimacy"])
def test_classification_prompts_follow_the_reference_layout(sentibench_root, name):
    ex = build_examples(name, shots=4, seed=52, limit=5)
    test = load_sentibench(name, "test")[:5]
    for e, demos, rec in zip(ex, reference_demos(name, 52, 5), test):
        instr = CLASSIFICATION_INSTRUCTIONS[name].replace("{target}", rec.get("target", ""))
        if name == "multifaced/pstance":
            labels = [f"{d['label'].lower()}(opinion towards '{d['target']}')" for d in demos]
        else:
            labels = [d["label"].lower() for d in demos]
        expected = instr + "\n\n" + "".join(f"Sentence: {d['sentence']}\nLabel: {l}\n\n" for d, l in zip(demos, labels)) \
            + f"Sentence: {rec['sentence']}\nLabel:"
        assert e.prompt == expected
        assert e.gold == rec["label"].lower() and e.gold in SENTIBENCH[name].labels


def test_fsa_prompts_follow_the_reference_layout(sentibench_root):
    name = "absa/asqp_rest16"
    ex = build_examples(name, shots=4, seed=62, limit=3)
    for e, demos in zip(ex, reference_demos(name, 62, 3)):
        assert e.prompt.startswith(fsa_instruction(name) + "\n\nSentence: " + demos[0]["sentence"] + "\nOutput: [\n  {")
        for d in demos:
            assert f"Sentence: {d['sentence']}\nOutput: {answer_json(gold_items(name, d))}\n\n" in e.prompt
        assert e.prompt.endswith(f"Sentence: {e.sentence}\nOutput:")
    assert "'restaurant pcrices'" in fsa_instruction(name) and "'food general'" in fsa_instruction(name)
    assert "'restaurant prices'" in fsa_instruction(name, fixed=True)
    assert "'food general'" not in fsa_instruction(name, fixed=True)


def test_limit_seed_and_max_chars(sentibench_root):
    full = build_examples("sc/imdb", seed=42, limit=30)
    assert [e.prompt for e in build_examples("sc/imdb", seed=42, limit=3)] == [e.prompt for e in full[:3]]
    assert build_examples("sc/imdb", seed=42, limit=1)[0].prompt != build_examples("sc/imdb", seed=52, limit=1)[0].prompt
    cut = build_examples("sc/imdb", seed=42, limit=30, max_chars=200)
    for e in cut:
        assert all(len(part.split("\nLabel:")[0]) <= 200 for part in e.prompt.split("Sentence: ")[1:])
    assert max(len(e.prompt) for e in cut) < max(len(e.prompt) for e in full)
    # FSA sentences are never cut: the gold spans point into them
    assert build_examples("absa/opener", limit=3, max_chars=5)[0].prompt == build_examples("absa/opener", limit=3)[0].prompt
    with pytest.raises(CompeffdistError, match="unknown SentiBench dataset"):
        build_examples("sst5")


def test_gold_counts_match_the_dataset_statistics(sentibench_root):
    count = lambda n, fixed=False: sum(len(gold_items(n, r, fixed)) for r in load_sentibench(n, "test"))
    assert count("absa/atsa_rest16") == 623
    assert (count("absa/acsa_rest16"), count("absa/acsa_rest16", True)) == (859, 751)
    assert count("absa/asqp_rest16") == 799
    op = load_sentibench("absa/opener", "test")
    assert sum(len(r["opinions"]) for r in op) == 865 and sum(not r["opinions"] for r in op) == 92


@pytest.fixture(scope="module")
def smol():
    b = HFBackend("smollm2-135m-instruct", dtype="float32", device="cpu", batch_size=4)
    yield b
    b.close()


def test_verbalizer_first_tokens_are_distinct_for_smollm2(sentibench_root, smol):
    for name, ds in SENTIBENCH.items():
        if ds.family != "FSA":
            ids = verbalizer(smol, name)
            assert len(set(ids)) == len(ids)
            assert ids[0] == smol.tokenizer(" " + ds.labels[0], add_special_tokens=False)["input_ids"][0]


def test_ambiguous_verbalizer_is_an_error(smol):
    class Collide:
        ref = smol.ref
        first_token = staticmethod(lambda text: 1)
        token_text = staticmethod(lambda t: "Ġx")
    with pytest.raises(CompeffdistError, match="'non-irony' and 'irony' both start with token"):
        verbalizer(Collide(), "multifaced/irony18")


def test_batched_scoring_equals_one_at_a_time(sentibench_root, smol):
    ex = build_examples("sc/twitter", shots=2, seed=42, limit=5)
    ids = verbalizer(smol, "sc/twitter")
    batched = smol.next_token_scores([e.prompt for e in ex], ids)
    smol.batch_size = 1
    try:
        single = smol.next_token_scores([e.prompt for e in ex], ids)
    finally:
        smol.batch_size = 4
    for (a, top_a), (b, top_b) in zip(batched, single):
        assert a == pytest.approx(b, abs=2e-3) and top_a == top_b


def test_early_stopped_generation_gives_the_full_runs_answer(sentibench_root, smol):
    ex = build_examples("absa/atsa_rest16", shots=2, seed=42, limit=2)
    prompts = [e.prompt for e in ex]
    full = smol.generate(prompts, 60)
    early = smol.generate(prompts, 60, done=lambda p, c: answer_complete(p, c, 2))
    for p, f, e in zip(prompts, full, early):
        assert f.startswith(e)
        assert extract_answer(p, e, 2) == extract_answer(p, f, 2)


def test_llamacpp_backend_agrees_with_transformers(sentibench_root, smol):
    lc = LlamaCppBackend("smollm2-135m-instruct", context_length=2048, n_threads=1)
    try:
        assert verbalizer(lc, "sc/sst2") == verbalizer(smol, "sc/sst2")
        ex = build_examples("sc/sst2", shots=2, seed=42, limit=4)
        ids = verbalizer(smol, "sc/sst2")
        a = lc.next_token_scores([e.prompt for e in ex], ids)
        b = smol.next_token_scores([e.prompt for e in ex], ids)
        # Q4_1 arithmetic in llama.cpp vs the dequantised fp32 weights: close logits, same verbalizer decision
        for (la, _), (lb, _) in zip(a, b):
            assert la == pytest.approx(lb, abs=1.0)
        assert sum((la[1] > la[0]) == (lb[1] > lb[0]) for (la, _), (lb, _) in zip(a, b)) >= 3
        # the prefix cache gives the same logits as a cold evaluation
        lc.llm.reset()
        again = lc.next_token_scores([ex[1].prompt], ids)[0][0]
        assert again == pytest.approx(a[1][0], abs=1e-3)
        out = lc.generate([ex[0].prompt], 3)
        assert isinstance(out[0], str)
    finally:
        lc.close()
