"""The runner's orchestration: order, skipping finished stages, fingerprint propagation, --force, --stages/--until,
errors before and during a run, teacher bookkeeping and the report. Stand-in stage functions (with the real
`texts` stage, a FakeEngine teacher behind the real SQLite call cache, and tiny torch training) keep it fast; the
real stages are run end to end by tests/test_reliability.py."""
import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compeffdist.core import (CompeffdistError, Config, DataConfig, ModelConfig, RunConfig, RunStore, StageStats,
                              read_json, read_jsonl, write_json, write_jsonl)
from compeffdist.engines import FakeEngine, SamplingParams, per_request, request_key
from compeffdist import pipeline
from compeffdist.pipeline import STAGE_NAMES, Stage, fingerprints, plan_run, run_pipeline, stage_function

ROOT = Path(__file__).resolve().parents[1]
MALFORMED = "??"


def fake_answer(messages, i, rate: float = 0.2, delay: float = 0.0) -> str:
    "A deterministic teacher: a label, or a malformed answer for a `rate` share of the prompts (by content hash)."
    if delay:
        time.sleep(delay)
    content = messages[-1]["content"]
    h = int(hashlib.sha1(content.encode()).hexdigest(), 16)
    if h % 1000 < rate * 1000:
        return random.Random(h).choice([MALFORMED, "", "{\"label\": ", "positive positive positive"])
    return ["positive", "negative", "neutral"][h % 3]


class LoggingFake(FakeEngine):
    "A FakeEngine that appends the cache key of every request it actually computes to a file."

    def __init__(self, log: Path | None = None, rate: float = 0.2, delay: float = 0.0):
        super().__init__(lambda m, i: fake_answer(m, i, rate, delay))
        self.log = log

    def generate_iter(self, batch, params, constraint=None):
        for j, (m, (p, c)) in enumerate(zip(batch, per_request(batch, params, constraint))):
            if self.log:
                with open(self.log, "a") as f:
                    f.write(request_key(self.identity, list(m), p, c) + "\n")
            for _, gens in super().generate_iter([m], p, c):
                yield j, gens


def _valid(text: str) -> str | None:
    return None if text in ("positive", "negative", "neutral") else ("empty" if not text else "malformed")


