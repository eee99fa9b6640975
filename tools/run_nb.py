"""Run one notebook top to bottom the way the tests do, optionally forcing flagged cells and saving outputs.

    python tools/run_nb.py nbs/10_attributes.ipynb                 # as the test suite runs it
    python tools/run_nb.py nbs/10_attributes.ipynb --save          # and write the outputs (printed text, tables,
                                                                   # plots) back into the notebook
    python tools/run_nb.py nbs/10_attributes.ipynb --flags slow --save
    python tools/run_nb.py nbs/*.ipynb --strip-bars                # only remove library progress bars from saved output

Cell output is streamed to the console while it runs *and* kept for the saved notebook. nbdev's runner cannot do
both: `test_nb(verbose=True)` makes execnb's `CaptureShell._captured` call IPython's `capture_output` with
`stdout=stdout and not verbose`, so a streamed cell's printed text reaches the console and never the cell (its
plots, which go through the display publisher, are kept either way). Here execnb always captures, and the
captured streams are teed to the console.

Saved output leaves out the progress bars of the libraries (weights loading, dataset mapping, shard writing): they
are switched off while saving, and any left in a notebook's stderr streams are removed (`--strip-bars`).
"""
import argparse
import json
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import nbdev.test as nbtest
from execnb.shell import CaptureShell
from nbdev.config import get_config


class Tee:
    "A text stream that writes to a capture buffer and echoes to the console."

    def __init__(self, capture, console):
        self.capture, self.console = capture, console

    def write(self, s):
        self.console.write(s); self.console.flush()
        return self.capture.write(s)

    def flush(self):
        self.console.flush()

    def __getattr__(self, name):  # isatty, encoding, ... as the capture buffer answers them
        return getattr(self.capture, name)


def tee_cell_output(echo: bool = True):
    "Make execnb capture every cell's stdout/stderr (so it is saved), echoing it to the console when `echo`."
    original = CaptureShell._captured

    @contextmanager
    def _captured(self, stdout=True, stderr=True, display=True, verbose=False):
        with original(self, stdout, stderr, display, verbose=False) as c:  # capture, whatever `verbose` says
            if echo:
                if stdout: sys.stdout = Tee(sys.stdout, sys.__stdout__)
                if stderr: sys.stderr = Tee(sys.stderr, sys.__stderr__)
            yield c  # capture_output restores sys.stdout/sys.stderr on exit
    CaptureShell._captured = _captured


LIBRARY_BARS = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")  # transformers, datasets/TRL
_BAR = re.compile(r"^[^|\r\n]*?:?\s+\d+%\|[^|]*\|.*$")  # one tqdm refresh: "label:  35%|###4   | 95/272 [...]"


def strip_progress_bars(path: Path) -> int:
    "Remove the lines made only of tqdm refreshes from a saved notebook's stderr streams; the number removed."
    nb, removed = json.loads(path.read_text()), 0
    for cell in nb["cells"]:
        kept = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out["name"] == "stderr":
                lines = "".join(out["text"]).split("\n")
                bars = [l for l in lines if l.strip("\r") and all(_BAR.match(s) for s in l.split("\r") if s)]
                removed += len(bars)
                text = "\n".join(l for l in lines if l not in bars)
                if not text.strip():
                    continue
                out["text"] = text.splitlines(keepends=True)
            kept.append(out)
        if "outputs" in cell:
            cell["outputs"] = kept
    if removed:
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return removed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--flags", default="", help="flags to force, e.g. 'slow' or 'slow gpu'")
    ap.add_argument("--save", action="store_true", help="write outputs back into the notebook on success")
    ap.add_argument("--quiet", action="store_true", help="do not echo cell output to the console")
    ap.add_argument("--cell-timeout", type=int, default=600, help="seconds a cell may run (default 600)")
    ap.add_argument("--strip-bars", action="store_true", help="only remove library progress bars from saved output")
    a = ap.parse_args(argv)
    if a.strip_bars:
        for nb in a.notebooks:
            print(f"{nb}: {strip_progress_bars(nb)} progress-bar lines removed", file=sys.stderr)
        return 0
    if a.save:
        os.environ.update({k: "1" for k in LIBRARY_BARS})
    tee_cell_output(echo=not a.quiet)
    cfg = get_config()
    forced = a.flags.split()
    failed = 0
    for nb in a.notebooks:
        ok, secs = nbtest.test_nb(nb.resolve(), skip_flags=[f for f in cfg.tst_flags.split() if f not in forced],
                                  force_flags=forced, basepath=cfg.config_path, verbose=False, save=a.save,
                                  cell_timeout=a.cell_timeout)
        if ok and a.save:
            strip_progress_bars(nb)
        print(f"{nb}: {'ok' if ok else 'FAILED'} in {secs:.0f}s", file=sys.stderr)
        failed += not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
