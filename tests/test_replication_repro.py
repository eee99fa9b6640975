"""A replication that accumulates: what makes it repeatable from the repository alone.

- the same training data and seed give the same student weights, bit for bit, on the same machine;
- `configs/replication.yaml` names a committed text copy of its call cache (`run.calls_jsonl`), and a run from
  that copy alone rebuilds the corpus without one new teacher call (checked here on every teacher stage that
  `results/replication/corpus.json` records as finished).
"""
import hashlib
import json
import subprocess
import sys

import pytest
from pathlib import Path

from compeffdist.core import load_config
from compeffdist.models import resolve_model
from compeffdist.pipeline import make_tiny_student

ROOT = Path(__file__).resolve().parents[1]


def _weights_digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(model_dir.glob("*.safetensors")):
        h.update(p.read_bytes())
    return h.hexdigest()


def test_retraining_gives_the_same_weights(tmp_path):
    student = make_tiny_student(tmp_path / "tiny")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Sentiment of review {i}: {'good' if i % 2 else 'bad'} food?",
                                        "output": "positive" if i % 2 else "negative"}) + "\n" for i in range(24)))
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        cmd = [sys.executable, "-m", "compeffdist.cli", "train", "--model", str(student), "--data", str(data),
               "--out", str(out), "--device", "cpu", "--max-steps", "4", "--batch-size", "4", "--lr", "1e-3",
               "--seed", "7"]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
        weights = sorted(out.glob("*.safetensors"))
        assert weights and all(w.stat().st_size > 0 for w in weights), f"no weights written in {out}"
        digests.append(_weights_digest(out))
    assert digests[0] == digests[1]
    # the same weights, the same model identity (the key of its predictions), whatever the two cards say
    content = lambda run: resolve_model(str(tmp_path / run)).identity.split("@")[1]
    assert content("a") == content("b")


def test_replication_config_keeps_its_call_cache_in_the_repository():
    cfg = load_config(ROOT / "configs" / "replication.yaml")
    assert cfg.run.calls_jsonl and not Path(cfg.run.calls_jsonl).is_absolute()
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", cfg.run.calls_jsonl], cwd=ROOT,
                             capture_output=True, text=True)
    assert tracked.returncode == 0, f"{cfg.run.calls_jsonl} is not tracked by git: {tracked.stderr.strip()}"
    assert (ROOT / cfg.run.calls_jsonl).stat().st_size > 0
    ignored = subprocess.run(["git", "check-ignore", "-q", cfg.run.out + "/x"], cwd=ROOT)
    assert ignored.returncode == 0  # the run folder itself (models, scored corpus) stays out of version control


TEACHER_STAGES = ("attributes", "clustering", "instructions", "pairing", "responses")


def test_committed_calls_rebuild_the_corpus_without_a_teacher_call(sentibench_root, tmp_path):
    """From the committed call cache alone, the run rebuilds every teacher stage it has finished so far (as recorded
    in results/replication/corpus.json) with the same counts, and `--max-calls 0` proves no teacher call was made."""
    import shutil
    corpus = ROOT / "results" / "replication" / "corpus.json"
    if not corpus.is_file():
        pytest.skip("no teacher stage of the replication is committed yet (tools/replicate.py corpus writes it)")
    recorded = json.loads(corpus.read_text())
    done = [s for s in TEACHER_STAGES if s in recorded]
    assert done, "corpus.json records no teacher stage"
    calls = tmp_path / "calls.jsonl"
    shutil.copy(ROOT / "results" / "replication" / "teacher_calls.jsonl", calls)
    cmd = [sys.executable, "-m", "compeffdist.cli", "run", "--config", str(ROOT / "configs" / "replication.yaml"),
           "--out", str(tmp_path / "run"), "--until", done[-1], "--max-calls", "0", "--quiet",
           "--set", f"run.calls_jsonl={calls}"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert res.returncode == 0, res.stdout[-1500:] + res.stderr[-1500:]
    for stage in ["texts", *done]:
        got = json.loads((tmp_path / "run" / stage / "manifest.json").read_text())["stats"]
        assert got["counts"] == recorded[stage]["counts"] and got["drops"] == recorded[stage]["drops"], stage