def standins(delay: float = 0.0) -> dict:
    "Stand-in stage functions that read and write the contract's artefacts, call the teacher, and use randomness."
    def pause():
        if delay: time.sleep(delay)

    def attributes(ctx):
        st, texts = StageStats(), read_jsonl(ctx.store.path("texts", "texts.jsonl"))
        outs = ctx.teacher.generate([[{"role": "user", "content": f"Attributes of: {t['text']}"}] for t in texts],
                                    SamplingParams(max_new_tokens=8), desc="attributes")
        kept = []
        for t, o in zip(texts, outs):
            if reason := _valid(o[0].text): st.drop(reason); continue
            kept.append({"id": t["id"], "text": t["text"], "source": t["source"],
                         "attributes": [{"name": o[0].text, "raw_name": o[0].text, "description": "", "value": ""}]})
        names = sorted({a["attributes"][0]["name"] for a in kept})
        write_jsonl(ctx.store.path("attributes", "text_attributes.jsonl"), kept)
        write_jsonl(ctx.store.path("attributes", "attributes.jsonl"), [{"name": n, "count": 1} for n in names])
        st.add("texts_in", len(texts)); st.add("attributes_out", len(names))
        return st

    def clustering(ctx):
        attrs = read_jsonl(ctx.store.path("attributes", "attributes.jsonl"))
        write_jsonl(ctx.store.path("clustering", "clusters.jsonl"),
                    [{"cluster_id": i, "attributes": [a], "total_count": 1} for i, a in enumerate(attrs)])
        return StageStats(counts={"clusters": len(attrs)})

    def instructions(ctx):
        cl = read_jsonl(ctx.store.path("clustering", "clusters.jsonl"))
        outs = ctx.teacher.generate([[{"role": "user", "content": f"Write a task about {c['attributes'][0]['name']}"}]
                                     for c in cl], SamplingParams(), desc="instructions")
        recs = [{"id": f"i{c['cluster_id']}", "cluster_id": c["cluster_id"], "kind": "task", "task_name": o[0].text,
                 "instruction": f"Is the sentiment {o[0].text}?"} for c, o in zip(cl, outs)]
        write_jsonl(ctx.store.path("instructions", "instructions.jsonl"), recs)
        return StageStats(counts={"instructions": len(recs)})

    def pairing(ctx):
        ins, texts = (read_jsonl(ctx.store.path("instructions", "instructions.jsonl")),
                      read_jsonl(ctx.store.path("texts", "texts.jsonl")))
        recs = [{"id": f"s{k}", "instruction_id": i["id"], "text_id": t["id"], "text": t["text"],
                 "instruction": f"{i['instruction']}\nInput: {t['text']}"}
                for k, (i, t) in enumerate((random.choice(ins), random.choice(texts)) for _ in range(ctx.cfg.pairing.n_samples))]
        write_jsonl(ctx.store.path("pairing", "samples.jsonl"), recs)
        return StageStats(counts={"samples": len(recs)})

    def responses(ctx):
        st, recs = StageStats(), read_jsonl(ctx.store.path("pairing", "samples.jsonl"))
        kept = []
        for r, o in zip(recs, ctx.teacher.generate([[{"role": "user", "content": r["instruction"]}] for r in recs],
                                                   SamplingParams(max_new_tokens=16), desc="responses")):
            if reason := _valid(o[0].text): st.drop(reason); continue
            kept.append({**r, "output": o[0].text, "finish_reason": o[0].finish_reason,
                         "verification": {"ok": True, "reasons": []}})
        write_jsonl(ctx.store.path("responses", "samples.jsonl"), kept)
        st.add("samples_in", len(recs)); st.add("samples_out", len(kept))
        return st

    def train(ctx, stage, src):
        import torch
        recs = read_jsonl(ctx.store.path(*src))
        model = torch.nn.Linear(8, 1)  # initialised from torch's global RNG: seeded by the runner per stage
        for step in range(len(recs)):
            x = torch.randn(4, 8)
            loss = ((model(x) - 1) ** 2).mean()
            model.zero_grad(); loss.backward()
            with torch.no_grad():
                for p in model.parameters(): p -= 0.1 * p.grad
            pause()
        ctx.store.path(stage, "model").mkdir(exist_ok=True)
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, ctx.store.path(stage, "model") / "weights.pt")
        write_json(ctx.store.path(stage, "card.json"), {"steps": len(recs), "final_loss": round(loss.item(), 6)})
        return StageStats(counts={"train_samples": len(recs)})

    def difficulty(ctx):
        import torch
        recs, out = read_jsonl(ctx.store.path("responses", "samples.jsonl")), []
        for r in recs:
            pause()
            out.append({**r, "difficulty": {"rank": round(torch.rand(1).item(), 6), "ppl": len(r["output"]),
                                            "length": len(r["output"])}})
        write_jsonl(ctx.store.path("difficulty", "scored.jsonl"), out)
        return StageStats(counts={"scored": len(out)})

    def sampling(ctx):
        recs = read_jsonl(ctx.store.path("difficulty", "scored.jsonl"))
        kept = [r for r in recs if random.random() < r["difficulty"]["rank"] * 2 * ctx.cfg.sampling.rate]
        write_jsonl(ctx.store.path("sampling", "kept.jsonl"), kept)
        return StageStats(counts={"kept": len(kept)}, drops={"not_sampled": len(recs) - len(kept)})

    def evaluation(ctx):
        ctx.sentibench  # needs the folder
        (ctx.store.path("evaluation") / "table.md").write_text("| model | sst2 |\n|---|---|\n| student | 50.0 |\n")
        return StageStats(counts={"models": 1})

    return {"attributes": attributes, "clustering": clustering, "instructions": instructions, "pairing": pairing,
            "responses": responses, "warmup": lambda ctx: train(ctx, "warmup", ("responses", "samples.jsonl")),
            "difficulty": difficulty, "sampling": sampling,
            "training": lambda ctx: train(ctx, "training", ("sampling", "kept.jsonl")), "evaluation": evaluation}


def make_config(out: Path, **over) -> Config:
    base = {"run": RunConfig(out=str(out), name="standins"), "teacher": ModelConfig(model="fake"),
            "student": ModelConfig(model="fake"), "data": DataConfig(n_texts=40)}
    cfg = Config(**base)
    cfg.pairing.n_samples = 60
    for key, value in over.items():
        section, field = key.split(".")
        setattr(getattr(cfg, section), field, value)
    return cfg


def actions(steps) -> dict:
    return {s.name: s.action for s in steps}


