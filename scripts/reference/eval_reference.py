#!/usr/bin/env python3
"""Reference for `supra eval`: the same GGUF teacher, run by transformers (PyTorch), on the same
task files, with the prompts written out again here from lm-evaluation-harness's task
definitions (not from supra's code). Writes per-item predictions and aggregates as JSON; with
--compare, checks a `supra eval --json` report item by item.

    pip install torch transformers gguf accelerate
    target/release/supra eval MODEL.gguf --tasks hellaswag,piqa,... --limit 200 --json rust.json
    python3 scripts/reference/eval_reference.py MODEL.gguf --limit 200 --json ref.json --compare rust.json

--limit is per task, and per subject for MMLU (like lm-eval's and supra's).
"""
import argparse
import csv
import gzip
import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TASKS = ["hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "lambada_openai", "mmlu"]


def jsonl(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def items(task, data, limit):
    """[(requests [(context, continuation)], gold, choice lengths, group)]; lambada: gold None."""
    e = os.path.join(data, "eval")
    out = []
    if task == "hellaswag":
        for d in jsonl(os.path.join(e, "hellaswag/hellaswag_val.jsonl.gz"))[:limit]:
            out.append(([(d["query"], " " + c) for c in d["endings"]], d["label"], [len(c) for c in d["endings"]], None))
    elif task == "piqa":
        rows = jsonl(os.path.join(e, "piqa/valid.jsonl"))
        labels = [int(x) for x in open(os.path.join(e, "piqa/valid-labels.lst")).read().split()]
        for d, y in list(zip(rows, labels))[:limit]:
            ctx = f"Question: {d['goal']}\nAnswer:"
            sols = [d["sol1"], d["sol2"]]
            out.append(([(ctx, " " + s) for s in sols], y, [len(s) for s in sols], None))
    elif task == "winogrande":
        for d in jsonl(os.path.join(e, "winogrande/winogrande.jsonl"))[:limit]:
            # Partial scoring: the shared continuation after each filled-in option.
            out.append(([(c, " " + d["continuation"]) for c in d["context_options"]], d["gold"],
                        [len(c) for c in d["context_options"]], None))
    elif task in ("arc_easy", "arc_challenge"):
        name = "ARC-Easy" if task == "arc_easy" else "ARC-Challenge"
        for d in jsonl(os.path.join(e, f"{task}/{name}-Test.jsonl"))[:limit]:
            q = d["question"]
            texts = [c["text"] for c in q["choices"]]
            gold = [c["label"] for c in q["choices"]].index(d["answerKey"])
            out.append(([(f"Question: {q['stem']}\nAnswer:", " " + t) for t in texts], gold, [len(t) for t in texts], None))
    elif task == "lambada_openai":
        for d in jsonl(os.path.join(e, "lambada_openai/lambada_openai.jsonl"))[:limit]:
            out.append(([(d["context"], " " + d["continuation"])], None, None, None))
    elif task == "mmlu":
        root = os.path.join(e, "mmlu/data")
        subjects = sorted(f[: -len("_test.csv")] for f in os.listdir(os.path.join(root, "test")) if f.endswith("_test.csv"))

        def fmt(r):
            return f"{r[0].strip()}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\nD. {r[4]}\nAnswer:"

        for s in subjects:
            dev = list(csv.reader(open(os.path.join(root, "dev", f"{s}_dev.csv"), encoding="utf-8")))
            test = list(csv.reader(open(os.path.join(root, "test", f"{s}_test.csv"), encoding="utf-8")))
            header = f"The following are multiple choice questions (with answers) about {s.replace('_', ' ')}.\n\n"
            header += "".join(f"{fmt(r)} {r[5].strip()}\n\n" for r in dev[:5])
            for r in test[:limit]:
                out.append(([(header + fmt(r), " " + l) for l in "ABCD"], "ABCD".index(r[5].strip()), [1] * 4, s))
    else:
        raise SystemExit(f"unknown task {task}")
    return out


class Scorer:
    def __init__(self, gguf):
        d, f = os.path.split(os.path.abspath(gguf))
        self.tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        self.model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
        self.cache = {}

    def encode_pair(self, ctx, cont):
        # lm-eval's _encode_pair: trailing context whitespace moves to the continuation.
        n = len(ctx) - len(ctx.rstrip())
        if n:
            cont, ctx = ctx[-n:] + cont, ctx[:-n]
        whole = self.tok.encode(ctx + cont, add_special_tokens=False)
        c = self.tok.encode(ctx, add_special_tokens=False)
        return c, whole[len(c):]

    @torch.no_grad()
    def loglikelihood(self, ctx, cont):
        c, t = self.encode_pair(ctx, cont)
        ids = c + t
        key = tuple(ids[:-1])
        if key not in self.cache:
            logits = self.model(torch.tensor([ids[:-1]])).logits[0]
            self.cache = {key: torch.log_softmax(logits.float(), -1)}
        lsm = self.cache[key][len(c) - 1:]
        tgt = torch.tensor(t)
        lp = lsm.gather(1, tgt[:, None]).sum().item()
        greedy = bool((lsm.argmax(-1) == tgt).all())
        return lp, greedy


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--data-dir", default=os.environ.get("SUPRA_DATA_DIR", "../shared/data"))
    ap.add_argument("--json", required=True)
    ap.add_argument("--compare", help="a `supra eval --json` report of the same tasks and --limit")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    s = Scorer(a.model)
    results = {}
    for task in a.tasks.split(","):
        t0 = time.time()
        preds, accs, norms, hits = [], [], [], []
        for reqs, gold, lens, _ in items(task, a.data_dir, a.limit):
            lls = [s.loglikelihood(c, x) for c, x in reqs]
            if gold is None:
                hits.append(lls[0][1])
                preds.append(int(lls[0][1]))
                continue
            lp = [l for l, _ in lls]
            pred = max(range(len(lp)), key=lambda i: (lp[i], -i))
            norm = max(range(len(lp)), key=lambda i: (lp[i] / lens[i], -i))
            preds.append(pred)
            accs.append(pred == gold)
            norms.append(norm == gold)
        r = {"items": len(preds), "predictions": preds, "seconds": time.time() - t0}
        if hits:
            r["acc"] = sum(hits) / len(hits)
        else:
            r["acc"] = sum(accs) / len(accs)
            if task not in ("mmlu", "winogrande"):
                r["acc_norm"] = sum(norms) / len(norms)
        results[task] = r
        print(f"{task}: {len(preds)} items, acc {100 * r['acc']:.2f} ({r['seconds']:.0f} s)", file=sys.stderr)
    with open(a.json, "w") as f:
        json.dump({"model": a.model, "limit": a.limit, "results": results}, f, indent=1)
    if a.compare:
        rust = {r["task"]: r for r in json.load(open(a.compare))["results"]}
        ok = True
        print("| task | items | same answer (%) | acc transformers | acc supra | Δ (pt) |")
        print("|---|---:|---:|---:|---:|---:|")
        for task, r in results.items():
            if task not in rust or "predictions" not in rust[task]:
                print(f"| {task} | — | not in {a.compare} | | | |")
                ok = False
                continue
            rp = rust[task]["predictions"]
            same = sum(x == y for x, y in zip(r["predictions"], rp)) / max(len(rp), 1)
            racc = rust[task]["metrics"]["acc"]["value"]
            d = 100 * (racc - r["acc"])
            ok &= len(rp) == len(r["predictions"]) and same >= 0.99 and abs(d) <= 0.5
            print(f"| {task} | {len(rp)} | {100 * same:.1f} | {100 * r['acc']:.2f} | {100 * racc:.2f} | {d:+.2f} |")
        print("agreement: " + ("PASS (≥ 99 % same answers, aggregates within ±0.5 pt)" if ok else "FAIL"))
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
