#!/usr/bin/env python3
"""The long runs' long-context probes beside the teacher's (docs/results/quality.md).

The teacher's come from docs/results/eval/{position,passkey,needle}.json (scripts/results/
probes.sh), each row's from runs/quality/ROW/long-{position,passkey,needle}.json
(`scripts/results/quality.sh longprobes ROW`), the same settings and prompts; a ROW with a
slash is the prefix of reports copied into the docs (docs/results/eval/long_w256cache reads
long_w256cache_{position,passkey,needle}.json). ROW:window reads the position probe with the
linear branch off (long-position-window.json, PREFIX_position_window.json) and has no passkey
or needle column. Prints markdown: perplexity by position in spans of the 32k-token windows
(each span's perplexity is the geometric mean of its 1k buckets, which hold equally many
tokens), then passkey and needle accuracy by length, over the five depths.

    python3 scripts/results/long_probes_table.py ROW[:window]...
"""
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEACHER = ROOT / "docs/results/eval"
RUNS = ROOT / "runs/quality"
SPANS = [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32)]  # in k tokens


def load(path, model=None):
    report = json.loads(path.read_text())
    results = report["results"]
    if model is not None:
        results = [r for r in results if r["model"] == model]
    if len(results) != 1:
        sys.exit(f"{path}: expected one result{f' for {model}' if model else ''}")
    return results[0]


def spans(result):
    # Reports before the --edges option hold "bucket" and "buckets", later ones "rows".
    buckets = result["rows"] if "rows" in result else result["buckets"]
    starts = [b["start"] for b in buckets]
    if starts != list(range(0, 1024 * len(starts), 1024)):
        sys.exit(f"{result['model']}: expected 1k buckets from position 0")
    by_start = {b["start"]: b["perplexity"] for b in buckets}
    out = []
    for lo, hi in SPANS:
        ppls = [by_start[s] for s in range(lo * 1024, hi * 1024, 1024) if s in by_start]
        if len(ppls) != hi - lo:
            out.append(None)
        else:
            out.append(math.exp(sum(map(math.log, ppls)) / len(ppls)))
    return out


def by_length(result):
    acc = {}
    for c in result["cells"]:
        ok, n = acc.get(c["length"], (0, 0))
        acc[c["length"]] = (ok + c["correct"], n + c["trials"])
    return acc


def report(row, probe):
    """A row's report of `probe` (position, position_window, passkey or needle)."""
    if "/" in row:
        return ROOT / f"{row}_{probe}.json"
    return RUNS / row / f"long-{probe.replace('_', '-')}.json"


def main(rows):
    names = ["teacher"] + rows
    pos = [spans(load(TEACHER / "position.json", "teacher"))]
    for r in rows:
        row, _, branch = r.partition(":")
        if branch not in ("", "window"):
            sys.exit(f"{r}: the only branch suffix is :window")
        pos.append(spans(load(report(row, "position_window" if branch else "position"))))
    print("Perplexity by position (4 windows of 32k tokens of text/longctx, whole history):\n")
    print("| positions | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for i, (lo, hi) in enumerate(SPANS):
        cells = []
        for p in pos:
            v = p[i]
            cells.append("—" if v is None else f"{v:,.2f}")
        print(f"| {lo}k-{hi}k | " + " | ".join(cells) + " |")
    both = [r for r in rows if ":" not in r]
    for probe in ["passkey", "needle"]:
        accs = [by_length(load(TEACHER / f"{probe}.json", "teacher"))]
        accs += [by_length(load(report(r, probe))) for r in both]
        print(f"\n{probe} (found of 5 depths, one trial each):\n")
        print("| length | " + " | ".join(["teacher"] + both) + " |")
        print("|---:|" + "---:|" * (1 + len(both)))
        for length in sorted(accs[0]):
            cells = []
            for a in accs:
                ok, n = a.get(length, (0, 0))
                cells.append(f"{ok}/{n}" if n else "—")
            print(f"| {length // 1024}k | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
