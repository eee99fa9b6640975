"""The committed demo run (tests/fixtures/demo_run/): the artefacts notebooks 13-19a show are the run's own files,
unchanged (each one's SHA-256 is the one its stage's manifest recorded), they link up stage to stage, and the
folder stays small (no model weights, no call cache)."""
import hashlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "demo_run"
STAGES = ["texts", "attributes", "clustering", "instructions", "pairing", "responses", "warmup", "difficulty",
          "sampling", "training", "evaluation"]


def jsonl(*parts):
    return [json.loads(l) for l in FIXTURE.joinpath(*parts).read_text(encoding="utf-8").splitlines() if l.strip()]


def manifest(stage):
    return json.loads((FIXTURE / stage / "manifest.json").read_text(encoding="utf-8"))


def test_every_stage_finished_under_the_runs_config():
    fps = json.loads((FIXTURE / "run.json").read_text())["fingerprints"]
    for s in STAGES:
        assert manifest(s)["fingerprint"] == fps[s], s


@pytest.mark.parametrize("stage", STAGES)
def test_committed_files_are_the_runs_own(stage):
    files = manifest(stage)["stats"]["info"]["files"]
    present = [f for f in files if (FIXTURE / stage / f).is_file()]
    assert present or stage in ("warmup", "training"), f"{stage}: none of its files is in the fixture"
    for f in present:
        p = FIXTURE / stage / f
        assert p.stat().st_size == files[f]["bytes"], f
        assert hashlib.sha256(p.read_bytes()).hexdigest()[:16] == files[f]["sha256"], f


def test_stages_link_up():
    ins = {r["id"] for r in jsonl("instructions", "instructions.jsonl")}
    texts = {r["id"] for r in jsonl("texts", "texts.jsonl")}
    pairs = jsonl("pairing", "samples.jsonl")
    assert pairs and {p["instruction_id"] for p in pairs} <= ins and {p["text_id"] for p in pairs} <= texts
    resp = jsonl("responses", "samples.jsonl")
    assert resp and {r["id"] for r in resp} <= {p["id"] for p in pairs}
    scored = jsonl("difficulty", "scored.jsonl")
    assert {r["id"] for r in scored} <= {r["id"] for r in resp}
    assert all(isinstance(r["difficulty"], dict) or r.get("difficulty_error") for r in scored)
    kept = jsonl("sampling", "kept.jsonl")
    assert kept and {r["id"] for r in kept} <= {r["id"] for r in scored}


def test_small_and_without_weights_or_cache():
    files = [p for p in FIXTURE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 2_000_000
    assert not [p for p in files if p.suffix in (".safetensors", ".bin", ".gguf", ".pt", ".sqlite")]
    assert (FIXTURE / "README.md").is_file()
