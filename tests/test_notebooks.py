"""Every notebook is a test: its cells run top to bottom (nbdev's runner), skipping cells flagged
`#| slow` or `#| gpu` unless those flags are listed in COMPEFFDIST_NB_FLAGS (e.g. "slow")."""
import os
from pathlib import Path

import pytest
import nbdev.test as nbtest  # the module, not test_nb itself (pytest would collect it)
from nbdev.config import get_config

CFG = get_config()
NBS = sorted(p for p in Path(CFG.nbs_path).glob("[0-9]*.ipynb"))
FORCED = set(os.environ.get("COMPEFFDIST_NB_FLAGS", "").split())


@pytest.mark.parametrize("nb", NBS, ids=[p.stem for p in NBS])
def test_notebook(nb, monkeypatch):
    monkeypatch.chdir(nb.parent)
    skip = [f for f in CFG.tst_flags.split() if f not in FORCED]
    ok, secs = nbtest.test_nb(nb, skip_flags=skip, force_flags=sorted(FORCED), basepath=CFG.config_path)
    assert ok, f"{nb.name} failed (see the output above)"
