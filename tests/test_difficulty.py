"""Difficulty scoring: the vectorised ranking score against the plain reference formula (random logits and a real
model, both formats), hand-computable perplexity and IFD, padding invariance, bad records, the score CLI, and the
data-parallel shard / merge logic (a real `accelerate launch` run is marked slow)."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from compeffdist.cli import main
from compeffdist.core import CompeffdistError, read_jsonl, write_jsonl
from compeffdist.difficulty import (DifficultyScorer, SampleError, encode_sample, merge_shards, nucleus_sizes,
                                    rank_token_scores, reference_rank_score, reference_rank_token_scores,
                                    sequence_metrics, shard_bounds, shard_path)
from compeffdist.models import load_causal_lm

RECORDS = [
    {"id": "a", "instruction": "Classify the sentiment as positive or negative.\n\nInput: Cold soup, rude staff.",
     "output": "negative"},
    {"id": "b", "instruction": "List the aspects and their sentiment as JSON.\n\nInput: Lovely view, slow service.",
     "output": '[{"aspect": "view", "sentiment": "positive"}, {"aspect": "service", "sentiment": "negative"}]'},
    {"id": "c", "instruction": "Describe the writer's mood.\n\nInput: Finally home after a week away!",
     "output": "Relieved and happy to be back."},
]


@pytest.fixture(scope="module")
def smol():
    return load_causal_lm("smollm2-135m-instruct", dtype="float32", device="cpu")


# ---------------------------------------------------------------- the formula
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), vocab=st.integers(2, 300), scale=st.one_of(st.just(0.0), st.floats(0.05, 20.0)),
       top_p=st.sampled_from([0.5, 0.9, 0.95, 0.99, 1.0]), k0=st.sampled_from([1, 2, 64]))
def test_vectorised_scores_equal_the_reference_loop(seed, vocab, scale, top_p, k0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(12, vocab, generator=g) * scale
    targets = torch.randint(0, vocab, (12,), generator=g)
    if scale == 0.0:  # all tied: the reference's order among ties is arbitrary, ours counts strictly-better tokens
        assert rank_token_scores(logits, targets, top_p).eq(0).all()
        return
    ref = torch.tensor(reference_rank_token_scores(logits, targets, top_p))
    ours = rank_token_scores(logits, targets, top_p)
    assert torch.allclose(ours, ref, atol=1e-6), (ours, ref)
    probs = torch.softmax(logits, -1)
    sorted_p = probs.sort(-1, descending=True).values
    expect = ((sorted_p.cumsum(-1) < top_p).sum(-1) + 1).clamp(max=vocab)
    assert torch.equal(nucleus_sizes(probs, top_p, k0), expect)


def test_hand_made_distribution():
    p = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.03, 0.01])
    scores = rank_token_scores(p.log().repeat(6, 1), torch.arange(6))
    assert torch.allclose(scores, torch.tensor([0, 1 / 4, 2 / 4, 3 / 4, 1, 1]))


# ---------------------------------------------------------------- perplexity and IFD by hand
class BigramLM(torch.nn.Module):
    "A real (tiny) causal LM whose next-token distribution depends only on the current token: `table[token]`."

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.as_tensor(table, dtype=torch.float32).log(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        logits = self.table[input_ids]
        return type("Out", (), {"logits": logits[:, -logits_to_keep:] if logits_to_keep else logits})()


def test_perplexity_and_ifd_by_hand():
    # 3 tokens; after token 0 the model predicts [.2, .5, .3], after 1 [.1, .1, .8], after 2 [.6, .3, .1]
    table = [[0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]]
    lm = BigramLM(table)
    # sequence 0 1 2 0 with the last two tokens (2, 0) as the response: p(2|1) = .8, p(0|2) = .6
    m = sequence_metrics(lm, [[0, 1, 2, 0]], [2], pad_id=0)[0]
    assert math.isclose(math.exp(m["nll"]), (0.8 * 0.6) ** -0.5, rel_tol=1e-6)
    # rank scores: 2 after 1 is top-1 (0); 0 after 2 is top-1 (0) -> sample score 0
    assert m["rank"] == 0.0
    # unconditioned on a context token 0: p(2|0) = .3, p(0|2) = .6 -> IFD = PPL(y|x)/PPL(y)
    u = sequence_metrics(lm, [[0, 2, 0]], [2], pad_id=0, rank=False)[0]
    ifd = math.exp(m["nll"] - u["nll"])
    assert math.isclose(ifd, ((0.8 * 0.6) ** -0.5) / ((0.3 * 0.6) ** -0.5), rel_tol=1e-6)
    # a response token 1 after 0 (p=.5, rank 0) then 0 after 1 (p=.1, ranks 1-2 tie among .1/.1: strictly better: 1)
    # after 1: sorted .8, .1, .1 -> running sums .8 and .9 are below .95 -> nucleus n = 3; token 0 has rank 1
    r = sequence_metrics(lm, [[2, 0, 1, 0]], [2], pad_id=0)[0]
    assert math.isclose(r["rank"], 1 / 3, rel_tol=1e-6)  # the mean over the non-top-1 tokens only


def test_uniform_model_ppl_is_vocab_size(smol):
    from transformers import LlamaConfig, LlamaForCausalLM
    _, tok = smol
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2)).eval()
    torch.nn.init.zeros_(tiny.lm_head.weight)
    for r in DifficultyScorer(tiny, tok, max_length=128).score(RECORDS):
        assert math.isclose(r["ppl"], len(tok), rel_tol=1e-5) and math.isclose(r["ifd"], 1.0, rel_tol=1e-6)


def test_padding_does_not_change_scores():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)).eval()
    seqs = [[int(x) for x in torch.randint(1, 97, (n,))] for n in (5, 17, 9, 30)]
    tails = [3, 10, 1, 12]
    batched = sequence_metrics(lm, seqs, tails, pad_id=0)
    for s, t, b in zip(seqs, tails, batched):
        alone = sequence_metrics(lm, [s], [t], pad_id=0)[0]
        assert math.isclose(alone["nll"], b["nll"], rel_tol=1e-5) and math.isclose(alone["rank"], b["rank"], abs_tol=1e-6)


# ---------------------------------------------------------------- a real model, both formats
@pytest.mark.parametrize("fmt", ["chat", "raw"])
def test_real_model_agrees_with_reference(smol, fmt):
    model, tok = smol
    got = DifficultyScorer(model, tok, fmt=fmt, batch_size=3, max_length=256, metrics=["rank", "length"]).score(RECORDS)
    for r, g in zip(RECORDS, got):
        assert abs(g["rank"] - reference_rank_score(model, tok, r, fmt, 256)) <= 1e-5
        assert g["length"] == encode_sample(tok, r, fmt, 256).length


def test_truncation_scores_the_visible_part(smol):
    model, tok = smol
    rec = RECORDS[1]
    e = encode_sample(tok, rec, "chat", 10_000)
    cut = e.start + 4  # room for 4 response tokens
    short = encode_sample(tok, rec, "chat", cut)
    assert short.truncated and len(short.targets) == 4 and short.length == e.length
    g = DifficultyScorer(model, tok, max_length=cut, metrics=["rank"]).score([rec])[0]
    assert abs(g["rank"] - reference_rank_score(model, tok, rec, "chat", cut)) <= 1e-5


def test_raw_format_locates_the_output_as_the_reference():
    from compeffdist.models import load_tokenizer
    tok = load_tokenizer("smollm2-135m-instruct")
    rec = {"instruction": "  Rate it.\nInput: great\nOutput: ", "output": "5"}
    text = "Rate it.\nInput:great\nOutput:5"
    e = encode_sample(tok, rec, "raw", 2048)
    assert e.ids == tok(text)["input_ids"] and e.start == len(tok(text[:text.rfind("5")])["input_ids"])


@pytest.mark.parametrize("record,reason", [
    ({"output": "x"}, "missing_instruction"), ({"instruction": "  ", "output": "x"}, "missing_instruction"),
    ({"instruction": "Hi."}, "missing_output"), ({"instruction": "Hi.", "output": 3}, "missing_output"),
    ({"instruction": "Hi.", "output": " \n"}, "empty_output"), ({"instruction": "word " * 400, "output": "x"}, "too_long"),
])
def test_bad_records_are_per_record_errors(record, reason):
    from compeffdist.models import load_tokenizer
    tok = load_tokenizer("smollm2-135m-instruct")
    with pytest.raises(SampleError) as e:
        encode_sample(tok, record, "chat", 128)
    assert e.value.reason == reason
    got = DifficultyScorer(None, tok, max_length=128, metrics=["length"]).score([record, RECORDS[0], "text"])
    assert got[0].reason == reason and got[1]["length"] >= 1 and got[2].reason == "not_a_record"


# ---------------------------------------------------------------- the CLI
def test_score_cli_real_model(tmp_path, capsys):
    recs = RECORDS + [{"id": "bad", "instruction": "Hi."}]
    write_jsonl(tmp_path / "in.jsonl", recs)
    rc = main(["score", "--model", "smollm2-135m-instruct", "--input", str(tmp_path / "in.jsonl"), "--output",
               str(tmp_path / "out.jsonl"), "--metric", "rank,ppl,ifd,length", "--format", "raw", "--batch-size", "2",
               "--max-length", "256", "--device", "cpu", "--quiet"])
    assert rc == 0
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [o["id"] for o in out] == ["a", "b", "c", "bad"]
    assert all(set(o["difficulty"]) == {"rank", "ppl", "ifd", "length"} for o in out[:3])
    assert out[3]["difficulty"] is None and out[3]["difficulty_error"] == "missing_output"
    assert all(0 <= o["difficulty"]["rank"] <= 1 and o["difficulty"]["ppl"] >= 1 for o in out[:3])
    assert "not scored: missing_output 1" in capsys.readouterr().err


@pytest.mark.parametrize("args,msg", [
    (["--metric", "rank,loss"], "unknown difficulty metric"), (["--top-p", "0"], "--top-p"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_score_cli_bad_arguments(tmp_path, capsys, args, msg):
    write_jsonl(tmp_path / "in.jsonl", RECORDS)
    rc = main(["score", "--model", "smollm2-135m-instruct", "--input", str(tmp_path / "in.jsonl"), "--output",
               str(tmp_path / "o.jsonl"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1


def test_score_cli_bad_files(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x", "output": "y"}\nnot json\n')
    assert main(["score", "--model", "smollm2-135m-instruct", "--input", str(tmp_path / "bad.jsonl"), "--output",
                 str(tmp_path / "o.jsonl"), "--metric", "length"]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert main(["score", "--model", "smollm2-135m-instruct", "--input", str(tmp_path / "none.jsonl"), "--output",
                 str(tmp_path / "o.jsonl")]) == 2


# ---------------------------------------------------------------- sharding and merging
@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 500), world=st.integers(1, 17))
def test_shards_cover_the_input_in_order(n, world):
    spans = [shard_bounds(n, r, world) for r in range(world)]
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert max(e - s for s, e in spans) - min(e - s for s, e in spans) <= 1


def test_merge_restores_input_order(tmp_path):
    out = tmp_path / "scored.jsonl"
    lines = [{"i": i} for i in range(11)]
    for r in range(3):
        lo, hi = shard_bounds(11, r, 3)
        write_jsonl(shard_path(out, r, 3), lines[lo:hi])
    assert merge_shards(out, 3, expected=11) == 11
    assert read_jsonl(out) == lines and sorted(p.name for p in tmp_path.iterdir()) == ["scored.jsonl"]
    write_jsonl(shard_path(out, 0, 2), lines)
    with pytest.raises(CompeffdistError, match="missing shard"):
        merge_shards(out, 2)
    write_jsonl(shard_path(out, 1, 2), [])
    with pytest.raises(CompeffdistError, match="expected 12"):
        merge_shards(out, 2, expected=12)


@pytest.mark.slow
def test_accelerate_launch_two_processes(tmp_path):
    "The documented scale-out: two processes (torchrun through accelerate, gloo on CPU), shards merged in order."
    accelerate = Path(sys.executable).with_name("accelerate")
    cli = Path(sys.executable).with_name("compeffdist")
    recs = [{"id": i, "instruction": f"Repeat {i}.", "output": "ab" * (i + 1)} for i in range(9)] + [{"id": "x"}]
    write_jsonl(tmp_path / "in.jsonl", recs)
    proc = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", str(cli), "score", "--model",
                           "smollm2-135m-instruct", "--input", str(tmp_path / "in.jsonl"), "--output",
                           str(tmp_path / "out.jsonl"), "--metric", "rank,length", "--device", "cpu", "--quiet",
                           "--max-length", "128"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [o["id"] for o in out] == [r["id"] for r in recs]
    assert "2 process(es)" in proc.stderr and "missing_instruction 1" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]
    single = DifficultyScorer.load("smollm2-135m-instruct", device="cpu", metrics=["rank", "length"],
                                   max_length=128).score(recs[:9])
    for o, s in zip(out, single):
        assert abs(o["difficulty"]["rank"] - s["rank"]) <= 1e-5 and o["difficulty"]["length"] == s["length"]


# ---------------------------------------------------------------- the stage
def _stage_ctx(tmp_path, records, **difficulty):
    from compeffdist.core import Config, ModelConfig, RunStore
    from compeffdist.engines import RunContext
    store = RunStore(tmp_path / "run")
    write_jsonl(store.path("responses", "samples.jsonl"), records)
    cfg = Config(teacher=ModelConfig(model="x"), student=ModelConfig(model="smollm2-135m-instruct", device="cpu"))
    cfg.difficulty = cfg.difficulty.model_copy(update={"max_length": 128, "batch_size": 4, **difficulty})
    return RunContext(cfg, store, progress=False)


def test_stage_with_proxy_and_warmup_ids(tmp_path):
    from compeffdist.core import ProxyConfig, write_json
    from compeffdist.difficulty import run_difficulty, scoring_model
    words = ["great", "awful", "fine", "terrible", "lovely", "boring"]
    recs = [{"id": f"r{i}", "cluster_id": i % 2, "task_name": f"t{i % 2}", "kind": "task",
             "instruction": f"Is this positive or negative?\n\nInput: a {words[i % 6]} day number {i}",
             "output": ["positive", "negative"][i % 2] + " " * (i // 6)} for i in range(12)]
    ctx = _stage_ctx(tmp_path, recs, proxy=ProxyConfig(enabled=True, model="all-minilm-l6-v2", train_fraction=0.2,
                                                       eval_fraction=0.25, max_length=64))
    assert scoring_model(ctx) == "smollm2-135m-instruct"
    write_json(ctx.store.path("warmup", "card.json"), {"sample_ids": ["r0", "r5"]})
    stats = run_difficulty(ctx)
    out = read_jsonl(ctx.store.path("difficulty", "scored.jsonl"))
    assert [o["id"] for o in out] == [r["id"] for r in recs if r["id"] not in ("r0", "r5")]  # the rest is scored
    assert stats.drops["warmup_subset"] == 2
    direct = [o for o in out if o["difficulty_source"] == "direct"]
    proxy = [o for o in out if o["difficulty_source"] == "proxy"]
    assert len(direct) == stats.counts["directly_scored"] == 8 and len(proxy) == stats.counts["proxy_predicted"] == 2
    assert all(set(o["difficulty"]) == {"rank", "ppl", "ifd", "length"} for o in direct)
    assert all(set(o["difficulty"]) == {"rank", "length"} for o in proxy)
    lo, hi = min(o["difficulty"]["rank"] for o in direct), max(o["difficulty"]["rank"] for o in direct)
    assert all(lo - 1e-9 <= o["difficulty"]["rank"] <= hi + 1e-9 for o in proxy)  # rank target: training scale
    report = json.loads(ctx.store.path("difficulty", "proxy.json").read_text())
    assert report["n_train"] + report["n"] == 8 and "spearman" in report and report["n_predicted"] == 2
    ctx.store.path("warmup", "model").mkdir()
    (ctx.store.path("warmup", "model") / "config.json").write_text("{}")
    assert scoring_model(ctx).endswith("warmup/model")


def test_stage_rejects_a_corpus_with_nothing_to_score(tmp_path):
    from compeffdist.difficulty import run_difficulty
    ctx = _stage_ctx(tmp_path, [{"id": "a", "instruction": "x", "output": ""}, {"id": "b", "output": "y"}],
                     metrics=["length"])
    with pytest.raises(CompeffdistError, match="none of the 2 responses"):
        run_difficulty(ctx)
