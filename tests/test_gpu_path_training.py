"""The multi-GPU paths of training that a CPU can exercise: two processes under `accelerate launch` (DDP over gloo)
that save through the trainer's own save path (LoRA merged by the main process), and the order in which a
training run gives its memory back (models collected before the CUDA cache is emptied). Sharded saving (FSDP,
ZeRO-3) and several GPUs in one process need GPUs."""
import gc
import os
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from compeffdist.core import ModelConfig, TrainingConfig, write_jsonl
from compeffdist.pipeline import make_tiny_student


def _records(n=16):
    return [{"instruction": f"Repeat {i}.", "output": f"word {i} " * (1 + i % 3)} for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_student(tmp_path_factory.mktemp("tiny") / "model")


def _weights(path):
    from safetensors.torch import load_file
    return load_file(str(Path(path) / "model.safetensors"))


@pytest.mark.parametrize("lora", [False, True])
def test_two_processes_save_one_whole_model(tmp_path, tiny, lora):
    write_jsonl(tmp_path / "data.jsonl", _records())
    accelerate = Path(sys.executable).with_name("accelerate")
    cli = Path(sys.executable).with_name("compeffdist")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(cli), "train", "--data", "data.jsonl",
           "--out", "model", "--model", str(tiny), "--device", "cpu", "--max-steps", "2", "--batch-size", "2",
           "--grad-accum", "2", "--max-length", "64", "--lr", "1e-2"] + (["--lora"] if lora else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained ") == 1  # the main process reports, once
    card = json.loads((tmp_path / "model" / "card.json").read_text())
    assert card["world_size"] == 2 and card["distributed"] == "MULTI_CPU" and card["steps"] == 2
    assert card["effective_batch"] == 2 * 2 * 2 and card["method"] == ("lora" if lora else "full")
    assert card["tokens_seen"] > 0 and card["attn_implementation"] == "sdpa"
    names = {p.name for p in (tmp_path / "model").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert not names & {"training_args.bin", "adapter_config.json", "adapter_model.safetensors"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "model"]  # no partial or adapter folder
    before, after = _weights(tiny), _weights(tmp_path / "model")
    assert before.keys() == after.keys() and all(before[k].shape == after[k].shape for k in before)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained (and, for LoRA, merged)
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "model").config.use_cache


def _live_models() -> int:
    from transformers import PreTrainedModel
    return sum(issubclass(type(o), PreTrainedModel) for o in gc.get_objects())


@pytest.fixture
def cuda_recorder(monkeypatch):
    "Make `release_memory` act as on a GPU; record, at each `empty_cache`, how many models are still alive."
    import compeffdist.training as training
    calls = []
    monkeypatch.setattr(training, "_cuda_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "ipc_collect", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(_live_models()))
    return calls


def test_training_frees_its_models_before_emptying_the_cache(tmp_path, tiny, cuda_recorder):
    from compeffdist.training import train_student
    gc.collect()
    assert _live_models() == 0
    cfg = TrainingConfig(max_steps=2, per_device_batch_size=4, gradient_accumulation_steps=1, max_length=64,
                         gradient_checkpointing=True, lora=True, logging_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        card = train_student(str(tiny), _records(8), tmp_path / "out", cfg,
                             ModelConfig(model=str(tiny), device="cpu", dtype="float32"), progress=False)
    assert card["steps"] == 2
    assert cuda_recorder and cuda_recorder[-1] == 0, cuda_recorder  # nothing alive when the cache is emptied
    deprecated = [str(w.message) for w in caught if "checkpointing" in str(w.message)]
    assert not deprecated, deprecated


def test_the_shipped_fsdp_config_launches_two_processes_with_the_stated_batch(tmp_path, tiny):
    """`accelerate launch --config_file configs/accelerate-fsdp.yaml` on two CPU processes: the batch of a step is the
    configured one (accumulation derived from the two processes) and one whole model is saved. Without GPUs accelerate
    runs an FSDP config as plain data parallelism (the card's `distributed` says MULTI_CPU): the sharding itself
    needs GPUs."""
    write_jsonl(tmp_path / "data.jsonl", _records())
    accelerate = Path(sys.executable).with_name("accelerate")
    cli = Path(sys.executable).with_name("compeffdist")
    root = Path(__file__).resolve().parents[1]
    cmd = [str(accelerate), "launch", "--config_file", str(root / "configs" / "accelerate-fsdp.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", str(cli), "train", "--data", "data.jsonl", "--out",
           "model", "--model", str(tiny), "--device", "cpu", "--max-steps", "2", "--batch-size", "2",
           "--batch-samples", "8", "--max-length", "64", "--lr", "1e-2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((tmp_path / "model" / "card.json").read_text())
    assert card["world_size"] == 2 and card["distributed"] == "MULTI_CPU"
    assert card["batch"]["accumulation"] == 2 and card["batch"]["per_step"] == card["effective_batch"] == 8
    assert _weights(tiny).keys() == _weights(tmp_path / "model").keys()


def test_the_shipped_zero3_config_saves_one_model():
    "configs/accelerate-zero3.yaml as accelerate reads it gathers 16-bit weights on save, which check_full_save needs."
    from types import SimpleNamespace
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin
    from compeffdist.core import CompeffdistError
    from compeffdist.training import check_full_save
    root = Path(__file__).resolve().parents[1]
    ds = load_config_from_file(str(root / "configs" / "accelerate-zero3.yaml")).deepspeed_config

    def trainer(**over):
        plugin = DeepSpeedPlugin(**{**ds, **over})
        return SimpleNamespace(is_fsdp_enabled=False, is_deepspeed_enabled=True,
                               accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)))
    assert ds["zero_stage"] == 3
    check_full_save(trainer())
    with pytest.raises(CompeffdistError, match="zero3_save_16bit_model"):
        check_full_save(trainer(zero3_save_16bit_model=False))
