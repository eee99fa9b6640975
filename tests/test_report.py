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
        "Models", "Data flow", "Decontamination", "Teacher cost", "Difficulty", "Sampling", "SentiBench",
        "Stage details", "Config", "Artefacts"]
    md = write_report(root, STAGES).read_text()
    assert "| sampling | finished | 0.0 | 18 | 9 |" in md and str(tmp_path) not in md  # no absolute path in the card
    assert to_html(blocks, root).count("data:image/png;base64,") == 4
