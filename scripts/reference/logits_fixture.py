#!/usr/bin/env python3
"""Golden logits for the default model, from transformers (the reference implementation).

Loads the same GGUF that supra loads (transformers dequantizes it to f32), runs a handful of
prompts and writes, per prompt: the token ids, the top-5 logits at every position and the
log-probability of each next token. tests/reference_logits.rs compares supra against it.

Tokenization: the token ids are those of SmolLM2's own tokenizer.json pipeline (Digits, then
ByteLevel without a prefix space), built here from the GGUF vocabulary; the fixture also records
whether transformers' GGUF tokenizer produced the same ids (it did, transformers 5.x).

Usage (torch from PyPI is a ~5 GB install; this is a one-off, not part of CI):
  python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch transformers gguf accelerate
  /tmp/refenv/bin/python scripts/reference/logits_fixture.py \
      --gguf ~/.cache/supra/models/SmolLM2-135M-Instruct.Q4_1.gguf \
      --out tests/fixtures/smollm2_logits.json
"""
import argparse, json, os

import torch
from gguf import GGUFReader
from tokenizers import Tokenizer, AddedToken, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = {
    "english": "The old lighthouse keeper climbed the spiral stairs every evening, lantern in hand, "
    "counting the steps as his father had taught him. There were one hundred and twelve of them, "
    "worn smooth in the middle by a century of boots.",
    "chat": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nGive me three tips for staying focused while studying."
    "<|im_end|>\n<|im_start|>assistant\nHere are three tips:\n1. Remove distractions",
    "code": "def fibonacci(n: int) -> list[int]:\n    \"\"\"Return the first n Fibonacci numbers.\"\"\"\n"
    "    seq = [0, 1]\n    while len(seq) < n:\n        seq.append(seq[-1] + seq[-2])\n"
    "    return seq[:n]\n\n\nif __name__ == \"__main__\":\n    for i, x in enumerate(fibonacci(12)):\n"
    "        print(f\"{i:>3}: {x}\")\n",
    "non_english": "La Révolution française commence en 1789 et transforme profondément la société. "
    "Der schnelle braune Fuchs springt über den faulen Hund. 東京は日本の首都です。"
    "Москва — столица России.",
    "long_numbers": " ".join(
        f"In {1900 + 7 * i}, the town recorded {3 * i * i + 11} births and {i * 13 % 97} storms;"
        for i in range(14)
    ),
}


def field(reader, key):
    return reader.fields[key].contents()


def smollm_tokenizer(gguf_path):
    r = GGUFReader(gguf_path)
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field(r, "tokenizer.ggml.merges")]
    assert field(r, "tokenizer.ggml.pre") == "smollm"
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(tokens, types) if ty == 3])
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    d, f = os.path.split(os.path.abspath(args.gguf))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok = smollm_tokenizer(args.gguf)
    out = {"model": f, "source": "transformers " + __import__("transformers").__version__
           + ", torch " + torch.__version__, "prompts": []}
    for name, text in PROMPTS.items():
        ids = tok.encode(text).ids
        hf_ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        top = torch.topk(logits, 5, dim=-1)
        lsm = torch.log_softmax(logits.double(), dim=-1)
        next_lp = lsm[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        out["prompts"].append({
            "name": name,
            "text": text,
            "token_ids": ids,
            "transformers_gguf_tokenizer_agrees": hf_ids == ids,
            "top5_ids": top.indices.tolist(),
            "top5_logits": [[round(x, 6) for x in row] for row in top.values.tolist()],
            "next_token_logprobs": [round(x, 6) for x in next_lp.tolist()],
        })
        print(f"{name}: {len(ids)} tokens, transformers GGUF tokenizer agrees: {hf_ids == ids}")
    with open(args.out, "w") as fh:
        json.dump(out, fh, ensure_ascii=False)
        fh.write("\n")


if __name__ == "__main__":
    main()
