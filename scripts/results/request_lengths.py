#!/usr/bin/env python3
"""How many requests of the Done-when's four tasks a window model reads past its window.

A request is read as its context and continuation tokenized together (as `supra eval` does),
minus the last token, which predicts nothing. A window of W tokens beside S sinks sees every
token of a request no longer than W + S, so its linear state is read only by the longer ones.
Prints, per task, the requests, their median and longest length, and how many are longer than
W + S. The requests' text mirrors src/eval/tasks.rs (change both together). Needs the
`tokenizers` package (scripts/test's virtual environment has it).

    python3 scripts/results/request_lengths.py TOKENIZER_JSON WINDOW_PLUS_SINKS [DATA_DIR]
"""
import gzip
import json
import statistics
import sys
from pathlib import Path

from tokenizers import Tokenizer


def hellaswag(data):
    with gzip.open(data / "eval/hellaswag/hellaswag_val.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            yield from ((r["query"], " " + e) for e in r["endings"])


def piqa(data):
    for line in (data / "eval/piqa/valid.jsonl").read_text().splitlines():
        r = json.loads(line)
        context = f"Question: {r['goal']}\nAnswer:"
        yield from ((context, " " + r[s]) for s in ("sol1", "sol2"))


def arc_easy(data):
    for line in (data / "eval/arc_easy/ARC-Easy-Test.jsonl").read_text().splitlines():
        q = json.loads(line)["question"]
        context = f"Question: {q['stem']}\nAnswer:"
        yield from ((context, " " + c["text"]) for c in q["choices"])


def lambada(data):
    for line in (data / "eval/lambada_openai/lambada_openai.jsonl").read_text().splitlines():
        r = json.loads(line)
        yield r["context"], " " + r["continuation"]


def main(tokenizer, seen, data):
    tok = Tokenizer.from_file(tokenizer)
    print(f"| task | requests | median | longest | longer than {seen} |")
    print("|---|---:|---:|---:|---:|")
    for name, task in [("hellaswag", hellaswag), ("piqa", piqa), ("arc_easy", arc_easy),
                       ("lambada_openai", lambada)]:
        lens = []
        for context, continuation in task(data):
            whole = tok.encode(context + continuation, add_special_tokens=False)
            lens.append(len(whole.ids) - 1)
        over = sum(n > seen for n in lens)
        print(f"| {name} | {len(lens):,} | {statistics.median(lens):g} | {max(lens)} | "
              f"{over} ({over / len(lens):.2%}) |")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    data = Path(sys.argv[3] if len(sys.argv) == 4 else "../shared/data")
    main(sys.argv[1], int(sys.argv[2]), data)
