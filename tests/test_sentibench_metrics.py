"""SentiBench metrics on small hand-computed cases, every family, reference and fixed modes (no model, no data)."""
import json

import pytest
from hypothesis import given, settings, strategies as st

from compeffdist.core import CompeffdistError
from compeffdist.sentibench import (INVALID, Example, answer_complete, extract_answer, micro_f1, opinion_tuples,
                                    parse_answer, predicted_items, predicted_opinions, score_predictions, space_spans,
                                    weighted_tuple_f1)


def ex(i, gold, sentence="", prompt="", record=None):
    return Example(i, prompt, sentence, gold, record or {})


# --- BSA / MSA: macro-F1 over the labels that occur ------------------------------------------------------------

def test_macro_f1_hand_computed():
    golds = ["positive", "positive", "negative", "negative"]
    preds = ["positive", "negative", "negative", "negative"]
    m = score_predictions("sc/sst2", [ex(i, g) for i, g in enumerate(golds)], preds)
    # positive: P 1, R 1/2 -> F1 2/3 ; negative: P 2/3, R 1 -> F1 4/5 ; macro 11/15
    assert m["f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert m["accuracy"] == pytest.approx(3 / 4)


def test_macro_f1_counts_a_label_predicted_but_absent_from_gold():
    # twitter: gold has no 'neutral', the model predicts it once -> a third class with F1 0 (sklearn, as the reference)
    golds = ["positive", "negative", "negative"]
    preds = ["positive", "neutral", "negative"]
    m = score_predictions("sc/twitter", [ex(i, g) for i, g in enumerate(golds)], preds)
    assert m["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_wrong_number_of_predictions_is_an_error():
    with pytest.raises(CompeffdistError, match="2 predictions for 1 test examples"):
        score_predictions("sc/sst2", [ex(0, "positive")], ["positive", "negative"])


# --- answer extraction -----------------------------------------------------------------------------------------

PROMPT = "Task\n\nSentence: a\nOutput: [\n  {\"x\": \"y\"}\n]\n\nSentence: b\nOutput:"


def test_extraction_takes_the_k_plus_first_match_lazily():
    assert extract_answer(PROMPT, ' [{"t": 1}] [{"t": 2}]', shots=1) == '[{"t": 1}]'
    # lazy: up to the FIRST ']' (a ']' inside a string cuts the answer)
    assert extract_answer(PROMPT, ' [{"t": "a]b"}]', shots=1) == '[{"t": "a]'


def test_extraction_fallback_and_error_string():
    assert extract_answer(PROMPT, ' [{"t": 1}, {"t": 2}, {"t"', shots=1) == '[{"t": 1}, {"t": 2}]'
    assert extract_answer(PROMPT, " nothing here", shots=1) == "Error: Sixth output not found"


def test_an_answer_not_opened_by_space_bracket_shifts_the_reference_match():
    # the model answers on a new line, then invents a next example: the reference reads the invented answer
    cont = '\n[{"a": 1}]\n\nSentence: c\nOutput: [{"b": 2}]'
    assert extract_answer(PROMPT, cont, shots=1) == '[{"b": 2}]'
    assert extract_answer(PROMPT, cont, shots=1, fixed=True) == '[{"a": 1}]'
    # without the invented example the fallback recovers the answer
    assert extract_answer(PROMPT, '\n[{"a": 1}]', shots=1) == '[{"a": 1}]'


def test_parse_answer_fallback():
    assert parse_answer('```json\n[{"a": 1}]\n```') == [{"a": 1}]
    assert parse_answer("Error: Sixth output not found") is None


PIECES = st.sampled_from(['[', ']', '{', '}', '"', 'Output: ', 'Output: [', '\nSentence: c\n', ' x', ',', '\n', '1'])


@settings(max_examples=300, deadline=None)
@given(st.lists(PIECES, max_size=30), st.booleans())
def test_early_stop_never_changes_the_extracted_answer(pieces, fixed):
    "Stopping generation at the first prefix where `answer_complete` holds gives the full text's answer."
    text = "".join(pieces)
    full = extract_answer(PROMPT, text, shots=1, fixed=fixed)
    for i in range(len(text) + 1):
        if answer_complete(PROMPT, text[:i], shots=1, fixed=fixed):
            assert extract_answer(PROMPT, text[:i], shots=1, fixed=fixed) == full
            break


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-99, 99) | st.floats(allow_nan=True) | st.text("a]\\\"\u00e9[ ", max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text("ab", max_size=2), inner, max_size=3),
    max_leaves=8)
JSON_PIECES = st.sampled_from(['[', ']', '{', '}', '"', '\\', ':', ',', ' ', '1', '.', 'e', '-', 'tr', 'x',
                               '\nSentence: c\n'])


