"""SentiBench classification scoring: examples/s of batched first-step scoring vs one example at a time.

Same model, same examples (k-shot prompts of BSA/MSA datasets), one run. Three ways to score:

* batched   : `HFBackend.next_token_scores`, `--batch-size` prompts per forward pass (sorted by length, last-position
              logits only) -- what `compeffdist eval` does;
* single    : the same code with one prompt per forward pass;
* reference : one prompt at a time through `model.generate(max_new_tokens=2, output_scores=True)`, as the
              reference evaluation reads its first-step scores (its batch of 4 is left out: one at a time).

It checks that the three give the same predictions and prints examples/s and the speed-up of batched scoring.
`--teacher` also times the GGUF teacher through llama.cpp (`LlamaCppBackend`) against its dequantised copy in
transformers (fewer examples: both are slow on CPU).

    python benchmarks/eval.py                                  # SmolLM2-135M, 32 examples, batch 16
    python benchmarks/eval.py --n 64 --batch-size 32 --device cuda
    python benchmarks/eval.py --teacher --teacher-n 4
"""
import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from compeffdist.sentibench import HFBackend, LlamaCppBackend, build_examples, verbalizer


def examples(datasets, n, shots, max_chars):
    per = -(-n // len(datasets))
    out = []
    for name in datasets:
        out += [(name, e.prompt) for e in build_examples(name, shots, 42, per, max_chars)]
    return out[:n]


def score(backend, items):
    "Predicted label index per item, scoring each dataset's prompts in one call."
    preds, t0 = [], time.perf_counter()
    for name in dict.fromkeys(n for n, _ in items):
        ids = verbalizer(backend, name)
        rows = backend.next_token_scores([p for m, p in items if m == name], ids)
        preds += [max(range(len(ids)), key=lambda k: s[k]) for s, _ in rows]
    return preds, time.perf_counter() - t0


def score_reference(backend, items):
    "One prompt at a time through generate(max_new_tokens=2, output_scores=True), as the reference."
    import torch
    tok, model, preds = backend.tokenizer, backend.model, []
    t0 = time.perf_counter()
    for name, prompt in items:
        ids = verbalizer(backend, name)
        enc = tok([prompt], return_tensors="pt").to(backend.device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=2, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
        preds.append(int(out.scores[0][0, ids].argmax()))
    return preds, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--datasets", default="sc/sst2,sc/twitter,multifaced/irony18,multifaced/tweeteval")
    ap.add_argument("--n", type=int, default=32, help="examples in all")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--max-chars", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--teacher", action="store_true", help="also time the GGUF teacher: llama.cpp vs transformers")
    ap.add_argument("--teacher-model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--teacher-n", type=int, default=4)
    a = ap.parse_args()
    items = examples(a.datasets.split(","), a.n, a.shots, a.max_chars)
    hf = HFBackend(a.model, dtype=a.dtype, device=a.device, batch_size=a.batch_size)
    n_tok = sum(len(hf.tokenizer(p)["input_ids"]) for _, p in items)
    print(f"{a.model} on {a.device}: {len(items)} examples ({n_tok / len(items):.0f} prompt tokens on average), "
          f"{a.shots}-shot, datasets {a.datasets}")
    score(hf, items[:2])  # warm-up
    batched, t_b = score(hf, items)
    hf.batch_size = 1
    single, t_s = score(hf, items)
    ref, t_r = score_reference(hf, items)
    agree = lambda x: sum(p == q for p, q in zip(batched, x)) / len(items)
    print(f"batched (batch {a.batch_size}): {len(items) / t_b:7.2f} examples/s")
    print(f"single (batch 1)  : {len(items) / t_s:7.2f} examples/s   agreement with batched {agree(single):.0%}")
    print(f"reference generate: {len(items) / t_r:7.2f} examples/s   agreement with batched {agree(ref):.0%}")
    print(f"speed-up of batched scoring: {t_s / t_b:.2f}x vs single, {t_r / t_b:.2f}x vs reference-style generate")
    hf.close()
    if a.teacher:
        titems = items[:a.teacher_n]
        lc = LlamaCppBackend(a.teacher_model, context_length=8192)
        score(lc, titems[:1])
        p_lc, t_lc = score(lc, titems)
        lc.close()
        tf = HFBackend(a.teacher_model, dtype="float32", device=a.device, batch_size=1)
        score(tf, titems[:1])
        p_tf, t_tf = score(tf, titems)
        print(f"teacher {a.teacher_model}, {len(titems)} examples: llama.cpp {len(titems) / t_lc:.3f} examples/s, "
              f"transformers (dequantised fp32) {len(titems) / t_tf:.3f} examples/s: llama.cpp {t_tf / t_lc:.2f}x; "
              f"same predictions on {sum(x == y for x, y in zip(p_lc, p_tf))}/{len(titems)}")


if __name__ == "__main__":
    main()
