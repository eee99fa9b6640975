"""The evaluation stage on a GPU node, checked on CPU: the models it scores in the process that trained the student
are freed, and the CUDA cache emptied, before vLLM starts (vLLM refuses to start when its share of the GPU is not
free); vLLM models go last; each model's own batch size is used; the vLLM backend gets the model's revision, options
and text-only settings. What vLLM itself does with them needs vLLM (make test-vllm) or a GPU."""
import gc

import pytest
import torch

import compeffdist.sentibench as sb
from compeffdist.core import ModelConfig, RunStore, load_config
from compeffdist.engines import RunContext
from compeffdist.pipeline import make_tiny_student


def _live_models() -> int:
    from transformers import PreTrainedModel
    return sum(issubclass(type(o), PreTrainedModel) for o in gc.get_objects())


class _RecordingVLLM:
    "Stands in for vllm.LLM's backend: records what was alive when it started, answers 'positive' to everything."
    name, TOP_K = "vllm", 20

    def __init__(self, events, model, **kw):
        from compeffdist.models import resolve_model
        events.append(("vllm starts", _live_models()))
        self.ref, self.kw, self.events = resolve_model(model, kw.get("revision")), kw, events

    def first_token(self, text):
        return hash(text) % 1000

    def next_token_scores(self, prompts, token_ids):
        return [([1.0] + [0.0] * (len(token_ids) - 1), token_ids[0]) for _ in prompts]

    def close(self):
        self.events.append(("vllm closed", None))


@pytest.fixture
def events(monkeypatch):
    import compeffdist.training as training
    log = []
    monkeypatch.setattr(training, "_cuda_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "ipc_collect", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: log.append(("empty_cache", _live_models())))
    monkeypatch.setattr(sb, "VLLMBackend", lambda model, **kw: _RecordingVLLM(log, model, **kw))
    return log


@pytest.mark.sentibench
def test_models_are_freed_before_vllm_starts(sentibench_root, tmp_path, events, monkeypatch):
    tiny = make_tiny_student(tmp_path / "tiny")
    cfg = load_config("configs/demo.yaml", {
        "run.out": str(tmp_path / "run"), "data.sentibench": str(sentibench_root),
        "student": {"model": str(tiny), "device": "cpu", "dtype": "float32", "batch_size": 3},
        "teacher": {"model": str(tiny), "engine": "vllm", "revision": None, "options": {"enforce_eager": True}},
        "evaluation.datasets": ["sc/sst2"], "evaluation.limit": 2, "evaluation.seeds": [42],
        "evaluation.models": ["teacher", "base_student"]})  # the teacher first in the config
    ctx = RunContext(cfg, RunStore(cfg.run.out), progress=False)
    real_hf = sb.HFBackend

    def hf(*a, **kw):
        events.append(("hf opens", kw["batch_size"]))
        return real_hf(*a, **kw)

    monkeypatch.setattr(sb, "HFBackend", hf)
    stats = sb.run_evaluation(ctx)
    names = [e[0] for e in events]
    assert names.index("hf opens") < names.index("vllm starts")  # the vLLM model goes last
    assert ("hf opens", 3) in events  # with the student's own batch size (evaluation.batch_size not set)
    start = names.index("vllm starts")
    assert events[start] == ("vllm starts", 0)  # no model alive when vLLM starts ...
    assert events[start - 1] == ("empty_cache", 0)  # ... right after the cache was emptied
    assert events[-2:] == [("vllm closed", None), ("empty_cache", 0)]  # vLLM's memory is released in turn
    assert stats.counts["models"] == 2 and {"teacher_mean", "base_student_mean"} <= set(stats.info)

def test_the_vllm_backend_gets_the_model_settings(monkeypatch):
    """open_backend and VLLMBackend pass revision, tokenizer and every option on to vllm.LLM, less the engine-only
    ones (a stand-in vllm module records the call; test_sentibench_vllm.py checks what real vLLM does with them)."""
    import sys
    import types
    got = {}

    class LLM:
        def __init__(self, **kw): got.update(kw)
        def get_tokenizer(self): return None
        def get_default_sampling_params(self): return types.SimpleNamespace(repetition_penalty=None)

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM))
    mc = ModelConfig(model="org/teacher", engine="vllm", revision="abc123", tokenizer="org/tok", dtype="bfloat16",
                     tensor_parallel_size=4, gpu_memory_utilization=0.85, context_length=16384,
                     options={"enforce_eager": True, "max_num_seqs": 64, "load_gguf": False, "chunk_size": 32,
                              "chat_template_kwargs": {"enable_thinking": False}})
    be = sb.open_backend(mc)
    assert isinstance(be, sb.VLLMBackend) and be.ref.identity == "org/teacher@abc123"
    assert got == {"model": "org/teacher", "tokenizer": "org/tok", "revision": "abc123", "dtype": "bfloat16",
                   "max_model_len": 16384, "logprobs_mode": "raw_logits", "gpu_memory_utilization": 0.85,
                   "tensor_parallel_size": 4, "enforce_eager": True, "max_num_seqs": 64}


def test_gemma3_loads_text_only(tmp_path):
    "A checkpoint with a vision tower (Gemma-3-4B's config) gets limit_mm_per_prompt image 0; a text model nothing."
    from transformers import Gemma3Config, LlamaConfig
    from compeffdist.engines import text_only_kwargs
    Gemma3Config().save_pretrained(tmp_path / "gemma3")
    LlamaConfig().save_pretrained(tmp_path / "llama")
    assert text_only_kwargs(str(tmp_path / "gemma3")) == {"limit_mm_per_prompt": {"image": 0}}
    assert text_only_kwargs(str(tmp_path / "llama")) == {}


def test_a_bf16_student_scores_labels_with_float32_logits():
    "bf16 logits take few values (labels can tie exactly); the hf backend reads the output layer in float32."
    be = sb.HFBackend("smollm2-135m-instruct", dtype="bfloat16", device="cpu")
    prompts = ["Sentence: What a wonderful film.\nLabel:", "Sentence: Dull and far too long.\nLabel:"]
    ids = [be.first_token(" positive"), be.first_token(" negative")]
    in_bf16 = lambda x: x == float(torch.tensor(x).bfloat16())  # a value bf16 can hold exactly
    scores = [s for row, _ in be.next_token_scores(prompts, ids) for s in row]
    assert next(be.model.parameters()).dtype == torch.bfloat16
    assert not all(in_bf16(s) for s in scores), scores  # float32 logits
    with torch.no_grad():  # the bf16 output layer itself gives bf16 values
        raw = be.model(**be.tokenizer(prompts, return_tensors="pt", padding=True)).logits[:, -1, ids].float()
    assert all(in_bf16(s) for s in raw.flatten().tolist())
    be.close()