@settings(max_examples=500, deadline=None)
@given(st.lists(JSON_PIECES, max_size=6), st.lists(JSON_VALUES, max_size=3), st.lists(JSON_PIECES, max_size=6))
def test_early_stop_never_changes_the_fixed_answer_of_json_text(before, values, after):
    "The same property, `fixed=True`, on JSON values (nested, with strings, escapes, numbers, literals) among noise."
    text = "".join(before) + " ".join(json.dumps(v) for v in values) + "".join(after)
    full = extract_answer(PROMPT, text, shots=1, fixed=True)
    for i in range(len(text) + 1):
        if answer_complete(PROMPT, text[:i], shots=1, fixed=True):
            assert extract_answer(PROMPT, text[:i], shots=1, fixed=True) == full
            break


# --- ATSA / ACSA / ASQP: micro-F1 with the reference's invalid-item rules --------------------------------------

S = "The sushi was great but the service slow ."


def test_atsa_invalid_items_are_false_positives():
    answer = json.dumps([{"aspect_term": "sushi", "sentiment": "positive"},
                         {"aspect_term": "pizza", "sentiment": "positive"},      # not in the sentence
                         {"aspect_term": "service", "sentiment": "bad"},         # polarity not in the list
                         {"aspect_term": "service"},                             # key missing
                         {}])                                                    # falsy: skipped
    items = predicted_items("absa/atsa_rest16", answer, S)
    assert items == [("sushi", "positive"), INVALID, INVALID, INVALID]
    gold = [[("sushi", "positive"), ("service", "negative")]]
    m = micro_f1(gold, [items])
    assert (m["precision"], m["recall"]) == (pytest.approx(1 / 4), pytest.approx(1 / 2))
    assert m["f1"] == pytest.approx(2 * 0.25 * 0.5 / 0.75)
    assert m["n_invalid"] == 3


def test_atsa_non_string_field_turns_every_item_into_a_false_positive():
    answer = json.dumps([{"aspect_term": "sushi", "sentiment": "positive"}, {"aspect_term": None, "sentiment": "x"}])
    assert predicted_items("absa/atsa_rest16", answer, S) == [INVALID, INVALID]
    assert predicted_items("absa/atsa_rest16", answer, S, fixed=True) == [("sushi", "positive"), INVALID]


