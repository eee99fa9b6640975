import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def sentibench_root():
    "The SentiBench folder from COMPEFFDIST_SENTIBENCH; tests that need it are skipped without it."
    path = os.environ.get("COMPEFFDIST_SENTIBENCH")
    if not path or not Path(path, "sc").is_dir():
        pytest.skip("COMPEFFDIST_SENTIBENCH is not set to a SentiBench folder")
    return Path(path)