@pytest.fixture(scope="module")
def texts_done(tmp_path_factory, sentibench_root):
    "A run folder where the real texts stage has finished (made once, copied by each test)."
    d = tmp_path_factory.mktemp("texts") / "run"
    run_pipeline(make_config(d), until="texts", functions=standins(), progress=False, echo=None, report=False)
    return d


@pytest.fixture
def run(tmp_path, texts_done):
    "Run the stand-in pipeline in tmp_path/run (texts already finished); returns (run function, teacher)."
    shutil.copytree(texts_done, tmp_path / "run")
    teacher = LoggingFake()

    def _run(cfg=None, report=False, **kw):
        return run_pipeline(cfg or make_config(tmp_path / "run"), teacher=teacher, functions=standins(),
                            progress=False, echo=None, report=report, **kw)
    return _run, teacher


def test_stages_order_and_registry():
    assert STAGE_NAMES == ["texts", "attributes", "clustering", "instructions", "pairing", "responses", "warmup",
                           "difficulty", "sampling", "training", "evaluation"]
    for s in pipeline.STAGES:
        try:
            fn = stage_function(s)
        except CompeffdistError as e:  # a stage not in this checkout: a clear one-line error
            assert s.name in str(e) and "\n" not in str(e)
        else:
            assert fn.__name__ == f"run_{s.name}"
    with pytest.raises(CompeffdistError, match="no module compeffdist.nothing"):
        stage_function(Stage("nothing", "compeffdist.nothing", ()))
    with pytest.raises(CompeffdistError, match="has no run_nothing"):
        stage_function(Stage("nothing", "compeffdist.core", ()))


def test_full_run_then_rerun_skips_everything(run, tmp_path):
    go, teacher = run
    steps = go()
    assert all(a == "run" for n, a in actions(steps).items() if n != "texts")
    assert actions(steps)["texts"] == "skip"  # finished in the texts_done fixture
    calls = teacher.calls
    store = RunStore(tmp_path / "run")
    for name in STAGE_NAMES:
        m = store.manifest(name)
        assert m["fingerprint"] == fingerprints(make_config(tmp_path / "run"))[name]
        assert m["seconds"] is not None and "files" in m["stats"]["info"]
    resp = store.manifest("responses")["stats"]
    assert resp["info"]["teacher"]["misses"] == 60 and resp["info"]["teacher"]["hits"] == 0
    assert sum(resp["drops"].values()) + resp["counts"]["samples_out"] == 60 and resp["drops"]
    assert "teacher" not in store.manifest("pairing")["stats"]["info"]  # no call, no teacher record
    steps = go(report=True)
    assert all(a == "skip" for a in actions(steps).values())
    assert teacher.calls == calls  # nothing finished is recomputed
    assert (tmp_path / "run" / "REPORT.md").is_file() and (tmp_path / "run" / "report.html").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file() and "config_hash" in read_json(tmp_path / "run" / "run.json")


def test_config_change_reruns_the_stage_and_what_follows(run, tmp_path):
    go, teacher = run
    go()
    before = {n: RunStore(tmp_path / "run").manifest(n)["finished_at"] for n in STAGE_NAMES}
    steps = go(make_config(tmp_path / "run", **{"sampling.rate": 0.3}))
    assert [n for n, a in actions(steps).items() if a == "run"] == ["sampling", "training", "evaluation"]
    reasons = {s.name: s.reason for s in steps}
    assert reasons["sampling"] == "config changed" and reasons["training"].startswith("upstream changed")
    steps = go(make_config(tmp_path / "run", **{"pairing.n_samples": 50}))  # pairing and everything after
    assert [n for n, a in actions(steps).items() if a == "run"] == STAGE_NAMES[4:]
    # runtime-only settings change no fingerprint
    cfg = make_config(tmp_path / "run", **{"pairing.n_samples": 50})
    cfg.teacher.n_threads = 1
    cfg.data.sentibench = os.environ["COMPEFFDIST_SENTIBENCH"]
    assert all(a == "skip" for a in actions(go(cfg)).values())
    assert before["texts"] == RunStore(tmp_path / "run").manifest("texts")["finished_at"]


