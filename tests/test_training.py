"""Student fine-tuning: chat rendering with completion-only loss, a real SmolLM2 SFT on CPU, the stages, the CLI."""
import json

import pytest

from compeffdist.cli import main
from compeffdist.core import CompeffdistError, ModelConfig, RunStore, TrainingConfig, load_config, write_jsonl
from compeffdist.models import load_causal_lm, load_tokenizer
from compeffdist.training import (completion_loss, load_records, render_chat, run_training, run_warmup,
                                  tokenize_records, train_student)

STUDENT = ModelConfig(model="smollm2-135m-instruct", device="cpu", dtype="float32")
WORDS = ["great", "awful", "fine", "boring", "lovely", "dull", "superb", "bad"]


def records(n):
    "Short instruction/output pairs with a learnable rule (the answer is the first word of the input)."
    return [{"id": f"s{i}", "instruction": f"Repeat the first word of the input.\n\nInput: {WORDS[i % 8]} movie {i}",
             "output": WORDS[i % 8]} for i in range(n)]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m-instruct", padding_side="right")


def test_chat_rendering_and_completion_mask(tok):
    prompt, completion = render_chat(tok, "Say hi.", "hi there")
    assert prompt == tok.apply_chat_template([{"role": "user", "content": "Say hi."}], tokenize=False,
                                             add_generation_prompt=True)
    assert completion.startswith("hi there") and tok.eos_token in completion  # the end-of-turn marker is learnt
    rows, info = tokenize_records(tok, [{"instruction": "Say hi.", "output": "hi there"}], 512)
    ids, mask = rows[0]["input_ids"], rows[0]["completion_mask"]
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == completion
    assert tok.decode([t for t, m in zip(ids, mask) if not m]) == prompt
    assert info["completion_tokens"] == sum(mask) and info["trained_samples"] == 1


def test_truncation_and_too_long_records(tok):
    long = {"instruction": "word " * 300, "output": "ok"}
    short = {"instruction": "Say hi.", "output": "hi " * 100}
    rows, info = tokenize_records(tok, [long, short], 64)
    assert info["dropped_too_long"] == 1 and info["truncated"] == 2 and len(rows) == 1
    assert len(rows[0]["input_ids"]) == 64
    with pytest.raises(CompeffdistError, match="no training record fits"):
        tokenize_records(tok, [long], 64)


def test_bad_training_data(tmp_path):
    with pytest.raises(CompeffdistError, match="record 2 needs"):
        load_records([{"instruction": "a", "output": "b"}, {"instruction": "a"}])
    with pytest.raises(CompeffdistError, match="no training records"):
        load_records([])
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(CompeffdistError, match=r"d.jsonl:2: not valid JSON"):
        load_records(p)


def test_sft_lowers_the_loss_and_gives_a_loadable_model(tmp_path):
    data = records(48)
    before = completion_loss("smollm2-135m-instruct", data)
    cfg = TrainingConfig(epochs=1, learning_rate=2e-4, per_device_batch_size=8, gradient_accumulation_steps=1,
                         max_length=96, packing=False, gradient_checkpointing=False, logging_steps=1)
    card = train_student("smollm2-135m-instruct", data, tmp_path / "model", cfg, STUDENT, progress=False)
    after = completion_loss(str(tmp_path / "model"), data)
    assert after < 0.7 * before, (before, after)
    assert card["steps"] == 6 and card["data"]["samples"] == 48 and card["method"] == "full"
    assert card["final_loss"] == card["loss_history"][-1]["loss"] and len(card["loss_history"]) == 6
    assert card["config"]["learning_rate"] == 2e-4 and card["effective_batch"] == 8
    assert json.loads((tmp_path / "model" / "card.json").read_text())["data"]["hash"] == card["data"]["hash"]
    model, tok = load_causal_lm(str(tmp_path / "model"), dtype="float32", device="cpu")
    prompt, _ = render_chat(tok, data[1]["instruction"], "")
    out = model.generate(**tok(prompt, return_tensors="pt", add_special_tokens=False), max_new_tokens=4, do_sample=False)
    assert isinstance(tok.decode(out[0]), str)
    assert not (tmp_path / "model.partial").exists()



def test_lora_sft_lowers_the_loss_and_saves_a_merged_model(tmp_path):
    "LoRA (peft) on the real student: the adapters learn, and the saved model is the merged plain model."
    data = records(24)
    before = completion_loss("smollm2-135m-instruct", data)
    cfg = TrainingConfig(epochs=1, learning_rate=2e-3, per_device_batch_size=8, gradient_accumulation_steps=1,
                         max_length=96, packing=False, gradient_checkpointing=False, logging_steps=1, lora=True,
                         lora_r=8, lora_alpha=16, lora_dropout=0.0)
    card = train_student("smollm2-135m-instruct", data, tmp_path / "model", cfg, STUDENT, progress=False)
    assert card["method"] == "lora" and card["steps"] == 3
    after = completion_loss(str(tmp_path / "model"), data)
    assert after < 0.9 * before, (before, after)
    assert not (tmp_path / "model" / "adapter_config.json").exists()  # merged: loads without peft
    model, _ = load_causal_lm(str(tmp_path / "model"), dtype="float32", device="cpu")
    assert not any("lora" in n for n, _ in model.named_parameters())

def _ctx(tmp_path, **training):
    from compeffdist.engines import RunContext
    cfg = load_config("configs/demo.yaml", {"run.out": str(tmp_path / "run"), "warmup.fraction": 0.5,
                                            "warmup.training.max_steps": 1, "training.max_steps": 1,
                                            "student.device": "cpu"})
    return RunContext(cfg, RunStore(cfg.run.out), progress=False)


