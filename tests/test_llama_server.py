"""The llamacpp engine with parallel > 1: llama.cpp's server (built by `make install`) with a real model.

Concurrent greedy requests against the same requests one by one in process, the call cache's contract under
concurrency, kill -9 in the middle of a concurrent batch, the `generate` command's JSONL mode, and a budget stop.
"""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compeffdist.core import CompeffdistError, ModelConfig
from compeffdist.engines import (BudgetSpent, CachedEngine, Constraint, LlamaCppEngine, SamplingParams, TeacherBudget,
                                 json_ok, make_engine)
from compeffdist.llama_server import LlamaServerEngine, check_llama_server

MODEL = "smollm2-135m-instruct"  # the bundled student's GGUF: a real model that decodes fast on 2 cores
REVIEWS = ["The battery died after two days.", "Lovely staff, tiny room.", "Best pizza in town!",
           "It works, I guess.", "Never again: cold food, rude waiter.", "The plot drags but the ending lands.",
           "Five stars, would buy again.", "Shipping took a month."]


def chat(text):
    return [{"role": "user", "content": f"What is the sentiment of this review, and why? {text}"}]


def test_make_engine_picks_the_server_for_parallel():
    eng = make_engine(ModelConfig(model=MODEL, engine="llamacpp", parallel=2, context_length=512, n_threads=2))
    try:
        assert isinstance(eng, LlamaServerEngine) and eng.max_concurrency == 2
        assert eng.identity == f"llamacpp:{eng.ref.identity}"  # shares the in-process engine's cache entries
    finally:
        eng.close()
    assert eng.server.proc is None


def test_concurrent_greedy_equals_one_by_one_and_cache_holds_each_once(tmp_path):
    batch = [chat(t) for t in REVIEWS[:4]]
    schema = {"type": "object", "properties": {"sentiment": {"type": "string"}}, "required": ["sentiment"]}
    cons = [None, Constraint(json_schema=schema), Constraint(choice=["positive", "negative"]), None]
    params = SamplingParams(max_new_tokens=24)
    one = LlamaCppEngine(MODEL, context_length=512, n_threads=2)
    ref = [g[0].text for g in one.generate(batch, params, cons)]
    one.close()
    eng = CachedEngine(LlamaServerEngine(MODEL, parallel=4, context_length=512, n_threads=2), tmp_path / "c.sqlite",
                       progress=False)
    try:
        got = [g[0].text for g in eng.generate(batch + batch[:2], params, cons + cons[:2])]
    finally:
        eng.close()
    assert json_ok(got[1], schema) and got[2] in ("positive", "negative")
    # Batched kernels and reused KV caches add in another order, so greedy decoding may take another token where
    # two are nearly tied (counted by benchmarks/engines.py). Each answer must still be the answer to its own
    # request: identical, or identical for its first 30 characters (a mixed-up answer parts at once).
    for a, b in zip(got, ref):
        assert a == b or (len(a) > 30 and a[:30] == b[:30]), (a, b)
    assert got[4:] == got[:2]  # the repeated requests got the first answers
    with sqlite3.connect(tmp_path / "c.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM calls").fetchone()[0] == 4
    assert eng.stats.misses == 6 and eng.engine.timings["predicted_n"] > 0


def _cache_rows(path: Path) -> int:
    try:
        with sqlite3.connect(path, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_kill_9_during_a_concurrent_batch_loses_only_unfinished_requests(tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Write a short review of a {t}.", "id": i}) + "\n"
                               for i, t in enumerate(["phone", "hotel", "film", "bus", "cafe", "lamp", "game",
                                                      "book", "sofa", "bike", "tent", "pen"])))
    cache, out = tmp_path / "calls.sqlite", tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "compeffdist.cli", "generate", "--model", MODEL, "--engine", "llamacpp",
           "--parallel", "4", "--threads", "2", "--prompts", str(prompts), "--output", str(out),
           "--max-new-tokens", "64", "--cache", str(cache)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while _cache_rows(cache) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _cache_rows(cache)
    assert 3 <= done < 12, f"{done} requests finished before the kill"
    time.sleep(1)
    for pid in children:  # the server died with its parent
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    line = [l for l in again.stdout.splitlines() if "prompts:" in l][-1]
    assert f"{12 - done} generated, {done} from cache" in line, line
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(12)) and all(r["output"] for r in rows)


def test_generate_jsonl_mode_without_cache_makes_every_call(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"messages": chat(REVIEWS[0]), "tag": "a"}) + "\n" + json.dumps({"prompt": "Say hi."}) + "\n")
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "compeffdist.cli", "generate", "--model", MODEL, "--engine", "llamacpp",
           "--parallel", "2", "--threads", "2", "--prompts", str(src), "--output", str(out), "--max-new-tokens", "8"]
    for _ in range(2):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "2 prompts: 2 generated, 0 from cache" in res.stdout and "tok/s" in res.stdout
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert rows[0]["tag"] == "a" and all(r["output"] and r["finish_reason"] in ("stop", "length") for r in rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    res = subprocess.run(cmd[:-6] + ["--prompts", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("error:") and len(res.stderr.strip().splitlines()) == 1


def test_budget_stops_between_calls_and_keeps_finished_ones(tmp_path):
    eng = CachedEngine(LlamaServerEngine(MODEL, parallel=2, context_length=512, n_threads=2), tmp_path / "c.sqlite",
                       progress=False, budget=TeacherBudget(max_calls=3))
    try:
        with pytest.raises(BudgetSpent):
            eng.generate([chat(t) for t in REVIEWS], SamplingParams(max_new_tokens=8))
    finally:
        eng.close()
    assert _cache_rows(tmp_path / "c.sqlite") == 3


def test_missing_server_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPEFFDIST_LLAMA_SERVER", str(tmp_path / "nope"))
    with pytest.raises(CompeffdistError, match="not built"):
        LlamaServerEngine(MODEL, parallel=2)


def test_make_install_built_the_server():
    assert check_llama_server().is_file()


def test_a_looping_answer_is_stopped_in_the_server_and_the_prompt_cost_is_counted(tmp_path):
    """Streamed with `stop_loops` (the default), an answer that loops ends early with finish reason `loop` and is the
    beginning of the whole answer; one that ends by itself is the same either way. The stats count the loop, and the
    prompt tokens the server evaluated and those a slot reused (a second request sharing the first one's prompt)."""
    loopy = [{"role": "user", "content": "Write the word 'good' one hundred times."}]
    ends = [{"role": "user", "content": "Repeat after me: I love this film."}]
    eng = CachedEngine(LlamaServerEngine(MODEL, parallel=1, context_length=1024, n_threads=2), tmp_path / "c.sqlite",
                       progress=False)
    try:
        (on,), = eng.generate([loopy], SamplingParams(max_new_tokens=160))
        (off,), = eng.generate([loopy], SamplingParams(max_new_tokens=160, stop_loops=False))
        (e_on,), = eng.generate([ends], SamplingParams(max_new_tokens=160))
        (e_off,), = eng.generate([ends], SamplingParams(max_new_tokens=160, stop_loops=False))
    finally:
        eng.close()
    assert on.finish_reason == "loop" and on.completion_tokens < 80 and off.finish_reason == "length"
    assert off.text.startswith(on.text) and off.completion_tokens == 160
    assert e_on.text == e_off.text and e_on.finish_reason == e_off.finish_reason == "stop"
    s = eng.stats
    assert s.misses == 4 and s.loops == 1
    assert s.prompt_evaluated + s.prompt_reused == s.prompt_tokens and s.prompt_reused > 0  # the repeats reused a slot
