"""`benchmarks/gpu_check.py` on CPU: it refuses clearly without a GPU, names what it lacks, and with its tiny model
prints every figure (one line each, its target beside it) and exits 1 when a judged figure misses its target.
(The figures themselves are a GPU's to give.)"""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", CHECK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_refuses_without_a_gpu():
    proc = subprocess.run([sys.executable, str(CHECK)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "no GPU visible to torch" in proc.stderr and "nothing was checked" in proc.stderr


def test_gpu_check_names_the_wheels_it_lacks(tmp_path):
    gc = _module()
    assert gc.missing_wheels() == []  # this environment has the exact versions
    gc.WHEELS = tmp_path / "wheels.txt"
    gc.WHEELS.write_text("# pins\ntrl==0.9.0\nno-such-package==1.0\n")
    assert gc.missing_wheels() == ["trl: found 1.16.0, needs ==0.9.0", "no-such-package: not installed, needs ==1.0"]
    wheels = [l for l in (ROOT / "benchmarks" / "gpu_wheels.txt").read_text().splitlines() if l and l[0] != "#"]
    constraints = set((ROOT / "constraints.txt").read_text().splitlines())
    assert wheels and all(w in constraints for w in wheels)  # exact versions, the tested ones


def test_gpu_check_on_cpu_tiny_fails_a_missed_target():
    "Speed judged on CPU too, against an impossible speed-up: those two figures fail, the others pass, exit 1."
    proc = subprocess.run([sys.executable, str(CHECK), "--device", "cpu", "--tiny", "--judge-speed",
                           "--target", "speedup=1e9", "--target", "overhead=1e9", "--target", "batching=0"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = {" ".join(l.split()[:2]) if l.startswith(("difficulty", "agreement", "speed-up")) else l.split()[0]: l
             for l in proc.stdout.splitlines() if l.strip()}
    assert set(lines) == {"device", "model", "generation", "difficulty bf16", "speed-up bf16", "agreement bf16",
                          "difficulty float32", "speed-up float32", "agreement float32", "training", "total"}, proc.stdout
    assert len(proc.stdout.splitlines()) == 11  # one line per figure, nothing else on stdout
    verdict = {k: v.rsplit(None, 1)[-1] for k, v in lines.items() if v.endswith(("PASS", "FAIL"))}
    assert verdict == {"generation": "PASS", "difficulty float32": "PASS", "difficulty bf16": "PASS",
                       "speed-up float32": "FAIL", "speed-up bf16": "FAIL", "agreement float32": "PASS",
                       "agreement bf16": "PASS", "training": "PASS"}, proc.stdout
    assert "[target >= 1e+09x]" in lines["speed-up float32"]
    fp32 = float(re.search(r"max \|score - reference\| ([\d.e+-]+)", lines["agreement float32"]).group(1))
    assert fp32 <= 1e-5 and "[target <= 1.0e-05" in lines["agreement float32"]  # float32 on a CPU: no TF32
    assert "6 of 8 judged figures met their targets" in lines["total"]