def test_force_reruns_stage_and_after_from_the_cache(run, tmp_path):
    go, teacher = run
    go()
    calls, store = teacher.calls, RunStore(tmp_path / "run")
    kept = (tmp_path / "run" / "sampling" / "kept.jsonl").read_bytes()
    steps = go(force="responses")
    assert [n for n, a in actions(steps).items() if a == "run"] == STAGE_NAMES[5:]
    assert {s.reason for s in steps if s.action == "run"} == {"forced"}
    assert teacher.calls == calls  # every teacher answer came from the cache
    t = store.manifest("responses")["stats"]["info"]["teacher"]
    assert t["hits"] == 60 and t["misses"] == 0
    assert (tmp_path / "run" / "sampling" / "kept.jsonl").read_bytes() == kept  # same seed, same data


def test_stages_and_until(run, tmp_path):
    go, teacher = run
    steps = go(until="pairing")
    assert [n for n, a in actions(steps).items() if a == "run"] == STAGE_NAMES[1:5]
    assert RunStore(tmp_path / "run").manifest("responses") is None
    with pytest.raises(CompeffdistError, match="'difficulty' reads 'responses'.*--stages"):
        go(stages="difficulty")
    steps = go(stages="responses,warm-up")
    assert [n for n, a in actions(steps).items() if a == "run"] == ["responses", "warmup"]
    with pytest.raises(CompeffdistError, match="unknown stage 'tokenise'"):
        go(stages="tokenise")


def test_missing_stage_module_fails_before_any_work(tmp_path, monkeypatch, sentibench_root):
    i = STAGE_NAMES.index("clustering")
    stages = list(pipeline.STAGES)
    stages[i] = Stage("clustering", "compeffdist.not_yet_written", ("clustering",), ("attributes",), "clusters.jsonl")
    monkeypatch.setattr(pipeline, "STAGES", stages)
    fns = standins(); fns.pop("clustering")
    with pytest.raises(CompeffdistError, match="stage 'clustering' is not available"):
        run_pipeline(make_config(tmp_path / "run"), teacher=LoggingFake(), functions=fns, progress=False, echo=None)
    assert not (tmp_path / "run" / "texts" / "manifest.json").exists()


def test_failing_stage_keeps_finished_work_and_resumes(run, tmp_path):
    go, teacher = run
    fns = standins()

    def broken(ctx):
        raise CompeffdistError("instructions.jsonl has no task instructions")
    with pytest.raises(CompeffdistError, match="^stage pairing: instructions.jsonl has no task"):
        run_pipeline(make_config(tmp_path / "run"), teacher=teacher, functions={**fns, "pairing": broken},
                     progress=False, echo=None)
    store = RunStore(tmp_path / "run")
    done = [n for n in STAGE_NAMES if store.manifest(n)]
    assert done == STAGE_NAMES[:4]
    assert "pairing" in (tmp_path / "run" / "run.log").read_text() and "failed" in (tmp_path / "run" / "run.log").read_text()
    steps = go()
    assert [n for n, a in actions(steps).items() if a == "run"] == STAGE_NAMES[4:]


def test_a_second_runner_on_the_same_folder_is_refused(tmp_path):
    store = RunStore(tmp_path / "run")
    with pipeline.run_lock(store.root):
        with pytest.raises(CompeffdistError, match="another compeffdist run"):
            with pipeline.run_lock(store.root):
                pass


