#!/usr/bin/env python3
"""Where the teacher's long context pays, and how much of it a trained window hybrid wins back.

Scores the first ~2,000 tokens of each text/valid book (choices are made on text/valid, never
on the held-out books) under the teacher, the untrained window control (`--branches window`),
and a trained hybrid with both branches and with its linear branch off, one token at a time
(`supra score --json`), then takes the tokens at positions 1,000-2,000: the gap is the
control's per-token NLL minus the teacher's, and the table says what share of the whole gap
the tokens with the largest gaps carry, and how much of it the hybrid and its state alone
(branch off minus both) win back there, and how many of those tokens a long-range copy could
predict: the next token occurs earlier in the book but not in the control's window, or
completes a pair of tokens seen before them.

    scripts/results/context_gap.py CONTROL_MODEL HYBRID_MODEL [--window 128] [--supra BIN]
                                   [--data-dir D]

Writes nothing but its own scratch directory (removed at the end); prints a markdown table.
"""

import argparse
import json
import math
import os
import subprocess
import tempfile

BOOK_CHARS = 9500  # about 2,000 tokens of these books
FIRST, LAST = 1000, 2000


def nll(supra, model, text, branches=None):
    """Per-token NLL (prediction i is of token i + 1) and the token ids."""
    cmd = [supra, "score"] + ([model] if model else []) + ["--text", text, "--json"]
    if branches:
        cmd += ["--branches", branches]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return [-x for x in out["logprobs"]], out["token_ids"]


def copies(ids, i, window):
    """Whether token i + 1 occurs before the window of query i and not in it, and whether
    (token i, token i + 1) occurs as a pair before that window."""
    start = max(0, i + 1 - window)
    before, inside = ids[:start], ids[start : i + 1]
    nxt = ids[i + 1]
    pair = any(before[j] == ids[i] and ids[j + 1] == nxt for j in range(len(before)))
    return nxt in before and nxt not in inside, pair


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("control")
    ap.add_argument("hybrid")
    ap.add_argument("--window", type=int, default=128, help="the control's window")
    ap.add_argument("--supra", default="target/release/supra")
    ap.add_argument(
        "--data-dir",
        default=os.environ.get("SUPRA_DATA_DIR", "../shared/data"),
    )
    a = ap.parse_args()
    valid = os.path.join(a.data_dir, "text/valid")
    t, c, h, o, cp = [], [], [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        for name in sorted(os.listdir(valid)):
            text = os.path.join(scratch, name)
            with open(os.path.join(valid, name), encoding="utf-8") as f:
                head = f.read(BOOK_CHARS)
            with open(text, "w", encoding="utf-8") as f:
                f.write(head)
            runs = [
                nll(a.supra, None, text),
                nll(a.supra, a.control, text, "window"),
                nll(a.supra, a.hybrid, text),
                nll(a.supra, a.hybrid, text, "window"),
            ]
            ids = runs[0][1]
            n = min(len(r) for r, _ in runs)
            for dst, (r, _) in zip((t, c, h, o), runs):
                dst.extend(r[FIRST : min(n, LAST)])
            cp.extend(copies(ids, i, a.window) for i in range(FIRST, min(n, LAST)))
    n = len(t)
    gap = [ci - ti for ci, ti in zip(c, t)]
    whole = sum(gap)
    ppl = [math.exp(sum(x) / n) for x in (t, c, h, o)]
    print(
        f"{n} tokens at positions {FIRST}-{LAST} of {valid}; perplexity teacher "
        f"{ppl[0]:.2f}, control {ppl[1]:.2f}, hybrid {ppl[2]:.2f}, hybrid with its "
        f"linear branch off {ppl[3]:.2f}; the gap {whole:.1f} nats\n"
    )
    print(
        "| tokens (largest gap first) | share of the gap | hybrid wins back | its state alone "
        "| next token only before the window | pair seen before the window |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    order = sorted(range(n), key=lambda i: -gap[i])
    for frac in (0.01, 0.05, 0.10, 1.0):
        top = order[: max(1, int(n * frac))]
        g = sum(gap[i] for i in top)
        won = sum(c[i] - h[i] for i in top)
        state = sum(o[i] - h[i] for i in top)
        only = sum(cp[i][0] for i in top) / len(top)
        pair = sum(cp[i][1] for i in top) / len(top)
        print(
            f"| {'all' if frac == 1.0 else f'top {frac:.0%}'} | {g / whole:.0%} | "
            f"{won / g:.1%} | {state / g:.1%} | {only:.0%} | {pair:.0%} |"
        )


if __name__ == "__main__":
    main()
