"""The difficulty stage's paths for long GPU runs, on CPU: it resumes inside the stage after an interruption (only
the records not yet written are scored again), and under `accelerate launch` two processes share the scoring and
give the same file as one process. bf16 speed and agreement need a GPU (benchmarks/gpu_check.py)."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from compeffdist.core import Config, ModelConfig, RunStore, read_jsonl, write_jsonl
from compeffdist.difficulty import DifficultyScorer, run_difficulty
from compeffdist.engines import RunContext
from compeffdist.pipeline import make_tiny_student

WORDS = ["great", "awful", "fine", "terrible", "lovely", "boring", "superb", "dull"]


def _records(n=14):
    recs = [{"id": f"r{i}", "instruction": f"Is this positive or negative?\n\nInput: a {WORDS[i % 8]} day, number {i}",
             "output": ["positive", "negative"][i % 2] + " indeed" * (i % 4)} for i in range(n)]
    recs[5]["output"] = ""  # cannot be scored: dropped as empty_output
    return recs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_student(tmp_path_factory.mktemp("tiny") / "model")


def _ctx(root, tiny, records):
    store = RunStore(root)
    write_jsonl(store.path("responses", "samples.jsonl"), records)
    cfg = Config(teacher=ModelConfig(model="x"), student=ModelConfig(model=str(tiny), device="cpu"))
    cfg.difficulty = cfg.difficulty.model_copy(update={"max_length": 128, "batch_size": 3})
    return RunContext(cfg, store, progress=False)


def test_stage_resumes_inside_the_stage(tmp_path, tiny, monkeypatch):
    ctx = _ctx(tmp_path / "run", tiny, _records())
    original = DifficultyScorer.score_iter

    def killed_after_two_batches(self, records, progress=False):
        it = original(self, records, progress)
        yield next(it)  # the record that cannot be scored
        yield next(it)  # the first scored batch
        raise KeyboardInterrupt  # where a kill would stop the process

    monkeypatch.setattr(DifficultyScorer, "score_iter", killed_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        run_difficulty(ctx)
    folder = ctx.store.root / "difficulty"
    partial = list(folder.glob(".scored-*.jsonl"))
    assert len(partial) == 1 and not (folder / "scored.jsonl").exists()
    assert len(partial[0].read_text().splitlines()) == 1 + 3  # one error, one batch of 3
    with open(partial[0], "a") as f:
        f.write('{"key": "cut sho')  # the line a kill leaves half-written
    scored = []

    def counting(self, records, progress=False):
        scored.extend(records)
        return original(self, records, progress)

    monkeypatch.setattr(DifficultyScorer, "score_iter", counting)
    stats = run_difficulty(ctx)
    assert len(scored) == 14 - 4  # only what the first attempt had not written
    assert not list(folder.glob(".scored-*")) and stats.drops["empty_output"] == 1
    fresh = _ctx(tmp_path / "fresh", tiny, _records())
    run_difficulty(fresh)
    got, want = read_jsonl(folder / "scored.jsonl"), read_jsonl(fresh.store.root / "difficulty" / "scored.jsonl")
    assert [r["id"] for r in got] == [r["id"] for r in want] and len(got) == 13
    for a, b in zip(got, want):
        assert a["difficulty"]["length"] == b["difficulty"]["length"]
        assert abs(a["difficulty"]["rank"] - b["difficulty"]["rank"]) <= 1e-4  # other batches: float32 rounding
        for m in ("ppl", "ifd"):
            assert abs(a["difficulty"][m] / b["difficulty"][m] - 1) <= 1e-5


def test_stale_results_of_another_model_are_not_reused(tmp_path, tiny):
    ctx = _ctx(tmp_path / "run", tiny, _records(6))
    folder = ctx.store.path("difficulty")
    (folder / ".scored-0123456789abcdef-0.jsonl").write_text(  # another key: other weights or settings
        "".join(json.dumps({"key": k, "result": {"rank": 9.0, "ppl": 9.0, "ifd": 9.0, "length": 9}}) + "\n"
                for k in ("a", "b")))
    run_difficulty(ctx)
    assert all(r["difficulty"]["rank"] <= 1 for r in read_jsonl(folder / "scored.jsonl"))
    assert not list(folder.glob(".scored-*"))


SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from compeffdist.core import Config, ModelConfig, RunStore
    from compeffdist.difficulty import run_difficulty
    from compeffdist.engines import RunContext
    root, tiny = sys.argv[1], sys.argv[2]
    cfg = Config(teacher=ModelConfig(model="x"), student=ModelConfig(model=tiny, device="cpu"))
    cfg.difficulty = cfg.difficulty.model_copy(update={"max_length": 128, "batch_size": 3})
    stats = run_difficulty(RunContext(cfg, RunStore(root), progress=False))
    # one file a process: two processes printing to one pipe may interleave their lines
    Path(f"stats-{os.environ['RANK']}.json").write_text(
        json.dumps({"processes": stats.info["processes"], "out": stats.counts["samples_out"]}))
""")


def test_stage_under_accelerate_launch_two_processes(tmp_path, tiny):
    one = _ctx(tmp_path / "one", tiny, _records())
    run_difficulty(one)
    two = _ctx(tmp_path / "two", tiny, _records())
    (tmp_path / "stage.py").write_text(SCRIPT)
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", str(tmp_path / "stage.py"),
                           str(two.store.root), str(tiny)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = [json.loads((tmp_path / f"stats-{rank}.json").read_text()) for rank in (0, 1)]
    assert stats == [{"processes": 2, "out": 13}] * 2  # both processes end with the whole result
    folder = two.store.root / "difficulty"
    assert sorted(p.name for p in folder.iterdir()) == ["scored.jsonl"]  # per-process files removed
    got, want = read_jsonl(folder / "scored.jsonl"), read_jsonl(one.store.root / "difficulty" / "scored.jsonl")
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for a, b in zip(got, want):
        assert abs(a["difficulty"]["rank"] - b["difficulty"]["rank"]) <= 1e-4
