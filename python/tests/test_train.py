"""Training in PyTorch: torchrun's processes take the step one process takes on the same global
batch, and what PyTorch writes comes back to supra: the same weights, the same log-probs."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import supra_torch.modeling_supra as modeling
from conftest import PROMPTS, score, supra, torch_logprobs
from supra_torch.modeling_supra import SupraForCausalLM

ARGS = ["--updates", "3", "--seq-len", "16", "--batch", "4", "--threads", "1", "--lr", "1e-2"]


def train(tiny, out, recipe, procs, *extra):
    """python -m supra_torch.train on the tiny model, under torchrun (gloo) when procs > 1."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs)] if procs > 1 else [sys.executable]
    cmd = launch + ["-m", "supra_torch.train", str(tiny / "model"), "--data", str(tiny / "data.txt"),
                    "--out", str(out), "--recipe", recipe, *ARGS, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}"
    return load_file(str(out / "final" / "model.safetensors"))


def gap(tiny, one, two):
    """How far two trainings end apart, relative to how far they moved: the norm of their
    difference over the norm of one's change, all parameters as one vector (the difference's
    largest element printed beside it). The norm, not the largest element: Adam divides by √v, so where
    a gradient is near zero the order of its sums (one process, or two all-reduced) moves that
    element by ~1e-3 of the largest change on some machines, while in norm the gap is ~1e-6
    (measured 3e-7 to 2e-6); processes that skip the all-reduce end 0.6 away."""
    start = load_file(str(tiny / "model" / "model.safetensors"))
    assert one.keys() == two.keys() == start.keys()
    norm = lambda d: sum(t.double().pow(2).sum() for t in d.values()).sqrt().item()
    apart = {k: one[k] - two[k] for k in one}
    moved = norm({k: one[k] - start[k] for k in one})
    diff = norm(apart)
    largest = max(t.abs().max().item() for t in apart.values())
    print(f"change {moved:.2e}, difference {diff:.2e} ({diff / moved:.1e} of it; largest element {largest:.2e})")
    assert moved > 1e-2, "3 updates did not move the parameters"
    return diff / moved


@pytest.mark.parametrize("recipe", ["supra", "supra-paper", "transfer", "distill"])
def test_two_processes_take_the_one_process_step(tiny, tmp_path, recipe):
    one = train(tiny, tmp_path / "one", recipe, 1)
    two = train(tiny, tmp_path / "two", recipe, 2)
    assert gap(tiny, one, two) <= 1e-4, f"{recipe}: 2 processes end away from 1"


def test_fsdp_takes_the_one_process_step(tiny, tmp_path):
    """FSDP (FSDP2, parameters sharded over 2 gloo processes) ends where one process ends."""
    one = train(tiny, tmp_path / "one", "supra", 1)
    two = train(tiny, tmp_path / "two", "supra", 2, "--fsdp")
    assert gap(tiny, one, two) <= 1e-4, "FSDP's 2 processes end away from 1"