def test_warmup_and_training_stages(tmp_path):
    ctx = _ctx(tmp_path)
    data = records(10)
    data[3]["verification"] = {"ok": False, "reasons": ["bad"]}
    write_jsonl(ctx.store.path("responses", "samples.jsonl"), data)
    stats = run_warmup(ctx)
    card = json.loads((ctx.store.root / "warmup" / "card.json").read_text())
    assert stats.drops["verification_failed"] == 1 and stats.counts["samples_trained"] == 4  # round(0.5 * 9)
    assert len(card["sample_ids"]) == 4 and "s3" not in card["sample_ids"] and card["steps"] == 1
    assert (ctx.store.root / "warmup" / "model" / "config.json").is_file()
    write_jsonl(ctx.store.path("sampling", "kept.jsonl"), data[:6])
    stats = run_training(ctx)
    assert stats.counts["samples_trained"] == 6
    assert (ctx.store.root / "training" / "model" / "model.safetensors").is_file()
    assert json.loads((ctx.store.root / "training" / "card.json").read_text())["data"]["samples"] == 6


def test_train_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train"])
    assert main(["train", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "m")]) == 2
    assert "file not found" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"teacher: {{model: qwen2.5-coder-1.5b-instruct}}\nstudent: {{model: smollm2-135m-instruct}}\n"
                   f"run: {{out: {tmp_path / 'run'}}}\n")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sampling/kept.jsonl not found" in err[0]
    assert main(["train", "--config", str(cfg), "--data", str(tmp_path / "x.jsonl"), "--out", "o", "--lr", "-1"]) == 2


def test_the_demo_runs_training_data_is_drawn_and_tokenised_again(tok):
    """The committed demo run: the warm-up subset is drawn again from its verified answers, and the kept samples
    tokenise to the data section of its training card (hash, counts, tokens)."""
    from pathlib import Path
    from compeffdist.core import read_json, read_jsonl
    from compeffdist.training import data_hash, warmup_subset
    fx = Path(__file__).parent / "fixtures" / "demo_run"
    cfg = load_config(fx / "config.yaml")
    ok, subset = warmup_subset(read_jsonl(fx / "responses" / "samples.jsonl"), cfg.warmup, cfg.run.seed)
    card = read_json(fx / "warmup" / "card.json")
    assert [r["id"] for r in subset] == card["sample_ids"] and data_hash(subset) == card["data"]["hash"]
    kept = read_jsonl(fx / "sampling" / "kept.jsonl")
    _, info = tokenize_records(tok, kept, cfg.training.max_length)
    assert {"source": "records", "hash": data_hash(kept), **info} == read_json(fx / "training" / "card.json")["data"]


def test_the_batch_of_a_step_does_not_change_with_the_number_of_processes(monkeypatch):
    "The paper's 262,144 tokens per step: 128 packed rows of 2,048 tokens on 1 to 16 processes (WORLD_SIZE faked)."
    from compeffdist.training import batch_plan, world_size
    cfg = TrainingConfig(batch_tokens=262_144, max_length=2048, per_device_batch_size=8)
    for world in (1, 2, 4, 8, 16):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        plan = batch_plan(cfg, True, world_size())
        assert plan["accumulation"] == 16 // world and plan["per_step"] == 128 and plan["tokens_per_step"] == 262_144
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(CompeffdistError, match="not a whole multiple of per_device_batch_size 8 x 3"):
        batch_plan(cfg, True, world_size())
    samples = cfg.model_copy(update={"batch_tokens": None, "batch_samples": 64})
    assert [batch_plan(samples, False, w)["accumulation"] for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(CompeffdistError, match="packed rows hold several"):
        batch_plan(samples, True, 1)
    # padded batches from a token budget: as many samples as hold the tokens on average, in whole accumulation steps
    assert batch_plan(cfg, False, 2, mean_tokens=512)["per_step"] == 512
    with pytest.raises(ValueError, match="not both"):
        TrainingConfig(batch_tokens=1024, batch_samples=8)


def test_packing_falls_back_to_padded_batches_without_flash_attention(tmp_path, monkeypatch, caplog):
    "On CPU (SDPA, no variable-length kernel) packing is not used: padded batches grouped by length, logged and carded."
    import compeffdist.training as training
    from compeffdist.pipeline import make_tiny_student
    tiny = make_tiny_student(tmp_path / "tiny")
    seen, sft_args = [], training.sft_args
    monkeypatch.setattr(training, "sft_args", lambda *a, **k: seen.append(sft_args(*a, **k)) or seen[-1])
    cfg = TrainingConfig(max_steps=2, per_device_batch_size=2, batch_samples=4, max_length=64, packing=True,
                         gradient_checkpointing=False, logging_steps=1)
    with caplog.at_level("WARNING", logger="compeffdist.training"):
        card = train_student(str(tiny), records(12), tmp_path / "m", cfg,
                             ModelConfig(model=str(tiny), device="cpu", dtype="float32"), progress=False)
    assert card["attn_implementation"] == "sdpa" and card["steps"] == 2
    assert card["packing"]["asked"] and not card["packing"]["used"] and "flash-attn" in card["packing"]["reason"]
    assert any("packing asked, but no variable-length attention kernel" in r.message for r in caplog.records)
    assert not seen[0].packing and not seen[0].padding_free and seen[0].train_sampling_strategy == "group_by_length"
    assert card["batch"]["unit"] == "samples" and card["batch"]["accumulation"] == 2 and card["effective_batch"] == 4
    assert card["config"]["packing"] is True  # the card keeps the config as given
