"""GPU check of compeffdist's student-side paths, offline, in a few minutes on one GPU: one line per figure, with its
target and PASS or FAIL; the exit status is 1 when a figure misses its target, 2 when the check cannot run.

A randomly initialised model of the students' architecture (Qwen2.5-3B by default; `--arch qwen3-1.7b` for
Qwen3) stands in for the student: speed and agreement need no trained weights. Two changes make it behave enough
like a trained model for the difficulty score to mean something: its output layer is not tied to the input
embeddings (a random tied model only repeats its last token, +0.3B parameters), and its final norm is scaled so
that its next-token distributions are peaked (logit standard deviation 6; the median nucleus is printed), since a
random model's flat distributions make every rank a near-tie. The responses it is scored and trained on are its
own sampled continuations of short sentiment instructions, so their tokens sit where a student's would in its
distribution.

Figures and targets (speed targets are judged on a GPU only, or everywhere with --judge-speed; `--target NAME=X`
changes one):
  generation    compeffdist's hf evaluation backend, greedy: a batch of --batch-size prompts against the same
                generation one prompt at a time, tokens per second [batching >= 4x]
  difficulty    the ranking-based difficulty of every response, in bf16 and in float32, batched (`DifficultyScorer`)
                against two baselines: the same batched forward passes without the ranking (`tail_logits` over the
                same batches: what the ranking adds) [overhead <= 1.5x], and the reference loop (one unpadded
                forward pass per sample, then a full vocabulary sort per token: `reference_rank_score`)
                [speed-up >= 20x]
  agreement     the largest |batched score - reference loop score| in the same precision [<= 3 x the largest change
                that the precision itself makes to the reference loop's scores, against the reference loop in full
                float32 (TF32 off), and never below 1e-5]. Float32 scoring on a GPU uses TF32 matmuls (10 of float32's
                23 mantissa bits in matmul inputs), so its tolerance is what TF32 moves the reference; on a CPU float32
                is exact and the target is 1e-5. The Spearman correlation of the two is printed.
  training      a few TRL SFT steps of `train_student` in bf16 (packed rows where FlashAttention is installed, else
                padded batches: `packing_plan`) [every logged loss finite; packing used exactly when FlashAttention
                is installed; the output layer never computes whole logits (TRL's fused LM head)]; tokens per second
                and peak GPU memory printed

Run it from the repository root (`PYTHONPATH=.`) or from an install, with nothing to download:

    python benchmarks/gpu_check.py                          # one GPU, ~3-5 minutes
    python benchmarks/gpu_check.py --device cpu --tiny      # the same path with a tiny model on CPU (~2 minutes)

Needs a CUDA build of torch and the packages of a GPU machine's image (numpy, pandas, pyarrow>=24, xxhash,
accelerate, tokenizers, safetensors, huggingface_hub, pyyaml, tqdm, jinja2, psutil), plus the exact wheels in
`benchmarks/gpu_wheels.txt` (transformers 5.24.0, trl 1.16.0, datasets 5.2.0 and their missing dependencies, pydantic,
fastcore): `make gpu-wheels` downloads them for Python 3.12 into .gpu-wheels/ (18.5 MiB), and on the GPU machine

    pip install --no-index --no-deps --target /tmp/site .gpu-wheels/*.whl
    PYTHONPATH=/tmp/site:. python benchmarks/gpu_check.py

The check verifies these versions, and what trl, datasets and transformers require of the image, before it starts.
flash-attn is used for training when installed. Small files: the Qwen2.5 tokenizer in
`benchmarks/gpu_check_tokenizer/` (2 MB, gzip; taken from the Qwen2.5-Coder-1.5B-Instruct GGUF that the `offline`
extra ships as the default teacher).
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
ROOT = HERE.parent
if str(ROOT) not in sys.path and (ROOT / "compeffdist" / "__init__.py").is_file():
    sys.path.append(str(ROOT))  # run from a checkout without PYTHONPATH=. or an install
WHEELS = HERE / "gpu_wheels.txt"
IMAGE = ["torch", "numpy", "pandas", "pyarrow", "xxhash", "accelerate", "tokenizers", "safetensors", "huggingface_hub",
         "pyyaml", "tqdm", "jinja2", "psutil", "packaging"]  # what a GPU machine's image brings
TARGETS = {"batching": 4.0, "overhead": 1.5, "speedup": 20.0, "agreement_factor": 3.0, "agreement_min": 1e-5}
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


RESULTS: list[bool] = []


def line(name: str, text: str, ok: bool | None = None) -> None:
    "One figure: its name, the figure with its target, and PASS/FAIL when it is judged."
    if ok is not None:
        RESULTS.append(ok)
    print(f"{name:<20} {text}" + ("" if ok is None else f"  {'PASS' if ok else 'FAIL'}"), flush=True)


def missing_wheels() -> list[str]:
    """What the environment lacks: each exact version of gpu_wheels.txt, and what trl, datasets, transformers and
    accelerate require of the image (torch, pyarrow, ...), as 'name: found X, needs Y'."""
    from importlib import metadata
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return ["packaging: not installed"]
    need = [Requirement(l.split("#")[0].strip()) for l in WHEELS.read_text().splitlines() if l.split("#")[0].strip()]
    need += [Requirement(n) for n in IMAGE]
    for dist in ("trl", "datasets", "transformers", "accelerate"):
        try:
            reqs = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            continue  # reported by its own line
        need += [r for r in map(Requirement, reqs) if r.marker is None]
    out, seen = [], set()
    for r in need:
        key = (r.name.lower().replace("_", "-"), str(r.specifier))
        if key in seen:
            continue
        seen.add(key)
        try:
            found = metadata.version(r.name)
        except metadata.PackageNotFoundError:
            out.append(f"{r.name}: not installed, needs {r.specifier or 'any version'}")
            continue
        if r.specifier and not r.specifier.contains(found, prereleases=True):
            out.append(f"{r.name}: found {found}, needs {r.specifier}")
    if importlib.util.find_spec("compeffdist") is None:
        out.append("compeffdist: not importable (run from the repository root with PYTHONPATH=., or pip install --no-deps -e .)")
    return out


def parse_targets(items: list[str]) -> dict:
    targets = dict(TARGETS)
    for item in items:
        k, _, v = item.partition("=")
        if k not in targets:
            sys.exit(f"error: unknown target {k!r}; targets: {', '.join(targets)}")
        targets[k] = float(v)
    return targets


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


@contextlib.contextmanager
def full_float32():
    "Within the block, float32 matmuls run in full float32 (TF32 off)."
    import torch
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def check_generation(model_dir: Path, records: list[dict], a, device: str) -> None:
    from compeffdist.backends import HFBackend
    from compeffdist.difficulty import chat_prompt
    be = HFBackend(str(model_dir), dtype="bfloat16", device=device, batch_size=a.batch_size)
    prompts = [chat_prompt(be.tokenizer, r["instruction"]) for r in records[:a.batch_size]]
    be.generate(prompts[:2], 4)  # warm-up
    be.model.generation_config.eos_token_id = None  # every sequence runs the full length: a fixed amount of work
    sync(device); t = time.perf_counter()
    be.generate(prompts, a.new_tokens)
    sync(device); batched = len(prompts) * a.new_tokens / (time.perf_counter() - t)
    singles = prompts[:2]
    sync(device); t = time.perf_counter()
    for p in singles:
        be.generate([p], a.new_tokens)
    sync(device); single = len(singles) * a.new_tokens / (time.perf_counter() - t)
    judged = a.judge_speed or device.startswith("cuda")
    line("generation", f"hf backend, greedy, {a.new_tokens} new tokens: batch of {len(prompts)} {batched:,.0f} tokens/s, "
                       f"one at a time {single:,.0f} tokens/s: {batched / single:.1f}x "
                       f"[target >= {a.targets['batching']:g}x{'' if judged else '; not judged on CPU'}]",
         batched / single >= a.targets["batching"] if judged else None)
    be.close()


def batched_forward_seconds(sc, records: list[dict], device: str) -> float:
    "The scorer's own batches (longest first, `batch_size` a batch) through `tail_logits` alone: no ranking."
    from compeffdist.difficulty import EncodedSample, tail_logits
    enc = [e for e in sc.encode(records) if isinstance(e, EncodedSample)]
    enc.sort(key=lambda e: -len(e.ids))
    sync(device); t = time.perf_counter()
    for s in range(0, len(enc), sc.batch_size):
        batch = enc[s:s + sc.batch_size]
        tail_logits(sc.model, [e.ids for e in batch], max(len(e.targets) for e in batch), sc.pad_id)
    sync(device)
    return time.perf_counter() - t


def reference_scores(sc, records: list[dict], a, device: str) -> tuple[list[float], float]:
    from compeffdist.difficulty import reference_rank_score
    sync(device); t = time.perf_counter()
    out = [reference_rank_score(sc.model, sc.tokenizer, r, "chat", a.max_length) for r in records]
    sync(device)
    return out, time.perf_counter() - t


def check_difficulty(model_dir: Path, records: list[dict], a, device: str, dtype: str, exact: list[float] | None):
    """Score in `dtype`; judge speed against the fair baselines and agreement against the reference loop, with the
    tolerance the precision itself allows (`exact`: the reference loop in full float32). Returns the float32
    reference loop in full float32 when `dtype` is float32."""
    from compeffdist.difficulty import DifficultyScorer, reference_rank_score
    sc = DifficultyScorer.load(str(model_dir), device=device, dtype=dtype, batch_size=a.batch_size,
                               max_length=a.max_length, metrics=["rank"])
    tokens = sum(len(e.targets) for e in sc.encode(records))
    sc.score(records[:a.batch_size])  # warm-up
    reference_rank_score(sc.model, sc.tokenizer, records[0], "chat", a.max_length)
    sync(device); t = time.perf_counter()
    ours = [r["rank"] for r in sc.score(records)]
    sync(device); t_ours = time.perf_counter() - t
    t_fwd = batched_forward_seconds(sc, records, device)
    ref, t_ref = reference_scores(sc, records, a, device)
    if exact is None:  # this is the float32 model: the reference loop once more in full float32
        with full_float32():
            exact, _ = reference_scores(sc, records, a, device)
    name = "bf16" if dtype == "bfloat16" else "float32"
    tf32 = " (TF32 matmuls)" if dtype == "float32" and device.startswith("cuda") else ""
    judged = a.judge_speed or device.startswith("cuda")
    note = "" if judged else "; not judged on CPU"
    line(f"difficulty {name}", f"{len(records)} responses, {tokens} tokens{tf32}: compeffdist {t_ours:.2f} s; the same "
                               f"batched forward without the ranking {t_fwd:.2f} s: {t_ours / t_fwd:.2f}x "
                               f"[target <= {a.targets['overhead']:g}x{note}]",
         t_ours / t_fwd <= a.targets["overhead"] if judged else None)
    line(f"speed-up {name}", f"reference loop {t_ref:.2f} s: {t_ref / t_ours:.1f}x [target >= {a.targets['speedup']:g}x{note}]",
         t_ref / t_ours >= a.targets["speedup"] if judged else None)
    diff = max(abs(x - y) for x, y in zip(ours, ref))
    floor = max(abs(x - y) for x, y in zip(ref, exact))
    target = max(a.targets["agreement_min"], a.targets["agreement_factor"] * floor)
    line(f"agreement {name}", f"max |score - reference| {diff:.1e} [target <= {target:.1e}: {a.targets['agreement_factor']:g} x "
                              f"{floor:.1e}, what {name}{tf32} moves the reference loop from full float32, at least "
                              f"{a.targets['agreement_min']:g}], Spearman {spearman(ours, ref):.4f}", diff <= target)
    sc.close()
    return exact


def check_training(model_dir: Path, records: list[dict], a, device: str, work: Path) -> None:
    import math
    import torch
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available
    import compeffdist.models as models
    from compeffdist.core import ModelConfig, TrainingConfig
    from compeffdist.training import train_student
    cfg = TrainingConfig(max_steps=a.train_steps, per_device_batch_size=a.train_batch, gradient_accumulation_steps=1,
                         max_length=a.max_length, packing=True, gradient_checkpointing=True, learning_rate=1e-5,
                         logging_steps=1, bf16="auto")
    head_calls, load = [], models.load_text_lm

    def counting_load(*args, **kw):  # count whole-logits forwards of the output layer
        net = load(*args, **kw)
        net.get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))
        return net
    models.load_text_lm = counting_load
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the trainer prints its logs: keep one line per figure
            card = train_student(str(model_dir), records * 4, work / "trained", cfg,
                                 ModelConfig(model=str(model_dir), device=device, dtype="auto"), progress=False)
    finally:
        models.load_text_lm = load
    peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.startswith("cuda") else ""
    flash = device.startswith("cuda") and (is_flash_attn_2_available() or is_flash_attn_3_available())
    finite = all(math.isfinite(h["loss"]) for h in card["loss_history"])
    packed = card["packing"]["used"]
    line("training", f"TRL SFT, {'bf16' if card['bf16'] else 'float32'}, {card['steps']} steps of {a.train_batch} x "
                     f"{a.max_length} tokens, attention {card['attn_implementation']}, "
                     f"{'packed rows' if packed else 'padded batches'}: {card['tokens_per_second']:,.0f} tokens/s "
                     f"({card['tokens_seen']} tokens in {card['seconds']:.1f} s){peak}; losses finite {finite}, "
                     f"whole-logits forwards {len(head_calls)} [target: finite, packing exactly with FlashAttention "
                     f"({'installed' if flash else 'not installed'}), 0 whole-logits forwards]",
         finite and packed == flash and not head_calls)


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
    ap.add_argument("--judge-speed", action="store_true", help="judge the speed targets on a CPU too")
    ap.add_argument("--target", action="append", default=[], metavar="NAME=X",
                    help=f"change a target ({', '.join(f'{k}={v:g}' for k, v in TARGETS.items())})")
    a = ap.parse_args()
    a.targets = parse_targets(a.target)
    for k, big, small in (("n", 64, 6), ("new_tokens", 256, 12), ("batch_size", 16, 4), ("max_length", 1024, 128),
                          ("train_steps", 8, 2), ("train_batch", 4, 2)):
        if getattr(a, k) is None:
            setattr(a, k, small if a.tiny else big)
    missing = missing_wheels()
    if missing:
        print("error: this environment lacks what the check needs:\n  " + "\n  ".join(missing) +
              f"\nthe exact wheels: {WHEELS.relative_to(ROOT)} (make gpu-wheels); install them with pip install "
              "--no-index --no-deps --target /tmp/site .gpu-wheels/*.whl and run with PYTHONPATH=/tmp/site:.",
              file=sys.stderr)
        return 2
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
        print(f"error: no GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}; "
              f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): nothing was checked; "
              "--device cpu --tiny runs the same path on CPU", file=sys.stderr)
        return 2
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
        exact = check_difficulty(work / "model", records, a, a.device, "float32", None)
        check_difficulty(work / "model", records, a, a.device, "bfloat16", exact)
        check_training(work / "model", records, a, a.device, work)
        failed = RESULTS.count(False)
        line("total", f"{time.perf_counter() - t_all:.0f} s; {len(RESULTS) - failed} of {len(RESULTS)} judged figures "
                      f"met their targets")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