def test_report_counts_every_drop_by_reason(run, tmp_path):
    go, teacher = run
    go(report=True)
    report = (tmp_path / "run" / "REPORT.md").read_text()
    store = RunStore(tmp_path / "run")
    for name in STAGE_NAMES:
        for reason, n in store.manifest(name)["stats"]["drops"].items():
            assert f"{reason}: {n}" in report, (name, reason)
    assert "| responses | 60 | 0 |" in report  # teacher cost: 60 generated, 0 from cache
    for section in ("## Models", "## Data flow", "## Decontamination", "## Teacher cost", "## What the corpus teaches",
                    "## Difficulty", "## Sampling", "## SentiBench", "## Config", "## Artefacts"):
        assert section in report
    html = (tmp_path / "run" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4  # flow, coverage, difficulty, sampling


# --- the command line: errors are one line, exit status 2, and nothing finished is deleted ---------------

def cli(*args, env=None):
    return subprocess.run([str(Path(sys.executable).with_name("compeffdist")), *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


def _snapshot(root: Path, everything: bool = False) -> dict[str, str]:
    "Hashes of the run folder's files; by default the finished work only (manifests and artefacts), not the\n    run-level bookkeeping (config.yaml, run.json, run.log, the report) that each invocation rewrites."
    skip = set() if everything else {"run.log", ".lock", "config.yaml", "run.json", "REPORT.md", "report.html"}
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


@pytest.fixture(scope="module")
def texts_run(tmp_path_factory):
    "A run folder where the real texts stage has finished (CLI, --until texts)."
    if not Path(os.environ.get("COMPEFFDIST_SENTIBENCH", "/nonexistent"), "sc").is_dir():
        pytest.skip("needs COMPEFFDIST_SENTIBENCH")
    d = tmp_path_factory.mktemp("cli")
    cfg = d / "cfg.yaml"
    cfg.write_text(f"run: {{out: {d / 'run'}}}\nteacher: {{model: qwen2.5-coder-1.5b-instruct, engine: llamacpp}}\n"
                   "student: {model: smollm2-135m-instruct}\ndata: {n_texts: 30}\n")
    r = cli("run", "--config", str(cfg), "--until", "texts", "--quiet")
    assert r.returncode == 0, r.stderr
    return d, cfg


def _one_error_line(r):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_cli_invalid_config(texts_run):
    d, cfg = texts_run
    before = _snapshot(d / "run")
    bad = d / "bad.yaml"
    for text, expect in [("run: {out: X}\nteacher: {model: t}\nstudent: {model: s}\nsampling: {rat: 0.5}\n", "sampling.rat: unknown key"),
                         ("teacher: [unclosed\n", "invalid YAML"),
                         ("run: {out: X}\nteacher: {model: t}\n", "student: field required")]:
        bad.write_text(text.replace("X", str(d / "run")))
        line = _one_error_line(cli("run", "--config", str(bad)))
        assert expect in line, line
    assert "config file not found" in _one_error_line(cli("run", "--config", str(d / "missing.yaml")))
    assert "unknown stage" in _one_error_line(cli("run", "--config", str(cfg), "--force", "nope"))
    assert _snapshot(d / "run") == before


def test_cli_unreadable_input(texts_run):
    d, cfg = texts_run
    before = _snapshot(d / "run")
    latin = d / "latin1.txt"
    latin.write_bytes("caf\xe9 tr\xe8s bon, vraiment tr\xe8s bon\n".encode("latin-1"))
    for path, expect in [(d / "nope.jsonl", "user-text file not found"), (latin, "not a UTF-8 text file")]:
        line = _one_error_line(cli("run", "--config", str(cfg), "--until", "texts",
                                   "--set", f"data.sources=[{{type: txt, path: {path}}}]"))
        assert line.startswith("error: stage texts: ") and expect in line, line
    assert _snapshot(d / "run") == before  # the finished texts stage is still there, untouched


def test_cli_sentibench_missing(texts_run):
    d, cfg = texts_run
    before = _snapshot(d / "run")
    line = _one_error_line(cli("run", "--config", str(cfg), "--until", "texts", "--force", "texts",
                               env={"COMPEFFDIST_SENTIBENCH": str(d / "no-sentibench")}))
    assert "SentiBench folder not found" in line
    assert _snapshot(d / "run") == before  # checked before --force invalidated anything


@contextlib.contextmanager
def read_only(folder: Path):
    "Make a folder unwritable for this process: chmod for a normal user; root ignores modes, so chattr +i."
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        try: yield
        finally: os.chmod(folder, 0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i: cannot make a folder unwritable")
    try: yield
    finally: subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_cli_output_folder_not_writable(texts_run, tmp_path):
    d, cfg = texts_run
    before = _snapshot(d / "run", everything=True)
    with read_only(d / "run"):
        assert "run folder is not writable" in _one_error_line(cli("run", "--config", str(cfg), "--quiet"))
    assert _snapshot(d / "run", everything=True) == before
    f = tmp_path / "a-file"; f.write_text("x")
    assert "not writable" in _one_error_line(cli("run", "--config", str(cfg), "--out", str(f / "run")))


def test_cli_plan_and_report_only(texts_run):
    d, cfg = texts_run
    r = cli("run", "--config", str(cfg), "--plan")
    assert r.returncode == 0 and "texts         skip" in r.stdout and "attributes    run" in r.stdout, r.stdout
    r = cli("run", "--config", str(cfg), "--report-only")
    assert r.returncode == 0 and (d / "run" / "REPORT.md").is_file()
    assert "| texts | finished |" in (d / "run" / "REPORT.md").read_text()
