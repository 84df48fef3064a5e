"""Shared set-up: the supra binary (SUPRA_BIN, else the release build of this checkout), the
default model exported and converted by it once per session, and a tiny model for training."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from supra_torch.modeling_supra import SupraConfig, SupraForCausalLM
from supra_torch.train import save

ROOT = Path(__file__).resolve().parents[2]
SUPRA = os.environ.get("SUPRA_BIN", str(ROOT / "target" / "release" / "supra"))
PROMPTS = json.load(open(ROOT / "tests" / "fixtures" / "smollm2_logits.json"))["prompts"]

torch.set_num_threads(int(os.environ.get("SUPRA_TEST_THREADS", "2")))


def supra(*args):
    """Runs the supra binary; its stdout, or the test fails with its stderr."""
    r = subprocess.run([SUPRA, *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, f"supra {' '.join(map(str, args))} failed:\n{r.stderr}"
    return r.stdout


def score(model_dir, text, f64=False):
    """supra's per-token log-probs: {token_ids, logprobs}."""
    return json.loads(supra("score", model_dir, "--prompt", text, "--json", *(["--f64", "--mode", "parallel"] if f64 else [])))


def torch_logprobs(model, ids, **kw):
    """log p(ids[i+1] | ids[..=i]) under the PyTorch model, in f64."""
    with torch.no_grad():
        lp = model(torch.tensor([ids]), **kw).logits.double().log_softmax(-1)
    return lp[0, :-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """The default model as supra writes it: the teacher (exported), fully converted to SUPRA,
    and a hybrid keeping softmax in layers 0, 5 and 10."""
    d = tmp_path_factory.mktemp("models")
    supra("export", "--out", d / "teacher")
    supra("convert", "--out", d / "supra")
    supra("convert", "--out", d / "hybrid", "--softmax-layers", "0,5,10")
    return d


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, models):
    """A tiny random teacher (3 layers, hidden 32, GQA, the default model's tokenizer) written
    from PyTorch, converted by supra to one layer of each kind: softmax, SUPRA, window."""
    d = tmp_path_factory.mktemp("tiny")
    cfg = SupraConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10000.0,
                      rms_norm_eps=1e-5, max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    teacher = SupraForCausalLM(cfg)
    with torch.no_grad():  # weights large enough that the next-token distribution is far from flat
        for name, p in teacher.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.5)
    save(teacher, cfg, str(models / "teacher"), str(d / "teacher"))
    supra("convert", d / "teacher", "--out", d / "model", "--softmax-layers", "0", "--supra-layers", "1",
          "--window", "4", "--sinks", "1", "--feature-dim", "8", "--chunk-size", "4", "--mix-share", "0.5")
    text = " ".join(p["text"] for p in PROMPTS) * 4
    (d / "data.txt").write_text(text)
    return d
