"""Process memory for the benchmarks that measure it (`packing.py`, `gemma3_memory.py`): a field of
/proc/self/status, in KiB (Linux)."""
from pathlib import Path


def rss_kib(field: str) -> int:
    "`VmRSS` (now) or `VmHWM` (the peak since the process started, or since `/proc/self/clear_refs` was set to 5)."
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")
