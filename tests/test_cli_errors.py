"""Bad input through the real `compeffdist` command: one clear `error:` line on stderr, no traceback, exit != 0."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from compeffdist.models import resolve_model

COMPEFFDIST = str(Path(sys.executable).with_name("compeffdist"))
GOOD = "teacher: {model: smollm2-135m-instruct, engine: llamacpp}\nstudent: {model: smollm2-135m-instruct}\n"


def fails(args, cwd, *expected):
    "Run the command; it must fail with exactly one stderr line, `error: ...`, containing each of `expected`."
    r = subprocess.run([COMPEFFDIST, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for e in expected:
        assert e in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "latin1.txt").write_bytes("un café très réussi\n".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "garbage.gguf").write_bytes(b"\x00\x01not a model" * 1000)
    gguf = Path(resolve_model("smollm2-135m-instruct").location)
    (tmp_path / "truncated.gguf").write_bytes(gguf.read_bytes()[:4096])
    return tmp_path


# ---------------------------------------------------------------- models

def test_unknown_alias(files):
    fails(["generate", "--model", "no-such-model", "--prompt", "hi"], files, "unknown model 'no-such-model'",
          "smollm2-135m-instruct")  # the message lists the aliases there are
    fails(["models", "prepare", "smollm3-tiny"], files, "unknown model 'smollm3-tiny'")


def test_missing_model_file(files):
    fails(["generate", "--model", "models/missing.gguf", "--prompt", "hi"], files,
          "model file not found: models/missing.gguf")
    fails(["generate", "--model", "./missing.gguf", "--engine", "llamacpp", "--prompt", "hi"], files, "not found")


def test_model_file_that_is_not_a_model(files):
    fails(["generate", "--model", "garbage.gguf", "--engine", "llamacpp", "--prompt", "hi"], files,
          "garbage.gguf is not a GGUF file")
    fails(["generate", "--model", "truncated.gguf", "--engine", "llamacpp", "--prompt", "hi"], files,
          "truncated.gguf", "llama.cpp cannot load")
    fails(["generate", "--model", "truncated.gguf", "--engine", "hf", "--prompt", "hi"], files,
          "truncated.gguf", "transformers cannot load")


# ---------------------------------------------------------------- configs

def test_invalid_yaml(files):
    (files / "bad.yaml").write_text("teacher: {model: x\n  student: [\n")
    fails(["generate", "--config", "bad.yaml", "--prompt", "hi"], files, "bad.yaml", "invalid YAML at line")
    fails(["run", "--config", "bad.yaml", "--plan"], files, "bad.yaml", "invalid YAML")


def test_config_that_is_not_utf8_or_not_a_mapping(files):
    (files / "latin1.yaml").write_bytes(GOOD.encode() + "# café\n".encode("latin-1"))
    fails(["generate", "--config", "latin1.yaml", "--prompt", "hi"], files, "latin1.yaml", "not a UTF-8")
    (files / "list.yaml").write_text("- teacher\n- student\n")
    fails(["run", "--config", "list.yaml", "--plan"], files, "list.yaml", "mapping")


def test_missing_config_file(files):
    fails(["generate", "--config", "nope.yaml", "--prompt", "hi"], files, "nope.yaml", "not found")
    fails(["run", "--config", "nope.yaml", "--plan"], files, "nope.yaml", "not found")


def test_unknown_config_key(files):
    (files / "extra.yaml").write_text(GOOD + "training: {epochs: 2, epoch: 3}\n")
    fails(["run", "--config", "extra.yaml", "--plan"], files, "extra.yaml", "training.epoch: unknown key")
    (files / "extra2.yaml").write_text(GOOD + "sampler: {rate: 0.5}\n")
    fails(["generate", "--config", "extra2.yaml", "--prompt", "hi"], files, "extra2.yaml", "sampler: unknown key")


def test_wrong_type(files):
    (files / "typed.yaml").write_text(GOOD.replace("{model: smollm2-135m-instruct}",
                                                   "{model: smollm2-135m-instruct, batch_size: eight}"))
    fails(["run", "--config", "typed.yaml", "--plan"], files, "typed.yaml", "student.batch_size", "integer")
    (files / "engine.yaml").write_text(GOOD.replace("engine: llamacpp", "engine: tensorrt"))
    fails(["generate", "--config", "engine.yaml", "--prompt", "hi"], files, "engine.yaml", "teacher.engine")
    fails(["run", "--config", "engine.yaml", "--plan", "--set", "sampling.rate=lots"], files, "sampling.rate")


# ---------------------------------------------------------------- user texts

@pytest.mark.parametrize("name,expected", [("empty.txt", "no texts"), ("blank.txt", "no texts"),
                                           ("latin1.txt", "not a UTF-8 text file"), ("bad.jsonl", ":2: not valid JSON"),
                                           ("absent.txt", "not found")])
def test_bad_text_files(files, name, expected):
    fails(["generate", "--model", "smollm2-135m-instruct", "--engine", "llamacpp", "--texts", name], files, name,
          expected)


@pytest.mark.parametrize("name,expected", [("empty.txt", "no texts"), ("latin1.txt", "not a UTF-8 text file")])
def test_bad_text_files_in_a_run(files, name, expected):
    cfg = GOOD + f"data:\n  decontaminate: false\n  sources: [{{type: txt, path: {files / name}}}]\n"
    (files / "texts.yaml").write_text(cfg)
    fails(["run", "--config", "texts.yaml", "--stages", "texts", "--out", str(files / "run"), "--quiet"], files,
          name, expected)


def test_bad_constraints_and_commands(files):
    fails(["generate", "--model", "smollm2-135m-instruct", "--prompt", "hi", "--json-schema", "{not json"], files,
          "--json-schema", "not valid JSON")
    (files / "schema.json").write_text(json.dumps(["a list"]))
    fails(["generate", "--model", "smollm2-135m-instruct", "--prompt", "hi", "--json-schema", "schema.json"], files,
          "must be an object")
    fails(["generate", "--model", "smollm2-135m-instruct", "--prompt", "hi", "--choice", " , "], files, "--choice")
    fails(["distill"], files, "unknown command 'distill'")
