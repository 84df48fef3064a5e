#!/usr/bin/env python3
"""The table of docs/results/quality.md from what scripts/results/quality.sh wrote.

    python3 scripts/results/quality_table.py [OUT=runs/quality]

One row per directory under OUT, in quality.sh's order (the teacher, the window-only control, the
fixed-budget grid recipe × cell × window, the paper's preset, then the pure linear cell's
one-change rows); a figure not measured yet is "…". The long runs have tables of their own in
quality.md.
Held-out perplexity is over text/test (5 books × their first 8,192 tokens, 512-token windows);
positions are perplexity by position with the whole history (5 books × 8k tokens); wall time
is training only (summed over resumed invocations); tokens/s is the median of the run's
updates.
"""
import json, os, statistics, sys

OUT = sys.argv[1] if len(sys.argv) > 1 else "runs/quality"
ORDER = ["teacher", "control-w64", "control-w256", "td-relu-w64", "td-hedgehog-w64", "tce-relu-w64",
         "tce-hedgehog-w64", "td-relu", "td-hedgehog", "tce-relu", "tce-hedgehog", "supra-relu",
         "supra-hedgehog", "supra-relu-w64", "supra-hedgehog-w64", "supra-paper-relu",
         "td-relu-all", "td-relu-all-raw", "td-relu-all-fd128", "td-relu-all-learn",
         "td-relu-all-ident", "td-relu-all-tlr1e2", "td-relu-all-tt65k"]
# The pure linear cell's one-change rows: transfer+distill relu with these changes.
CHANGES = {"all": "every parameter", "all-raw": "every parameter, raw transfer target",
           "all-fd128": "every parameter, feature dim 128",
           "all-learn": "every parameter, learned decay",
           "all-ident": "every parameter, φ starting at the identity",
           "all-tlr1e2": "every parameter, transfer lr 1e-2",
           "all-tt65k": "every parameter, a quarter of the tokens in transfer"}
RECIPE = {"td": "transfer+distill", "tce": "transfer+finetune", "supra": "supra (all, CE)",
          "supra-paper": "supra-paper (all, CE)"}


def load(row, name):
    p = os.path.join(OUT, row, name)
    return json.load(open(p)) if os.path.exists(p) else None


def fmt(x, spec=".2f"):
    return "…" if x is None else format(x, spec)


def describe(row):
    if row == "teacher":
        return "teacher (softmax)", "—", "—"
    if row.startswith("control-w"):
        return "window + 4 sinks only (untrained)", "—", row[len("control-w"):]
    if row.startswith("td-relu-all"):
        return f"transfer+distill, {CHANGES[row[len('td-relu-'):]]}", "SUPRA relu", "none"
    window = "64" if row.endswith("-w64") else "none"
    base = row[: -len("-w64")] if row.endswith("-w64") else row
    recipe, cell = base.rsplit("-", 1)
    return RECIPE[recipe], {"relu": "SUPRA relu", "hedgehog": "Hedgehog"}[cell], window


def task(report, name, metric):
    if report is None:
        return None
    for r in report["results"]:
        if r["task"] == name:
            return r["metrics"][metric]["value"]
    return None


def passkey(row, length):
    d = load(row, "passkey.json")
    if d is None:
        return None
    cells = [c for c in d["results"][0]["cells"] if c["length"] == length]
    return 100 * sum(c["correct"] for c in cells) / sum(c["trials"] for c in cells)


def main():
    rows = [r for r in ORDER if os.path.isdir(os.path.join(OUT, r))]
    teacher = load("teacher", "heldout-both.json")
    t_ppl = teacher["ppl"] if teacher else None
    t_pos = load("teacher", "position.json")
    print("| recipe | cell | window | held-out ppl | × teacher | ppl 1k-2k (×) | ppl 2k-8k (×) "
          "| LAMBADA acc / ppl | piqa acc | arc_easy acc | hellaswag acc_norm (1k) "
          "| passkey 1k / 2k (%) | window-only / linear-only ppl | valid ppl | train wall | tokens/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        recipe, cell, window = describe(row)
        branch = "window" if row.startswith("control") else "both"
        h = load(row, f"heldout-{branch}.json")
        ppl = h["ppl"] if h else None
        ratio = ppl / t_ppl if ppl and t_ppl else None
        pos = load(row, "position.json")

        def at(start):
            if pos is None:
                return "…"
            p = {r["start"]: r["perplexity"] for r in pos["results"][0]["rows"]}[start]
            if t_pos is None:
                return f"{p:.2f}"
            t = {r["start"]: r["perplexity"] for r in t_pos["results"][0]["rows"]}[start]
            return f"{p:.2f} ({p / t:.2f})"

        tasks, hs = load(row, "tasks.json"), load(row, "hellaswag.json")
        lam = task(tasks, "lambada_openai", "acc")
        lam_ppl = task(tasks, "lambada_openai", "perplexity")
        trained = row != "teacher" and not row.startswith("control")
        branches = "—"
        if window == "64" and trained:
            w, l = load(row, "heldout-window.json"), load(row, "heldout-linear.json")
            branches = f"{fmt(w and w['ppl'])} / {fmt(l and l['ppl'], '.4g')}"
        v = load(row, f"valid-{branch}.json")
        wall = None
        if os.path.exists(os.path.join(OUT, row, "wall_s")):
            wall = int(open(os.path.join(OUT, row, "wall_s")).read())
        metrics = os.path.join(OUT, row, "run", "metrics.jsonl")
        tps = None
        if os.path.exists(metrics):
            rates = [json.loads(l)["tokens_per_s"] for l in open(metrics)]
            tps = statistics.median(rates) if rates else None
        pct = lambda x: fmt(x and 100 * x, ".1f")
        wall_s = ("…" if wall is None else f"{wall // 60} min") if trained else "—"
        tps_s = fmt(tps, ".0f") if trained else "—"
        print(f"| {recipe} | {cell} | {window} | {fmt(ppl)} | {fmt(ratio, '.3f')} | {at(1024)} | "
              f"{at(2048)} | {pct(lam)} / {fmt(lam_ppl, '.1f')} | "
              f"{pct(task(tasks, 'piqa', 'acc'))} | {pct(task(tasks, 'arc_easy', 'acc'))} | "
              f"{pct(task(hs, 'hellaswag', 'acc_norm'))} | {fmt(passkey(row, 1024), '.0f')} / "
              f"{fmt(passkey(row, 2048), '.0f')} | {branches} | {fmt(v and v['ppl'])} | "
              f"{wall_s} | {tps_s} |")


if __name__ == "__main__":
    main()