def test_round_trip_pytorch_supra_pytorch(tiny, tmp_path):
    """Converted by supra, trained 3 updates in PyTorch, loaded by supra: supra scores it as
    PyTorch does; exported by supra and read back: the same weights and logits, bit for bit."""
    trained = tmp_path / "run" / "final"
    weights = train(tiny, tmp_path / "run", "supra", 1)
    assert (trained / "modeling_supra.py").read_text() == open(modeling.__file__).read()
    model = SupraForCausalLM.from_pretrained(trained).double().eval()
    for prompt in PROMPTS[:2]:
        ref = score(trained, prompt["text"], f64=True)
        got = torch_logprobs(model, ref["token_ids"])
        diff = (got - torch.tensor(ref["logprobs"], dtype=torch.float64)).abs().max().item()
        print(f"trained tiny model, {prompt['name']}: max |log-prob diff| against supra {diff:.2e}")
        assert diff <= 1e-4
    supra("export", trained, "--out", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert back.keys() == weights.keys()
    assert all(torch.equal(back[k], weights[k]) for k in back)
    ids = torch.tensor([ref["token_ids"]])
    with torch.no_grad():
        a = SupraForCausalLM.from_pretrained(trained).eval()(ids).logits
        b = SupraForCausalLM.from_pretrained(tmp_path / "back").eval()(ids).logits
    assert torch.equal(a, b)


def test_resume_continues_exactly(tiny, tmp_path):
    """A run stopped after its update-2 checkpoint and resumed ends where the whole run ends."""
    whole = train(tiny, tmp_path / "whole", "distill", 1)
    train(tiny, tmp_path / "cut", "distill", 1, "--save-every", "2")
    assert (tmp_path / "cut" / "checkpoints" / "update-2" / "trainer.pt").exists()
    shutil.rmtree(tmp_path / "cut" / "final")
    resumed = train(tiny, tmp_path / "cut", "distill", 1, "--resume")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.parametrize("flags", [
    ["--feature-map", "hedgehog", "--decay", "retnet"],
    ["--window", "4", "--sinks", "1", "--feature-map", "hedgehog", "--mix", "gated", "--decay", "learnable",
     "--mix-share", "0.5"],
    ["--window", "3", "--sinks", "0", "--decay", "none", "--mix-share", "0.5", "--feature-dim", "6"],
    ["--window", "3", "--sinks", "2", "--sink-positions", "absolute", "--mix-share", "0.5"],
    ["--feature-map", "taylor", "--feature-dim", "10", "--decay", "learnable"],
    ["--window", "4", "--sinks", "1", "--feature-map", "taylor", "--mix-share", "0.01"],
    ["--window", "3", "--sinks", "1", "--mix", "gated", "--linear-rule", "delta", "--mix-share", "0.5"],
    ["--window", "3", "--sinks", "1", "--mix", "value", "--linear-rule", "delta", "--mix-share", "0.5"],
])
def test_every_cell_variant_equals_supra(tiny, tmp_path, flags):
    """The cells and options beyond the default model's tests (Hedgehog, Taylor, the gated mix, learned
    and no decay, no sinks, d' ≠ d, sinks at their absolute positions, the delta rule in the gated and
    the value mix) on the tiny
    model: f64 log-probs equal supra's, chunked (blocks of 4, crossing the window) and recurrent."""
    out = tmp_path / "model"
    supra("convert", tiny / "teacher", "--out", out, "--chunk-size", "4", *flags)
    if "delta" in flags:  # β's weights start at 0: random ones, so that β reads the keys
        path = str(out / "model.safetensors")
        weights = load_file(path)
        gen = torch.Generator().manual_seed(0)
        save_file({k: torch.randn(v.shape, generator=gen) if k.endswith("window_beta") else v
                   for k, v in weights.items()}, path)
    model = SupraForCausalLM.from_pretrained(out).double().eval()
    ref = score(out, PROMPTS[0]["text"], f64=True)
    want = torch.tensor(ref["logprobs"], dtype=torch.float64)
    assert want.std() > 1.0, "the tiny model's log-probs are too flat to tell models apart"
    for kw in ({}, {"form": "recurrent"}):
        diff = (torch_logprobs(model, ref["token_ids"], **kw) - want).abs().max().item()
        print(f"{' '.join(flags)} {kw}: max |log-prob diff| {diff:.2e}")
        assert diff <= 1e-5, f"{flags} {kw}: {diff:.2e}"


def test_a_checkpoint_with_unmerged_adapters_loads(tiny, tmp_path):
    """supra train's checkpoints carry LoRA adapters beside the weights (config `lora`): the
    PyTorch model applies them as supra does (adapters scaled up 100× so that they matter)."""
    supra("train", tiny / "model", "--recipe", "transfer+finetune", "--data", tiny / "data.txt", "--out",
          tmp_path / "run", "--tokens", "512", "--seq-len", "16", "--batch-tokens", "64", "--checkpoint-every", "8")
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000008" / "model"
    weights = load_file(str(ckpt / "model.safetensors"))
    assert any(".lora_B" in k for k in weights)
    save_file({k: v * 100 if ".lora_B" in k else v for k, v in weights.items()}, str(ckpt / "model.safetensors"))
    model = SupraForCausalLM.from_pretrained(ckpt).double().eval()
    ref = score(ckpt, PROMPTS[0]["text"], f64=True)
    diff = (torch_logprobs(model, ref["token_ids"]) - torch.tensor(ref["logprobs"], dtype=torch.float64)).abs().max()
    assert diff <= 1e-5, f"{diff:.2e}"
    model.model.layers[1].self_attn.q_proj.lora_scale = None  # the adapters off: far from supra
    off = (torch_logprobs(model, ref["token_ids"]) - torch.tensor(ref["logprobs"], dtype=torch.float64)).abs().max()
    assert off > 1e-3, f"the adapters change nothing ({off:.2e}): the test cannot tell"


def test_supra_writes_the_package_model(models):
    """Every directory supra writes carries this package's model file and the auto_map to it."""
    for kind in ("teacher", "supra", "hybrid"):
        assert (models / kind / "modeling_supra.py").read_text() == open(modeling.__file__).read()
