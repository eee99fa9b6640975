"""Run one notebook top to bottom the way the tests do, optionally forcing flagged cells and saving outputs.

    python tools/run_nb.py nbs/10_attributes.ipynb                 # as the test suite runs it
    python tools/run_nb.py nbs/10_attributes.ipynb --save          # and write the outputs (plots, tables) back
    python tools/run_nb.py nbs/10_attributes.ipynb --flags slow --save
"""
import argparse
import sys
from pathlib import Path

import nbdev.test as nbtest
from nbdev.config import get_config

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("notebooks", nargs="+", type=Path)
ap.add_argument("--flags", default="", help="flags to force, e.g. 'slow' or 'slow gpu'")
ap.add_argument("--save", action="store_true", help="write outputs back into the notebook on success")
ap.add_argument("--quiet", action="store_true", help="do not stream cell output (implied by --save: execnb keeps "
                "no printed output of a cell it streams)")
a = ap.parse_args()
cfg = get_config()
forced = a.flags.split()
failed = 0
for nb in a.notebooks:
    ok, secs = nbtest.test_nb(nb.resolve(), skip_flags=[f for f in cfg.tst_flags.split() if f not in forced],
                              force_flags=forced, basepath=cfg.config_path, verbose=not (a.quiet or a.save), save=a.save)
    print(f"{nb}: {'ok' if ok else 'FAILED'} in {secs:.0f}s", file=sys.stderr)
    failed += not ok
sys.exit(1 if failed else 0)
