"""CI runs every SentiBench test: with COMPEFFDIST_REQUIRE_SENTIBENCH=1 (set by .ci/run) a test that needs
SentiBench and does not find it fails, where a user's run without SentiBench skips it."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_missing_sentibench_fails_where_sentibench_is_required(tmp_path):
    "The conftest's fixture, and a test that checks for SentiBench itself: skipped for a user, failed under CI."
    (tmp_path / "test_needs_it.py").write_text(
        "import os, pytest\n"
        "def test_through_the_fixture(sentibench_root):\n    assert sentibench_root.is_dir()\n"
        "def test_on_its_own():\n"
        "    if not os.path.isdir(os.environ['COMPEFFDIST_SENTIBENCH']):\n"
        "        pytest.skip('needs COMPEFFDIST_SENTIBENCH')\n")

    def pytest_run(**env):
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
               "--rootdir", str(tmp_path), str(tmp_path / "test_needs_it.py")]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "COMPEFFDIST_SENTIBENCH": str(tmp_path / "missing"), **env})

    skipped = pytest_run(COMPEFFDIST_REQUIRE_SENTIBENCH="")
    assert skipped.returncode == 0 and "2 skipped" in skipped.stdout, skipped.stdout
    failed = pytest_run(COMPEFFDIST_REQUIRE_SENTIBENCH="1")
    assert failed.returncode == 1 and "1 failed, 1 error" in failed.stdout, failed.stdout
    assert "ERROR at setup of test_through_the_fixture" in failed.stdout
    assert "COMPEFFDIST_REQUIRE_SENTIBENCH=1 and COMPEFFDIST_SENTIBENCH is not set to a SentiBench folder" in failed.stdout
    assert "FAILED" in failed.stdout and "test_needs_it.py::test_on_its_own" in failed.stdout.split("FAILED", 1)[1]
    assert "COMPEFFDIST_REQUIRE_SENTIBENCH=1 and the test was skipped" in failed.stdout


def test_ci_requires_sentibench():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "export COMPEFFDIST_REQUIRE_SENTIBENCH=1" in lines
    assert lines.index("export COMPEFFDIST_REQUIRE_SENTIBENCH=1") < lines.index("make test")