def test_acsa_duplicate_gold_reference_vs_fixed():
    food, serv = ("food quality", "positive"), ("service general", "negative")
    gold = [[food, food, serv]]                         # the reference keeps the duplicate gold pair
    pred = [predicted_items("absa/acsa_rest16", json.dumps([
        {"aspect_category": "food quality", "sentiment": "positive"},
        {"aspect_category": "food quality", "sentiment": "positive"},
        {"aspect_category": "ambience general", "sentiment": "meh"}]), S)]
    ref = micro_f1(gold, pred)
    # precision: food, food hit, invalid miss -> 2/3 ; recall: food, food hit, serv miss -> 2/3
    assert (ref["precision"], ref["recall"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    fix = micro_f1(gold, pred, fixed=True)
    # sets: pred {food} + 1 invalid -> P 1/2 ; gold {food, serv} -> R 1/2
    assert (fix["precision"], fix["recall"]) == (pytest.approx(1 / 2), pytest.approx(1 / 2))


def test_asqp_invalid_items_are_dropped_by_the_reference_and_counted_when_fixed():
    quad = {"aspect_term": "NULL", "aspect_category": "restaurant general", "opinion": "great", "sentiment": "positive"}
    answer = json.dumps([quad, {**quad, "extra": 1}, {"aspect_term": "x", "aspect_category": "y", "opinion": "z",
                                                       "sentiment": 5}])
    ref = predicted_items("absa/asqp_rest16", answer, S)
    assert ref == [("NULL", "restaurant general", "great", "positive")]
    fix = predicted_items("absa/asqp_rest16", answer, S, fixed=True)
    assert fix == [("NULL", "restaurant general", "great", "positive"), INVALID, INVALID]
    gold = [[("NULL", "restaurant general", "great", "positive"), ("sushi", "food quality", "great", "positive")]]
    assert micro_f1(gold, [ref])["precision"] == 1.0
    assert micro_f1(gold, [fix], fixed=True)["precision"] == pytest.approx(1 / 3)
    assert micro_f1(gold, [fix], fixed=True)["recall"] == pytest.approx(1 / 2)


def test_micro_f1_over_sentences_and_empty_conventions():
    a, b = ("a", "positive"), ("b", "negative")
    # the same tuple in another sentence does not match
    m = micro_f1([[a], [b]], [[b], [a]])
    assert m["precision"] == 0 and m["recall"] == 0 and m["f1"] == 0
    assert micro_f1([[a]], [[]])["precision"] == 1.0     # nothing predicted: precision 1 (reference)
    assert micro_f1([[]], [[]])["f1"] == 1.0


# --- OpeNER: weighted tuple F1 ---------------------------------------------------------------------------------

SENT = "The staff were very friendly and the room was clean ."
GOLD = [{"Source": [[], []], "Target": [["staff"], ["4:9"]], "Polar_expression": [["very friendly"], ["15:28"]],
         "Polarity": "Positive"},
        {"Source": [[], []], "Target": [["room"], ["37:41"]], "Polar_expression": [["clean"], ["46:51"]],
         "Polarity": "Positive"}]


def score_opener(items, fixed=False):
    return weighted_tuple_f1([opinion_tuples(SENT, GOLD)], [opinion_tuples(SENT, predicted_opinions(SENT, items, fixed))])


def test_opener_token_sets():
    assert space_spans("ab cd") == [(0, 2), (3, 5)]
    assert opinion_tuples(SENT, GOLD)[0] == (frozenset(), frozenset({1}), frozenset({3, 4}), "Positive")


def test_opener_partial_overlap_weights():
    # one prediction: target 'staff', expression 'friendly' (1 of the 2 gold expression tokens)
    m = score_opener([("NULL", "staff", "friendly", "positive")])
    # precision: matched; overlap relative to the prediction: (1 + 1 + 1/1)/3 = 1 -> P = 1/1
    # recall: gold 1 matched with (1 + 1 + 1/2)/3 = 5/6, gold 2 unmatched -> R = (5/6)/2
    assert m["precision"] == pytest.approx(1.0)
    assert m["recall"] == pytest.approx(5 / 12)
    assert m["f1"] == pytest.approx(2 * 1 * (5 / 12) / (1 + 5 / 12))


def test_opener_polarity_must_match_and_invalid_items_vanish():
    answer = json.dumps([{"holder": "NULL", "target": "staff", "sentiment_expression": "very friendly",
                          "sentiment_polarity": "negative"},                            # wrong polarity: FP
                         {"holder": "NULL", "target": "room", "sentiment_expression": "clean",
                          "sentiment_polarity": "great"},                               # invalid polarity: dropped
                         {"holder": "NULL", "target": "NULL", "sentiment_expression": "NULL",
                          "sentiment_polarity": "NULL"}])                               # the 'no opinion' answer
    items = predicted_items("absa/opener", answer, SENT)
    assert items == [("NULL", "staff", "very friendly", "negative")]
    m = score_opener(items)
    assert m["precision"] == 0 and m["recall"] == 0


def test_opener_null_target_only_matches_null_target():
    m = score_opener([("NULL", "NULL", "clean", "positive")])  # gold target 'room' -> no overlap with {'_'}
    assert m["precision"] == 0


def test_opener_find_lands_inside_a_word_in_the_reference():
    sent = "They were there just to keep us happy ."
    gold = [{"Source": [["us"], ["29:31"]], "Target": [["They"], ["0:4"]],
             "Polar_expression": [["happy"], ["32:37"]], "Polarity": "Positive"}]
    item = [("us", "They", "happy", "positive")]
    g = [opinion_tuples(sent, gold)]
    ref = weighted_tuple_f1(g, [opinion_tuples(sent, predicted_opinions(sent, item))])
    fix = weighted_tuple_f1(g, [opinion_tuples(sent, predicted_opinions(sent, item, fixed=True))])
    assert ref["f1"] == pytest.approx(0.0, abs=1e-9)   # "us" found inside "just": empty holder set
    assert fix["f1"] == pytest.approx(1.0)


def test_opener_and_split():
    sent = "ANDY loved the pool and the spa ."
    ops = predicted_opinions(sent, [("ANDY", "pool AND spa", "loved", "positive")])
    assert ops[0]["Target"][0] == ["pool", "spa"]
    assert ops[0]["Source"][0] == ["ANDY"]
    # the reference splits on the bare substring 'AND': a holder is not split, but a target 'ANDY' is
    assert predicted_opinions(sent, [("NULL", "ANDY", "loved", "positive")])[0]["Target"][0] == ["", "Y"]
    assert predicted_opinions(sent, [("NULL", "ANDY", "loved", "positive")], fixed=True)[0]["Target"][0] == ["ANDY"]


def test_the_backends_live_in_their_own_module_and_are_reexported():
    "compeffdist.backends needs nothing of the protocol; compeffdist.sentibench re-exports its names unchanged."
    import subprocess
    import sys
    code = ("import sys, compeffdist.backends as b; assert 'compeffdist.sentibench' not in sys.modules; "
            "import compeffdist.sentibench as s; "
            "assert all(getattr(s, n) is getattr(b, n) for n in ('HFBackend', 'LlamaCppBackend', 'VLLMBackend', "
            "'_ENGINE_ONLY'))")
    subprocess.run([sys.executable, "-c", code], check=True)
