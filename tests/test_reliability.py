"""Reliability: kill -9 at random points during teacher generation, scoring and training, then rerun the same
command: the run finishes, its artefacts are identical to an uninterrupted run with the same seed, and no teacher
call that had finished (was in the call cache) is ever computed again.

This file drives the runner with stand-in stages (tests/test_pipeline.py) so it runs in seconds; the same checks
on the real stages and models are in tests/test_reliability_real.py."""
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compeffdist.core import RunStore
from compeffdist.pipeline import STAGE_NAMES, run_pipeline

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import LoggingFake, make_config, standins  # noqa: E402

DELAY = 0.05  # seconds per teacher call, per scored sample, per training step: room to kill inside a stage
DRIVER = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_pipeline import LoggingFake, make_config, standins
from compeffdist.pipeline import run_pipeline
out, log, delay = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
run_pipeline(make_config(out), teacher=LoggingFake(log, rate=0.2, delay=delay), functions=standins(delay),
             progress=False, echo=print, report=False)
"""


def cache_keys(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return {k for (k,) in db.execute("SELECT key FROM calls")}
    finally:
        db.close()


def data_digests(root: Path) -> dict:
    "Per stage: output file hashes, counts and drops (what must not depend on crashes)."
    store = RunStore(root)
    out = {}
    for name in STAGE_NAMES:
        m = store.manifest(name)
        out[name] = {"files": {f: v["sha256"] for f, v in m["stats"]["info"]["files"].items()},
                     "counts": m["stats"]["counts"], "drops": m["stats"]["drops"]}
    return out


def wait_for(log: Path, needle: str, offset: int, proc: subprocess.Popen, timeout: float = 300) -> bool:
    "Wait until `needle` appears in `log` after byte `offset`; False if the process ended first."
    t0 = time.time()
    while time.time() - t0 < timeout:
        if log.is_file() and needle in log.read_text()[offset:]:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError(needle)


@pytest.fixture(scope="module")
def texts_done(tmp_path_factory, sentibench_root):
    d = tmp_path_factory.mktemp("texts") / "run"
    run_pipeline(make_config(d), until="texts", functions=standins(), progress=False, echo=None, report=False)
    return d


def test_kill9_anywhere_then_rerun_gives_the_same_run(tmp_path, texts_done):
    # the uninterrupted reference (in this process)
    ref = tmp_path / "ref"
    shutil.copytree(texts_done, ref)
    ref_teacher = LoggingFake(tmp_path / "ref-calls.log", rate=0.2)
    run_pipeline(make_config(ref), teacher=ref_teacher, functions=standins(), progress=False, echo=None, report=False)
    ref_calls = (tmp_path / "ref-calls.log").read_text().split()
    assert len(ref_calls) == len(set(ref_calls)) == len(cache_keys(ref / "calls.sqlite"))

    # the same run, killed with SIGKILL inside responses (teacher generation), difficulty (scoring), training
    run = tmp_path / "run"
    shutil.copytree(texts_done, run)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=str(Path(__file__).parent)))
    calls_log, run_log = tmp_path / "calls.log", run / "run.log"
    rng = random.Random(int(os.environ.get("COMPEFFDIST_KILL_SEED", "7")))
    kills = [("responses", 0.3, 2.0), ("difficulty", 0.2, 1.5), ("training", 0.1, 0.6)]
    attempts, computed_before = [], 0
    for stage, lo, hi in kills + [(None, 0, 0)]:
        cached_before = cache_keys(run / "calls.sqlite")
        offset = run_log.stat().st_size if run_log.is_file() else 0
        proc = subprocess.Popen([sys.executable, str(driver), str(run), str(calls_log), str(DELAY)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if stage is not None:
            assert wait_for(run_log, f"{stage:<13} start", offset, proc), proc.stderr.read()
            time.sleep(rng.uniform(lo, hi))
            assert proc.poll() is None, f"the run ended before the kill in {stage}"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            assert proc.returncode == -signal.SIGKILL
            assert RunStore(run).manifest(stage) is None, f"killed after {stage} had finished"
        else:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
        computed = calls_log.read_text().split() if calls_log.is_file() else []
        attempts.append((stage, len(computed) - computed_before))
        repeated = set(computed[computed_before:]) & cached_before
        assert not repeated, f"attempt {len(attempts)} recomputed {len(repeated)} finished teacher calls"
        computed_before = len(computed)

    # identical artefacts (data and the deterministic CPU training), the same cache, few calls lost to kills
    assert data_digests(run) == data_digests(ref)
    assert cache_keys(run / "calls.sqlite") == cache_keys(ref / "calls.sqlite")
    computed = calls_log.read_text().split()
    assert len(computed) - len(ref_calls) <= len(kills)  # at most the call in flight at each kill is redone
    # the final attempt's manifests account for every call of the stages it ran
    last = RunStore(run).manifest("responses")["stats"]["info"]["teacher"]
    ref_resp = RunStore(ref).manifest("responses")["stats"]["info"]["teacher"]
    assert last["hits"] + last["misses"] == ref_resp["misses"] and last["hits"] > 0
    print("teacher calls computed per attempt:", attempts)
