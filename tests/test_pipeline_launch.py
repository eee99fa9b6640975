"""`compeffdist run` under a distributed launch: the student stages on two CPU processes (`accelerate launch`),
the first process alone recording them; the teacher stages refuse such a launch before any work."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from compeffdist.core import CompeffdistError, RunStore, load_config, read_jsonl
from compeffdist.pipeline import ReplayEngine, demo_config_path, make_tiny_student, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "tests" / "fixtures" / "demo_teacher_calls.jsonl"
FIXTURE = ROOT / "tests" / "fixtures" / "demo_run"


def test_teacher_stages_refuse_a_distributed_launch(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = load_config(demo_config_path(), {"run.out": str(tmp_path / "run")})
    with pytest.raises(CompeffdistError, match="^attributes: run in one process"):
        run_pipeline(cfg, until="attributes", teacher=ReplayEngine.from_jsonl(RECORDED), progress=False, echo=None)
    assert not (tmp_path / "run" / "texts" / "manifest.json").exists()  # refused before any work


def _student_stages_on_two_processes(cfg, tmp_path) -> RunStore:
    "Run warm-up, difficulty and sampling of the run of `cfg` under `accelerate launch` on two CPU processes."
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "compeffdist.cli", "run",
                           "--config", str(config), "--stages", "warmup,difficulty,sampling", "--quiet"],
                          capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = RunStore(cfg.run.out)
    assert all(store.is_done(s) for s in ("warmup", "difficulty", "sampling"))
    scored = read_jsonl(Path(cfg.run.out) / "difficulty" / "scored.jsonl")
    assert len(scored) == store.manifest("difficulty")["stats"]["counts"]["samples_out"] > 0
    assert len(read_jsonl(Path(cfg.run.out) / "sampling" / "kept.jsonl")) > 0
    log = (Path(cfg.run.out) / "run.log").read_text()
    assert log.count("difficulty    done") == 1  # one process writes the log
    return store


def test_student_stages_on_two_processes_from_the_committed_run(sentibench_root, tmp_path):
    """The student stages on two processes, started from the teacher stages of the committed demo run
    (tests/fixtures/demo_run: 32 teacher responses), with a tiny student: the fast variant that every test run has."""
    run = tmp_path / "run"
    for stage in ("texts", "attributes", "clustering", "instructions", "pairing", "responses"):
        shutil.copytree(FIXTURE / stage, run / stage)
    over = {"run.out": str(run), "data.sentibench": str(sentibench_root),
            "student.model": str(make_tiny_student(tmp_path / "tiny")), "training.max_steps": 1,
            "warmup.training.max_steps": 1}
    cfg = load_config(FIXTURE / "config.yaml", over)
    _student_stages_on_two_processes(cfg, tmp_path)
    # the two processes together score each held-out sample once: the samples the committed (one-process) run scored
    ids = lambda path: sorted(r["id"] for r in read_jsonl(path))
    assert ids(run / "difficulty" / "scored.jsonl") == ids(FIXTURE / "difficulty" / "scored.jsonl")


@pytest.mark.slow
def test_student_stages_on_two_processes(sentibench_root, tmp_path):
    "The same after the teacher stages replayed from recorded calls in this process (the demo's config)."
    over = {"run.out": str(tmp_path / "run"), "student.model": str(make_tiny_student(tmp_path / "tiny")),
            "training.max_steps": 2, "warmup.training.max_steps": 1}
    cfg = load_config(demo_config_path(), over)
    run_pipeline(cfg, until="responses", teacher=ReplayEngine.from_jsonl(RECORDED), progress=False, echo=None,
                 report=False)
    _student_stages_on_two_processes(cfg, tmp_path)
