"""Reliability of the real stages.

- Fuzzed teacher (default run): the demo config with the teacher replayed from the calls recorded in a real demo
  run (tests/fixtures/demo_teacher_calls.jsonl), a set share of the answers replaced by malformed ones (empty,
  truncated, broken JSON, a refusal, noise), and a tiny random student: every stage finishes, and the report
  counts every drop by reason.
- kill -9 during teacher generation, difficulty scoring and training of the real stages, then the same command
  again (slow): the run finishes with the data artefacts of an uninterrupted run, and no finished teacher call is
  computed again. One variant replays the recorded teacher (slowed down, so the kill lands inside generation),
  the other runs the real llama.cpp teacher and SmolLM2 student on a tiny config.
"""
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compeffdist.core import RunStore, load_config
from compeffdist.engines import Engine, Generation, per_request, request_key
from compeffdist.pipeline import (STAGE_NAMES, ReplayEngine, demo_config_path, make_tiny_student, run_pipeline)

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "tests" / "fixtures" / "demo_teacher_calls.jsonl"
sys.path.insert(0, str(Path(__file__).parent))
from test_reliability import cache_keys, wait_for  # noqa: E402

MALFORMED = {"empty": lambda t, r: "",
             "truncated": lambda t, r: t[: max(1, len(t) // 3)],
             "broken_json": lambda t, r: '{"attributes": [{"name": "tone", "description": ',
             "refusal": lambda t, r: "I'm sorry, but I can't help with that request.",
             "noise": lambda t, r: "".join(r.choice("abc xyz!?{}[]0123456789\n") for _ in range(80))}


class FuzzedEngine(Engine):
    "Wraps an engine; a `rate` share of the requests (chosen by a hash of the request) get a malformed answer."
    name = "fuzzed"

    def __init__(self, inner: Engine, rate: float = 0.3, seed: int = 0, delay: float = 0.0, log: Path | None = None):
        self.inner, self.rate, self.seed, self.delay, self.log = inner, rate, seed, delay, log
        self.ref = inner.ref
        self.corrupted: dict[str, int] = {}

    @property
    def identity(self) -> str:
        return f"fuzzed{self.rate}-{self.inner.identity}"

    def generate_iter(self, batch, params, constraint=None):
        for i, (m, (p, c)) in enumerate(zip(batch, per_request(batch, params, constraint))):
            key = request_key(self.identity, list(m), p, c)
            if self.log:
                with open(self.log, "a") as f:
                    f.write(key + "\n")
            if self.delay:
                time.sleep(self.delay)
            gens = next(iter(self.inner.generate_iter([m], p, c)))[1]
            h = int(hashlib.sha1(f"{self.seed}:{key}".encode()).hexdigest(), 16)
            if h % 10_000 < self.rate * 10_000:
                kind = sorted(MALFORMED)[h % len(MALFORMED)]
                self.corrupted[kind] = self.corrupted.get(kind, 0) + 1
                r = random.Random(h)
                gens = [Generation(MALFORMED[kind](g.text, r), g.prompt_tokens, g.completion_tokens,
                                   "length" if kind == "truncated" else g.finish_reason) for g in gens]
            yield i, gens


def needs_recording():
    if not RECORDED.is_file():
        pytest.skip(f"{RECORDED} is missing (record it from a real demo run: see 19_pipeline)")


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
    return make_tiny_student(tmp_path_factory.mktemp("tiny") / "student")


def tiny_demo_config(out: Path, student: Path, **over):
    "The demo config with a tiny student, a few training steps and a smaller evaluation."
    return load_config(demo_config_path(), {"run.out": str(out), "student.model": str(student),
                                            "training.max_steps": 2, "warmup.training.max_steps": 1,
                                            "evaluation.limit": 4, "evaluation.datasets": ["sc/sst2"],
                                            "evaluation.models": ["base_student", "student"], **over})


def test_fuzzed_teacher_through_the_whole_pipeline(tmp_path, tiny_student, sentibench_root):
    needs_recording()
    teacher = FuzzedEngine(ReplayEngine.from_jsonl(RECORDED), rate=0.3)
    run_pipeline(tiny_demo_config(tmp_path / "run", tiny_student), teacher=teacher, progress=False, echo=None)
    store = RunStore(tmp_path / "run")
    assert all(store.is_done(s) for s in STAGE_NAMES)
    assert sum(teacher.corrupted.values()) >= 5 and len(teacher.corrupted) >= 3, teacher.corrupted
    report = (tmp_path / "run" / "REPORT.md").read_text()
    drops = {s: store.manifest(s)["stats"]["drops"] for s in STAGE_NAMES}
    for stage, d in drops.items():
        for reason, n in d.items():
            assert f"{reason}: {n}" in report, (stage, reason)
    teacher_drops = sum(sum(drops[s].values()) for s in ("attributes", "instructions", "responses"))
    assert teacher_drops > 0, drops  # malformed answers were dropped and counted, not crashed on
    # a corrupted answer of the responses stage is dropped and counted, or kept only if it still verifies
    resp = store.manifest("responses")["stats"]
    n_pairs = sum(1 for _ in open(tmp_path / "run" / "pairing" / "samples.jsonl"))
    n_kept = sum(1 for _ in open(tmp_path / "run" / "responses" / "samples.jsonl"))
    assert n_pairs - n_kept == sum(resp["drops"].values()), resp  # every sample missing is a counted drop


DRIVER = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_reliability_real import FuzzedEngine, tiny_demo_config, RECORDED
from compeffdist.pipeline import ReplayEngine, run_pipeline
out, student, log = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
teacher = FuzzedEngine(ReplayEngine.from_jsonl(RECORDED), rate=0.1, delay=float(sys.argv[4]), log=log)
run_pipeline(tiny_demo_config(out, student), teacher=teacher, progress=False, echo=print)
"""


def data_digests(root: Path, stages=STAGE_NAMES[:STAGE_NAMES.index("sampling") + 1]) -> dict:
    "Hashes of the artefacts of texts .. sampling (training cards, which hold wall-clock times, left out), counts, drops."
    out = {}
    for name in stages:
        m = RunStore(root).manifest(name)
        out[name] = {"files": {f: v["sha256"] for f, v in m["stats"]["info"]["files"].items()
                               if not f.endswith("card.json")},
                     "counts": m["stats"]["counts"], "drops": m["stats"]["drops"]}
    return out


def inside(ref: Path, stage: str, lo: float = 0.15, hi: float = 0.6) -> tuple[str, float, float]:
    "A kill window inside `stage`: fractions of the seconds the stage took in the uninterrupted reference run."
    seconds = RunStore(ref).manifest(stage)["seconds"]
    return stage, lo * seconds, hi * seconds


def kill_and_resume(cmd: list[str], run: Path, kills: list[tuple[str, float, float]], calls_log: Path,
                    rng: random.Random, timeout: float = 3600) -> list[tuple]:
    "Start `cmd`, SIGKILL it inside each stage of `kills` in turn, then let it finish; check no cached call is redone."
    attempts, done = [], 0
    run_log = run / "run.log"
    for stage, lo, hi in kills + [(None, 0, 0)]:
        cached_before = cache_keys(run / "calls.sqlite")
        offset = run_log.stat().st_size if run_log.is_file() else 0
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if stage is not None:
            assert wait_for(run_log, f"{stage:<13} start", offset, proc, timeout), proc.stderr.read()[-3000:]
            time.sleep(rng.uniform(lo, hi))
            assert proc.poll() is None, f"the run ended before the kill in {stage}"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            assert RunStore(run).manifest(stage) is None, f"killed after {stage} had finished"
        else:
            _, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, err[-3000:]
        computed = calls_log.read_text().split() if calls_log.is_file() else []
        repeated = set(computed[done:]) & cached_before
        assert not repeated, f"attempt {len(attempts) + 1} recomputed {len(repeated)} finished teacher calls"
        attempts.append((stage, len(computed) - done))
        done = len(computed)
    return attempts


@pytest.mark.slow
def test_kill9_real_stages_replayed_teacher(tmp_path, tiny_student, sentibench_root):
    needs_recording()
    ref = tmp_path / "ref"
    teacher = FuzzedEngine(ReplayEngine.from_jsonl(RECORDED), rate=0.1, log=tmp_path / "ref-calls.log")
    run_pipeline(tiny_demo_config(ref, tiny_student), teacher=teacher, progress=False, echo=None)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=str(Path(__file__).parent)))
    run, log = tmp_path / "run", tmp_path / "calls.log"
    cmd = [sys.executable, str(driver), str(run), str(tiny_student), str(log), "0.3"]
    kills = [("responses", 0.5, 3.0), inside(ref, "difficulty"), inside(ref, "training")]  # 0.3 s per teacher call
    attempts = kill_and_resume(cmd, run, kills, log, random.Random(11))
    print(attempts)
    assert data_digests(run) == data_digests(ref)
    assert cache_keys(run / "calls.sqlite") == cache_keys(ref / "calls.sqlite")
    assert len(log.read_text().split()) - len((tmp_path / "ref-calls.log").read_text().split()) <= len(kills)
    for stage in ("training", "evaluation"):
        assert RunStore(run).manifest(stage)["stats"]["counts"] == RunStore(ref).manifest(stage)["stats"]["counts"]


REAL_CONFIG = """
run: {{name: kill-real, out: {out}, seed: 42}}
teacher: {{model: qwen2.5-coder-1.5b-instruct, engine: llamacpp, context_length: 2048}}
student: {{model: smollm2-135m-instruct, engine: hf, device: cpu, dtype: float32, batch_size: 4}}
data:
  sources: [{{type: sentibench, split: train, datasets: [sc/sst2, sc/twitter]}}]
  n_texts: 4
  max_chars: 240
attributes: {{decoding: {{temperature: 1.0, max_new_tokens: 160}}, min_count: 0}}
instructions: {{max_clusters: 1, max_tasks_per_cluster: 1, demo_prompts_per_task: 1,
  analysis_decoding: {{max_new_tokens: 160}}, tasks_decoding: {{max_new_tokens: 256}},
  rewrite_decoding: {{max_new_tokens: 384}}, demos_decoding: {{max_new_tokens: 160}}}}
pairing: {{n_samples: 8}}
responses: {{decoding: {{temperature: 0.0, max_new_tokens: 64}}}}
warmup: {{fraction: 0.5, training: {{epochs: 1, per_device_batch_size: 2, gradient_accumulation_steps: 1,
  max_length: 384, packing: false, gradient_checkpointing: false}}}}
difficulty: {{batch_size: 2, max_length: 384}}
training: {{epochs: 1, per_device_batch_size: 2, gradient_accumulation_steps: 1, max_length: 384, packing: false,
  gradient_checkpointing: false}}
evaluation: {{datasets: [sc/sst2], shots: 2, seeds: [42], limit: 4, max_chars: 200, models: [base_student, student]}}
"""


@pytest.mark.slow
def test_kill9_real_teacher_and_student(tmp_path, sentibench_root):
    "The real command on real models: killed in attribute generation, difficulty scoring and training."
    for name in ("ref", "run"):
        (tmp_path / f"{name}.yaml").write_text(REAL_CONFIG.format(out=tmp_path / name))
    exe = str(Path(sys.executable).with_name("compeffdist"))
    r = subprocess.run([exe, "run", "--config", str(tmp_path / "ref.yaml"), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ref_calls = cache_keys(tmp_path / "ref" / "calls.sqlite")
    run = tmp_path / "run"
    kills = [("attributes", 5, 30), inside(tmp_path / "ref", "difficulty"), inside(tmp_path / "ref", "training")]
    rng = random.Random(5)
    run_log = run / "run.log"
    for stage, lo, hi in kills + [(None, 0, 0)]:
        cached_before = cache_keys(run / "calls.sqlite")
        offset = run_log.stat().st_size if run_log.is_file() else 0
        started = time.time()
        proc = subprocess.Popen([exe, "run", "--config", str(tmp_path / "run.yaml"), "--quiet"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if stage is None:
            _, err = proc.communicate(timeout=3600)
            assert proc.returncode == 0, err[-3000:]
            # the last attempt generated exactly the calls that were not in the cache when it started: a finished
            # call served again would count as generated without adding a row
            new_rows = len(cache_keys(run / "calls.sqlite") - cached_before)
            finished_now = [s for s in STAGE_NAMES if (run / s / "manifest.json").stat().st_mtime >= started]
            generated = sum((RunStore(run).manifest(s)["stats"]["info"].get("teacher") or {}).get("misses", 0)
                            for s in finished_now)
            assert generated == new_rows, (generated, new_rows, finished_now)
            break
        assert wait_for(run_log, f"{stage:<13} start", offset, proc, 3600), proc.stderr.read()[-3000:]
        time.sleep(rng.uniform(lo, hi))
        assert proc.poll() is None, f"the run ended before the kill in {stage}"
        os.kill(proc.pid, signal.SIGKILL); proc.wait()
        assert RunStore(run).manifest(stage) is None
        # what this attempt added to the cache was new: the cache only grows, and every key is a distinct call
        assert cached_before <= cache_keys(run / "calls.sqlite")
    for name in STAGE_NAMES:  # each stage accounted for all its requests
        t = RunStore(run).manifest(name)["stats"]["info"].get("teacher")
        ref_t = RunStore(tmp_path / "ref").manifest(name)["stats"]["info"].get("teacher")
        if t:
            assert t["hits"] + t["misses"] == ref_t["hits"] + ref_t["misses"]
    assert cache_keys(run / "calls.sqlite") == ref_calls
    assert data_digests(run) == data_digests(tmp_path / "ref")
