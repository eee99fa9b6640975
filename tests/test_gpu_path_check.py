"""`benchmarks/gpu_check.py` end to end on CPU with its tiny model: every figure is printed, one line each, and the
float32 scores agree with the reference loop. (The figures themselves are a GPU's to give.)"""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_tiny():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {l.split(None, 1)[0] if not l.startswith(("difficulty", "agreement")) else " ".join(l.split()[:2]): l
             for l in proc.stdout.splitlines() if l.strip()}
    assert set(lines) == {"device", "model", "generation", "difficulty bf16", "agreement bf16", "difficulty float32",
                          "agreement float32", "training", "total"}, proc.stdout
    assert len(proc.stdout.splitlines()) == 9  # one line per figure, nothing else on stdout
    for name in ("difficulty bf16", "difficulty float32"):
        assert re.search(r"speed-up [\d.]+x", lines[name]), lines[name]
    fp32 = float(re.search(r"max \|score - reference\| ([\d.e+-]+)", lines["agreement float32"]).group(1))
    assert fp32 <= 1e-5, lines["agreement float32"]
    assert re.search(r"[\d,]+ tokens/s", lines["training"]) and re.search(r"[\d,]+ tokens/s", lines["generation"])
