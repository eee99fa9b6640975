"""The package is exported from the notebooks: exporting them afresh must reproduce compeffdist/ exactly."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_package_matches_notebooks(tmp_path):
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "nbs", tmp_path / "nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    exporter = Path(sys.executable).with_name("nbdev-export")
    subprocess.run([str(exporter)], cwd=tmp_path, check=True, capture_output=True)
    fresh = {p.relative_to(tmp_path / "compeffdist"): p.read_text() for p in (tmp_path / "compeffdist").rglob("*.py")}
    ours = {p.relative_to(ROOT / "compeffdist"): p.read_text() for p in (ROOT / "compeffdist").rglob("*.py")}
    stale = sorted(str(k) for k in fresh.keys() | ours.keys() if fresh.get(k) != ours.get(k))
    assert not stale, f"run nbdev-export and commit: these modules differ from the notebooks: {stale}"
