"""A Gemma-3 student: a multimodal checkpoint (gemma-3-4b-it's layout) loads as the text-only `Gemma3ForCausalLM`
for training and difficulty scoring, and a shrunken Gemma-3 (random weights, the real architecture, embedding
size and vocabulary size) trains and is scored on CPU through the package's own paths."""
import json

import pytest
import torch

from compeffdist.core import CompeffdistError, ModelConfig, TrainingConfig
from compeffdist.models import GEMMA3_EMBED_ROWS, GEMMA3_VOCAB, load_causal_lm, load_text_lm, make_tiny_gemma3

WORDS = ["great", "awful", "fine", "boring", "lovely", "dull", "superb", "bad"]


def records(n):
    return [{"id": f"s{i}", "instruction": f"Repeat the first word of the input.\n\nInput: {WORDS[i % 8]} movie {i}",
             "output": f"{WORDS[i % 8]}, as the input says" + " indeed" * (i % 3)} for i in range(n)]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return make_tiny_gemma3(tmp_path_factory.mktemp("gemma3") / "model")


def test_the_multimodal_checkpoint_loads_as_the_text_model(gemma):
    from transformers import AutoModelForCausalLM
    cfg = json.loads((gemma / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForConditionalGeneration"] and "vision_config" in cfg
    whole = AutoModelForCausalLM.from_pretrained(gemma)
    model, tok = load_causal_lm(str(gemma), dtype="float32", device="cpu")
    assert type(whole).__name__ == "Gemma3ForConditionalGeneration"
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    assert not any("vision" in n or "multi_modal" in n for n, _ in model.named_parameters())
    assert len(tok) == GEMMA3_VOCAB and model.get_output_embeddings().weight.shape[0] == GEMMA3_EMBED_ROWS
    ids = tok("<start_of_turn>user\nGreat film!<end_of_turn>\n", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        assert torch.equal(whole(**ids).logits, model(**ids).logits)  # the same text weights, read without the tower


def test_text_weights_that_are_not_found_raise(gemma, tmp_path):
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(gemma, tmp_path / "m")
    w = load_file(str(tmp_path / "m" / "model.safetensors"))
    save_file({k.replace("language_model.", "llm."): v for k, v in w.items()}, str(tmp_path / "m" / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(CompeffdistError, match="text weights .* were not found"):
        load_text_lm(str(tmp_path / "m"))


def test_a_shrunken_gemma3_trains_through_train_student(gemma, tmp_path, monkeypatch):
    """A few SFT steps; the loss never builds the whole logits (TRL's fused LM head reads the output layer's weight
    in tiles and never calls the layer itself: at a 262K vocabulary the logits of a packed batch are tens of GB)."""
    from safetensors import safe_open
    import compeffdist.models as models
    from compeffdist.training import train_student
    head_calls, load = [], models.load_text_lm

    def counting_load(*args, **kw):
        net = load(*args, **kw)
        net.get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))
        return net
    monkeypatch.setattr(models, "load_text_lm", counting_load)
    cfg = TrainingConfig(max_steps=3, learning_rate=1e-3, per_device_batch_size=4, gradient_accumulation_steps=1,
                         max_length=128, packing=False, gradient_checkpointing=True, logging_steps=1)
    card = train_student(str(gemma), records(12), tmp_path / "out", cfg,
                         ModelConfig(model=str(gemma), device="cpu", dtype="float32"), progress=False)
    assert card["steps"] == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in card["loss_history"])
    assert head_calls == []  # three steps of training, and no whole-logits forward of the output layer
    out = tmp_path / "out"
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["Gemma3ForCausalLM"] and saved["model_type"] == "gemma3_text"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("vision" in k or "multi_modal" in k for k in keys)
    before, _ = load_causal_lm(str(gemma), dtype="float32", device="cpu")
    after, _ = load_causal_lm(str(out), dtype="float32", device="cpu")
    assert type(after).__name__ == "Gemma3ForCausalLM"
    changed = [n for (n, p), q in zip(before.named_parameters(), after.parameters()) if not torch.equal(p, q)]
    assert "model.embed_tokens.weight" in changed and len(changed) > 10


def test_a_shrunken_gemma3_is_scored(gemma):
    from compeffdist.difficulty import DifficultyScorer, reference_rank_score
    sc = DifficultyScorer.load(str(gemma), device="cpu", dtype="float32", batch_size=4, max_length=128)
    assert type(sc.model).__name__ == "Gemma3ForCausalLM"
    data = records(6)
    got = sc.score(data)
    assert all(set(g) == {"rank", "ppl", "ifd", "length"} for g in got)
    ref = [reference_rank_score(sc.model, sc.tokenizer, r, "chat", 128) for r in data]
    assert max(abs(g["rank"] - r) for g, r in zip(got, ref)) < 1e-5
    assert all(0 < g["rank"] <= 1 and g["ppl"] > 1 for g in got)
