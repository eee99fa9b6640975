"""Lenient JSON reading: `teacher.parse_json_lenient` against the `json_repair` library, on real teacher answers
and on the fuzzed answers of the tests.

    pip install json-repair==0.64.4        # measured with this release (not a dependency of the package)
    python benchmarks/json_reading.py       # results/replication/teacher_calls.jsonl, 400 fuzz cases per property
    python benchmarks/json_reading.py --calls CALLS.jsonl --fuzz 1000

Three readers:
- `ours`: `parse_json_lenient` (the whole answer, fenced blocks, embedded values, truncation repair, Python literals);
- `json_repair`: `json_repair.loads` on the whole answer (a dict or list counts as read);
- `ours+json_repair`: our search, with the library in place of our truncation repair and Python-literal steps.

On every teacher answer of the call log: how many each reads, and against `ours`, how many it reads into the same
value, into another value, or not at all. On the fuzz cases (the strategies of tests/test_attributes.py): how many
cases break each property that `parse_json_lenient` is tested for (wrapped JSON read back exactly; a truncated
list keeps only complete items). Prints; asserts nothing.
"""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "tests"))

import json_repair  # noqa: E402

import compeffdist.teacher as teacher  # noqa: E402


def library(text):
    "json_repair on the whole answer: `(value, how)` as parse_json_lenient returns it."
    if not isinstance(text, str) or not text.strip():
        return None, "empty"
    try:
        v = json_repair.loads(text)
    except Exception:  # the library's own failures count as nothing read
        return None, "no_json"
    return (v, "json_repair") if isinstance(v, (dict, list)) else (None, "no_json")


def hybrid(text, accept=None):
    "parse_json_lenient with json_repair doing the truncation repair and the Python literals."
    saved = teacher._repair_candidates, teacher._literal
    teacher._repair_candidates = lambda s, start: iter([json_repair.repair_json(s[start:])])
    teacher._literal = lambda s: (lambda v: v if isinstance(v, (dict, list)) else None)(library(s)[0])
    try:
        return teacher.parse_json_lenient(text, accept)
    finally:
        teacher._repair_candidates, teacher._literal = saved


READERS = {"ours": teacher.parse_json_lenient, "json_repair": library, "ours+json_repair": hybrid}


def answers(path: Path) -> list[str]:
    out = []
    for line in path.open(encoding="utf-8"):
        r = json.loads(line)
        if "params" in r["request"]:
            out += [g["text"] for g in r["response"]]
    return out


def on_answers(texts):
    ours = [teacher.parse_json_lenient(t) for t in texts]
    print(f"{len(texts)} teacher answers; ours reads {sum(v is not None for v, _ in ours)} "
          f"({dict(Counter(h for v, h in ours if v is not None))})")
    for name, read in READERS.items():
        if name == "ours": continue
        c = Counter()
        for t, (vo, _) in zip(texts, ours):
            v, _ = read(t)
            c["read"] += v is not None
            if vo is None:
                c["read where ours reads nothing"] += v is not None
            else:
                c["same value" if v == vo else "nothing" if v is None else "another value"] += 1
        print(f"  {name:17} reads {c['read']}; of ours': {c['same value']} same, {c['another value']} another value, "
              f"{c['nothing']} nothing; {c['read where ours reads nothing']} read where ours reads nothing")


def on_fuzz(n: int):
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st
    import test_attributes as ta
    cfg = settings(max_examples=n, deadline=None, derandomize=True, phases=[Phase.generate],
                   suppress_health_check=list(HealthCheck))
    for name, read in READERS.items():
        broken = Counter(); seen = Counter()

        @cfg
        @given(ta.containers, ta.prose, ta.prose, st.sampled_from(["plain", "fenced", "prose"]))
        def wrapped(value, before, after, wrap):
            blob = json.dumps(value, ensure_ascii=wrap == "plain", indent=None if wrap != "fenced" else 2)
            text = {"plain": blob, "fenced": f"{before}\n```json\n{blob}\n```\n{after}", "prose": f"{before} {blob} {after}"}[wrap]
            seen["wrapped"] += 1
            broken["wrapped"] += read(text)[0] != value

        @cfg
        @given(st.lists(ta.item, min_size=1, max_size=6), st.data())
        def truncated(items, data):
            blob = json.dumps({"attributes": items}, ensure_ascii=False)
            cut = data.draw(st.integers(1, len(blob) - 1))
            got, _ = read("```json\n" + blob[:cut])
            seen["truncated"] += 1
            if not (isinstance(got, dict) and isinstance(got.get("attributes"), list)):
                return
            kept = got["attributes"]
            ok = len(kept) <= len(items) and all(isinstance(g, dict) for g in kept)
            ok = ok and all(g == items[i] for i, g in enumerate(kept[:-1]))
            if ok and kept:
                ok = all(items[len(kept) - 1].get(k) == v for k, v in kept[-1].items())
            broken["truncated"] += not ok

        @cfg
        @given(st.text(max_size=500))
        def never_raises(text):
            seen["any text"] += 1
            try:
                read(text)
            except Exception:
                broken["any text"] += 1

        for prop in (wrapped, truncated, never_raises):
            prop()
        print(f"  {name:17} fuzz cases broken: " + ", ".join(f"{k} {broken[k]} of {seen[k]}" for k in seen))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", default=str(ROOT / "results" / "replication" / "teacher_calls.jsonl"))
    ap.add_argument("--fuzz", type=int, default=400, help="fuzz cases per property")
    a = ap.parse_args(argv)
    on_answers(answers(Path(a.calls)))
    print(f"fuzz ({a.fuzz} cases per property):")
    on_fuzz(a.fuzz)


if __name__ == "__main__":
    main()
