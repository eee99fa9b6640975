"""SentiBench evaluation on the `vllm` backend, on a real model (run in `.venv-vllm` by `make test-vllm`).

Its own module: vLLM on CPU sizes its KV cache against the memory of the process, so this test's `vllm.LLM` must
not share the process with the engine tests' one.
"""
import importlib.util
import os

import pytest

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed here: run `make test-vllm`")



@needs_vllm
def test_sentibench_backend_agrees_with_transformers(sentibench_root):
    "SentiBench first-step scores from vLLM (one restricted greedy step, raw logits) match transformers' logits."
    from compeffdist.sentibench import HFBackend, VLLMBackend, build_examples, predict, verbalizer
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    vb = VLLMBackend("smollm2-135m-instruct", dtype="float32", context_length=2048, gpu_memory_utilization=0.2,
                     enforce_eager=True)
    hb = HFBackend("smollm2-135m-instruct", dtype="float32", device="cpu", batch_size=4)
    try:
        for name in ("sc/sst2", "multifaced/irony18"):
            examples = build_examples(name, shots=4, seed=42, limit=6, max_chars=600, root=sentibench_root)
            assert verbalizer(vb, name) == verbalizer(hb, name)
            pv, dv = predict(vb, name, examples)
            ph, dh = predict(hb, name, examples)
            assert [p["prediction"] for p in pv] == [p["prediction"] for p in ph], name
            for a, b in zip(pv, ph):  # logits the top 20 holds agree; the others are -inf on the vLLM side
                for x, y in zip(a["scores"], b["scores"]):
                    assert x == float("-inf") or abs(x - y) < 1e-2 * max(1.0, abs(y)), (name, x, y)
            assert dv == dh
        conts = vb.generate([examples[0].prompt], 8)
        assert conts == hb.generate([examples[0].prompt], 8)  # greedy continuations agree too
    finally:
        vb.close(); hb.close()


@needs_vllm
def test_backend_settings_reach_vllm_and_close_shuts_it_down():
    "The model's options reach vllm.LLM (engine-only ones are dropped); close() shuts the engine down at once."
    from compeffdist.sentibench import VLLMBackend
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    vb = VLLMBackend("smollm2-135m-instruct", dtype="float32", context_length=2048, gpu_memory_utilization=0.2,
                     enforce_eager=True, max_num_seqs=5, chunk_size=7, load_gguf=False)
    engine = vb.llm.llm_engine
    assert engine.vllm_config.scheduler_config.max_num_seqs == 5 and engine.vllm_config.model_config.enforce_eager
    assert engine.vllm_config.model_config.max_model_len == 2048
    assert vb.generate(["Sentence: great\nLabel:"], 2)[0]  # it answers
    vb.close()
    assert vb.llm is None and not engine.engine_core._finalizer.alive  # shut down now, not at garbage collection
