"""tools/run_nb.py --save keeps what cells print (and their plots and results), whether or not it streams them."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CELLS = ["print('printed line')\nx = 41",
         "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nprint('after the plot')",
         "import sys\nprint('to stderr', file=sys.stderr)\nx + 1"]


def _nb(path: Path):
    cells = [{"cell_type": "code", "metadata": {}, "source": s, "outputs": [], "execution_count": None} for s in CELLS]
    path.write_text(json.dumps({"cells": cells, "metadata": {"kernelspec": {"name": "python3", "language": "python",
                                "display_name": "Python 3"}}, "nbformat": 4, "nbformat_minor": 5}))


@pytest.mark.parametrize("quiet", [False, True], ids=["streamed", "quiet"])
def test_save_keeps_printed_output_and_plots(tmp_path, quiet):
    nb = tmp_path / "t.ipynb"
    _nb(nb)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "run_nb.py"), str(nb), "--save"] + (["--quiet"] if quiet else []),
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("printed line" in r.stdout) != quiet  # streamed to the console unless --quiet
    outs = [c["outputs"] for c in json.loads(nb.read_text())["cells"]]
    text = lambda o: "".join(o.get("text", []))
    assert [text(o) for o in outs[0]] == ["printed line\n"]
    assert [o["output_type"] for o in outs[1]] == ["stream", "display_data"] and text(outs[1][0]) == "after the plot\n"
    assert "image/png" in outs[1][1]["data"]
    assert outs[2][0]["name"] == "stderr" and text(outs[2][0]) == "to stderr\n"
    assert "".join(outs[2][1]["data"]["text/plain"]) == "42"
