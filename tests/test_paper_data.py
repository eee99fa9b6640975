"The authors' published attributes and clusters: the stages started from them through the command line, and bad input."
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from compeffdist.core import read_json, read_jsonl
from compeffdist.data import PAPER_ATTRIBUTES, PAPER_CLUSTERS, PAPER_DATA_FILES

PAPER = Path(os.environ.get("COMPEFFDIST_PAPER_DATA", ""))


def _cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "compeffdist.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=600)


def _config(tmp_path, **sections) -> Path:
    cfg = {"run": {"name": "paper", "out": str(tmp_path / "run")}, "teacher": {"model": "no-teacher-needed"},
           "student": {"model": "smollm2-135m-instruct"}, "data": {"sentibench": None, "decontaminate": False,
           "sources": [{"type": "txt", "path": str(tmp_path / "texts.txt")}], "n_texts": 3}, **sections}
    (tmp_path / "texts.txt").write_text("A fine meal.\nThe service was slow and rude.\nI loved every minute.\n")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_published_attributes_clustered_by_our_stage(tmp_path):
    "1,786 names from the authors' list, no teacher call, clustered by our stage; the report names the file."
    cfg = _config(tmp_path, attributes={"published": PAPER_ATTRIBUTES, "min_count": 2000},
                  clustering={"percentile": 50})
    r = _cli("run", "--config", str(cfg), "--until", "clustering")
    assert r.returncode == 0, r.stderr
    attrs = read_jsonl(tmp_path / "run" / "attributes" / "attributes.jsonl")
    published = json.loads((PAPER / PAPER_ATTRIBUTES).read_text(encoding="utf-8-sig"))
    assert [a["name"] for a in attrs] == [a["attr"] for a in sorted(published, key=lambda a: (-a["count"], a["attr"]))
                                          if a["count"] > 2000]
    m = read_json(tmp_path / "run" / "attributes" / "manifest.json")
    assert m["stats"]["info"]["source"]["published"] == PAPER_ATTRIBUTES and "teacher" not in m["stats"]["info"]
    assert read_json(tmp_path / "run" / "clustering" / "manifest.json")["stats"]["counts"]["attributes_in"] == len(attrs)
    report = (tmp_path / "run" / "REPORT.md").read_text()
    assert "Attribute names: the published file `clustering/data/attr_list.json` (SHA-256" in report
    assert "perspectives: our clustering of those names." in report


def test_the_published_clusters_taken_as_they_are(tmp_path):
    cfg = _config(tmp_path, attributes={"published": PAPER_ATTRIBUTES}, clustering={"published": PAPER_CLUSTERS})
    assert _cli("run", "--config", str(cfg), "--until", "clustering").returncode == 0
    clusters = read_jsonl(tmp_path / "run" / "clustering" / "clusters.jsonl")
    m = read_json(tmp_path / "run" / "clustering" / "manifest.json")["stats"]
    assert len(clusters) == 180 and m["counts"]["attributes_covered"] == m["counts"]["attributes_in"] == 1786
    assert m["info"]["method"] == "published"


@pytest.mark.parametrize("content,message", [
    ('[{"attr": "tone"}]', "item 0 is not"), ("not json", "not valid JSON"), ("{}", "non-empty JSON list")])
def test_a_bad_published_list_is_one_line_of_error(tmp_path, content, message):
    (tmp_path / "bad.json").write_text(content)
    cfg = _config(tmp_path, attributes={"published": str(tmp_path / "bad.json")})
    r = _cli("run", "--config", str(cfg), "--until", "attributes")
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (tmp_path / "run" / "texts" / "manifest.json").is_file()  # what was finished stays


def test_an_unset_paper_data_folder_is_one_line_of_error(tmp_path):
    cfg = _config(tmp_path, attributes={"published": PAPER_ATTRIBUTES})
    env = {k: v for k, v in os.environ.items() if k != "COMPEFFDIST_PAPER_DATA"}
    r = subprocess.run([sys.executable, "-m", "compeffdist.cli", "run", "--config", str(cfg)], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 2 and "COMPEFFDIST_PAPER_DATA" in r.stderr and "paper-data download" in r.stderr


def test_paper_data_download_from_an_archive(tmp_path):
    "The command extracts the three files from a GitHub-shaped archive (a file:// URL: no network here)."
    with zipfile.ZipFile(tmp_path / "repo.zip", "w") as z:
        for f in PAPER_DATA_FILES:
            z.writestr(f"COMPEFFDIST-cbd6891/{f}", (PAPER / f).read_bytes())
    r = _cli("paper-data", "download", "--to", str(tmp_path / "paper"), "--url", (tmp_path / "repo.zip").as_uri())
    assert r.returncode == 0, r.stderr
    assert all((tmp_path / "paper" / f).read_bytes() == (PAPER / f).read_bytes() for f in PAPER_DATA_FILES)
    r = _cli("paper-data", "show", env={"COMPEFFDIST_PAPER_DATA": str(tmp_path / "paper")})
    assert r.returncode == 0 and "1786 items" in r.stdout and "180 items" in r.stdout
