import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# CI sets this: a test that needs SentiBench and does not find it fails instead of being skipped
REQUIRE_SENTIBENCH = "COMPEFFDIST_REQUIRE_SENTIBENCH"


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def sentibench_root():
    """The SentiBench folder from COMPEFFDIST_SENTIBENCH; tests that need it are skipped without it, or fail when
    COMPEFFDIST_REQUIRE_SENTIBENCH=1."""
    path = os.environ.get("COMPEFFDIST_SENTIBENCH")
    if not path or not Path(path, "sc").is_dir():
        why = f"COMPEFFDIST_SENTIBENCH is not set to a SentiBench folder (it is {path!r})"
        if os.environ.get(REQUIRE_SENTIBENCH) == "1":
            pytest.fail(f"{REQUIRE_SENTIBENCH}=1 and {why}", pytrace=False)
        pytest.skip(why)
    return Path(path)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    "With COMPEFFDIST_REQUIRE_SENTIBENCH=1, a test that skips itself for want of SentiBench is reported as failed."
    report = (yield).get_result()
    required = os.environ.get(REQUIRE_SENTIBENCH) == "1"
    if report.skipped and required and "COMPEFFDIST_SENTIBENCH" in str(report.longrepr):
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_SENTIBENCH}=1 and the test was skipped: {report.longrepr}"
