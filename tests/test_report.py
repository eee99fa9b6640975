"""The run report of the committed demo run (tests/fixtures/demo_run/), and the report's independence from the
runner: the runner hands the report its stage list, and the report module never imports `compeffdist.pipeline`."""
import shutil
import subprocess
import sys
from pathlib import Path

from compeffdist.report import build_report, load_run, to_html, write_report

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "demo_run"


def test_report_does_not_import_the_runner():
    code = "import sys, compeffdist.report; assert 'compeffdist.pipeline' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    source = Path(__file__).resolve().parents[1] / "compeffdist" / "report.py"
    assert "compeffdist.pipeline" not in source.read_text() and ".pipeline import" not in source.read_text()


def test_report_of_the_demo_run(tmp_path):
    root = tmp_path / "demo_run"
    shutil.copytree(FIXTURE, root)
    from compeffdist.pipeline import STAGES
    run = load_run(root, STAGES)
    assert all(st["status"] == "finished" for st in run["stages"].values())
    blocks = build_report(root, STAGES)
    assert [b[2] for b in blocks if b[0] == "h" and b[1] == 2] == [
        "Models", "Data flow", "Decontamination", "Teacher cost", "What the corpus teaches", "Difficulty", "Sampling",
        "SentiBench",
        "Stage details", "Config", "Artefacts"]
    md = write_report(root, STAGES).read_text()
    assert "| sampling | finished | 0.0 | 18 | 9 |" in md and str(tmp_path) not in md  # no absolute path in the card
    assert to_html(blocks, root).count("data:image/png;base64,") == 5


def test_coverage_section_before_the_difficulty_stage(tmp_path):
    "Without a scored corpus the coverage reads the teacher's responses and counts words; flags are listed."
    root = tmp_path / "demo_run"
    shutil.copytree(FIXTURE, root)
    shutil.rmtree(root / "difficulty")
    from compeffdist.core import read_jsonl, write_jsonl
    recs = read_jsonl(root / "responses" / "samples.jsonl")
    task = next(r for r in recs if r["kind"] == "task")
    recs.append({**task, "id": "x1", "instruction_id": "x-task", "output": "7", "output_format": {"scale": [1, 5]},
                 "task_type": "scoring", "instruction": "Rate it from 1 to 10.\n\nInput: fine"})
    write_jsonl(root / "responses" / "samples.jsonl", recs)
    from compeffdist.pipeline import STAGES
    md = write_report(root, STAGES).read_text()
    section = md[md.index("## What the corpus teaches"):md.index("## Difficulty")]
    assert f"{len(recs)} samples (`responses/samples.jsonl`)" in section and "(words)" in section
    assert "| x-task | scale_mismatch |" in section and "| x-task | answers_outside_scale | 1 of 1 answers |" in section


def test_coverage_section_of_a_run_with_instructions_only(tmp_path):
    "Before the teacher answers, the section says which target datasets the closed tasks can answer."
    root = tmp_path / "demo_run"
    shutil.copytree(FIXTURE, root)
    for stage in ("pairing", "responses", "warmup", "difficulty", "sampling", "training", "evaluation"):
        shutil.rmtree(root / stage)
    from compeffdist.core import read_jsonl, write_jsonl
    ins = read_jsonl(root / "instructions" / "instructions.jsonl")
    task = next(r for r in ins if r["kind"] == "task")
    ins.append({**task, "id": "x-task", "output_format": {"labels": ["Positive", "negative", "neutral", "mixed"]}})
    write_jsonl(root / "instructions" / "instructions.jsonl", ins)
    from compeffdist.pipeline import STAGES
    md = write_report(root, STAGES).read_text()
    section = md[md.index("## What the corpus teaches"):]
    section = section[:section.index("\n## ", 1)]
    closed = sum(bool((r.get("output_format") or {}).get("labels")) for r in ins)
    assert f"Of the {closed} closed tasks among the instructions" in section
    assert "| sc/twitter | negative / neutral / positive | 1 |" in section and "The responses stage has not run." in section


def test_teacher_cost_shows_the_prompt_tokens_reused_and_the_loops(tmp_path):
    "A stage whose engine reported prompt tokens evaluated and reused, and loops stopped, has them in its row."
    import json
    root = tmp_path / "demo_run"
    shutil.copytree(FIXTURE, root)
    m = json.loads((root / "responses" / "manifest.json").read_text())
    m["stats"]["info"]["teacher"].update(prompt_evaluated=900, prompt_reused=300, loops=2)
    (root / "responses" / "manifest.json").write_text(json.dumps(m))
    from compeffdist.pipeline import STAGES
    md = write_report(root, STAGES).read_text()
    t = m["stats"]["info"]["teacher"]
    row = next(l for l in md.splitlines() if l.startswith("| responses |") and "900" in l)
    assert row.startswith(f"| responses | {t['misses']} | {t['hits']} | {t['errors']} | 2 | {t['prompt_tokens']} | 900 | 300 |")
    assert "| prompt tokens evaluated | prompt tokens reused |" in md
