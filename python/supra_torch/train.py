"""supra's recipes in PyTorch, on one process or many (torchrun: DDP, or FSDP for big models).

    python -m supra_torch.train MODEL --data TEXT --out OUT --recipe transfer --tokens 1048576
    torchrun --nproc-per-node 8 -m supra_torch.train MODEL --data TEXT --out OUT --recipe distill

MODEL is a directory `supra convert` (or `supra train`, or this script) wrote. Recipes, as
supra's (`supra train --help`):
  transfer  attention transfer: each linear layer's heads regressed (MSE) on the teacher's
            softmax heads (GroupNorm'd for SUPRA layers, raw for window layers), every layer fed
            the teacher's own input; trains φ (and decay / mix logits) only
  supra     the paper's objective at a small budget: next-token cross-entropy, all parameters,
            lr 3e-4 → 3e-5 (`supra-paper`: the paper's lr 3e-5 → 1e-5, 1,000 warmup updates,
            sequence 2,048, z-loss 1e-4)
  distill   KL(teacher ‖ student) over the whole vocabulary at temperature 1 (`--ce-weight w`
            adds w·cross-entropy); the teacher is the model's own starting weights with every
            layer softmax, run without gradients on the same windows
`--train phi` trains only the feature maps (and decay / mix logits), `--train all` everything.

Data: .txt files (or directories of them) tokenized with MODEL/tokenizer.json, joined with EOS
and cut into windows of --seq-len + 1 tokens, shuffled with --seed. Update u reads windows
u·G … u·G + G − 1 of that order (G = --batch, the global batch); rank r of W takes every W-th
of them, so any number of processes takes the same step on the same global batch (gradients
averaged by DDP / FSDP). AdamW (β 0.9, 0.95, weight decay 0.1), gradients clipped at 1.0,
cosine to the preset's final rate after its warmup (5 % of the updates unless said otherwise):
transfer 1e-3 → 1e-4, supra and distill 3e-4 → 3e-5.

OUT/final (and OUT/checkpoints/update-N every --save-every updates, with the optimizer state for
--resume) is a directory supra loads: config.json, model.safetensors, tokenizer.json,
modeling_supra.py. Device: CUDA when there is one (NCCL between processes), else CPU (gloo).
"""
import argparse
import copy
import glob
import json
import math
import os
import random
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

from .modeling_supra import SupraConfig, SupraForCausalLM, group_norm

# The presets of `supra train` (src/train/preset.rs): peak and final learning rate, warmup
# (updates, or a fraction of them), what trains, sequence length, z-loss weight.
PRESETS = {
    "transfer": dict(lr=1e-3, min_lr=1e-4, warmup=0.05, train="phi", seq_len=512, z_loss=0.0),
    "supra": dict(lr=3e-4, min_lr=3e-5, warmup=0.05, train="all", seq_len=512, z_loss=0.0),
    "supra-paper": dict(lr=3e-5, min_lr=1e-5, warmup=1000, train="all", seq_len=2048, z_loss=1e-4),
    "distill": dict(lr=3e-4, min_lr=3e-5, warmup=0.05, train="phi", seq_len=512, z_loss=0.0),
}


def is_phi(name):
    return any(s in name for s in (".phi_", ".decay_logit", ".window_mix"))


def read_windows(model_dir, data, seq_len, seed, eos):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    files = []
    for d in data:
        if not os.path.exists(d):
            sys.exit(f"--data {d}: no such file or directory")
        files += sorted(glob.glob(os.path.join(d, "**", "*.txt"), recursive=True)) if os.path.isdir(d) else [d]
    if not files:
        sys.exit(f"--data {data}: no .txt files")
    ids = []
    for f in files:
        ids += tok.encode(open(f, encoding="utf-8").read()).ids + [eos]
    n = len(ids) // (seq_len + 1)
    if n == 0:
        sys.exit(f"--data: {len(ids)} tokens, fewer than one window of {seq_len + 1}")
    windows = torch.tensor(ids[: n * (seq_len + 1)]).view(n, seq_len + 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return windows[order]


def transfer_loss(model, x):
    """Mean over linear layers of the MSE between each layer's cell and the teacher's heads."""
    m = model.model
    h = m.embed_tokens(x)
    losses = []
    for layer in m.layers:
        attn = layer.self_attn
        xn = layer.input_layernorm(h)
        if attn.kind == "softmax":
            with torch.no_grad():
                h = h + attn(xn, None, 0)
        else:
            teacher, student = attn.transfer_pair(xn)
            target = group_norm(teacher) if attn.kind == "supra" else teacher
            losses.append(F.mse_loss(student, target))
            with torch.no_grad():
                h = h + attn.o_proj(teacher.transpose(1, 2).reshape(h.shape))
        with torch.no_grad():
            h = h + layer.mlp(layer.post_attention_layernorm(h))
    if not losses:
        sys.exit("transfer: this model has no SUPRA or window layer (convert it first)")
    return torch.stack(losses).mean()


def make_teacher(model):
    cfg = copy.deepcopy(model.config)
    cfg.supra, cfg.lora = None, None
    teacher = SupraForCausalLM(cfg)
    teacher.load_state_dict(model.state_dict(), strict=False)
    return teacher.eval().requires_grad_(False)


def save(model, config, src, out, extra=None):
    """Writes out/ as supra writes a model directory (atomically: a temporary, then a rename)."""
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(tmp, "model.safetensors"))
    json.dump(config.to_supra_dict(), open(os.path.join(tmp, "config.json"), "w"), indent=2)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if os.path.exists(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), tmp)
    shutil.copy(os.path.join(os.path.dirname(__file__), "modeling_supra.py"), tmp)
    if extra:
        torch.save(extra, os.path.join(tmp, "trainer.pt"))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("model", help="a directory supra wrote (config.json, model.safetensors, tokenizer.json)")
    ap.add_argument("--data", nargs="+", required=True, help=".txt files or directories of them")
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipe", choices=sorted(PRESETS), default="transfer")
    ap.add_argument("--train", choices=("phi", "all"), help="what is trained (default: phi for transfer and distill, all for supra)")
    ap.add_argument("--tokens", type=int, help="tokens to train on (default: one pass over the data)")
    ap.add_argument("--updates", type=int, help="updates to run (instead of --tokens)")
    ap.add_argument("--seq-len", type=int, help="tokens per window (default: the preset's, 512; supra-paper 2,048)")
    ap.add_argument("--batch", type=int, default=8, help="global batch, in windows of --seq-len (split over processes)")
    ap.add_argument("--lr", type=float, help="peak learning rate (default: the preset's; the final one is scaled with it)")
    ap.add_argument("--ce-weight", type=float, default=0.0, help="distill: weight of cross-entropy beside the KL")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state (FSDP) instead of DDP")
    ap.add_argument("--save-every", type=int, default=0, help="checkpoint every N updates (0: only the final model)")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT/checkpoints (not with --fsdp)")
    ap.add_argument("--threads", type=int, help="CPU threads per process")
    ap.add_argument("--json", action="store_true", help="one JSON line per update on stdout (rank 0)")
    a = ap.parse_args(argv)

    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        if not os.path.isfile(os.path.join(a.model, f)):
            sys.exit(f"{a.model}: no {f} (give a directory supra convert, supra train or this script wrote)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.resume and a.fsdp:
        sys.exit("--resume: checkpoints of sharded runs hold no optimizer state; resume without --fsdp")
    if a.recipe == "transfer" and a.fsdp:
        sys.exit("--fsdp: transfer runs layer by layer outside the sharded forward; use DDP")
    if a.batch % world:
        sys.exit(f"--batch {a.batch} is not a multiple of the {world} processes")
    torch.manual_seed(a.seed)

    preset = PRESETS[a.recipe]
    a.seq_len = a.seq_len or preset["seq_len"]
    config = SupraConfig.from_pretrained(a.model)
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    windows = read_windows(a.model, a.data, a.seq_len, a.seed, eos or 0)
    per_update = a.batch * a.seq_len
    updates = a.updates or max(1, (a.tokens or len(windows) * a.seq_len) // per_update)
    model = SupraForCausalLM.from_pretrained(a.model, config=config).float()
    teacher = make_teacher(model).to(device) if a.recipe == "distill" else None
    train = a.train or preset["train"]
    for name, p in model.named_parameters():
        p.requires_grad_(train == "all" or is_phi(name))
    if not any(p.requires_grad for p in model.parameters()):
        sys.exit(f"--train {train}: this model has nothing to train (convert it first)")
    model.to(device)
    if world > 1 and a.fsdp:
        # FSDP2: each decoder layer is one shard group, the root holds embeddings, norm and head
        # (the tied head reads the embedding inside the root's forward). Runs on CPU (gloo) too.
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    elif world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    else:
        wrapped = model
    params = [p for p in wrapped.parameters() if p.requires_grad]
    lr = a.lr or preset["lr"]
    min_lr = preset["min_lr"] * lr / preset["lr"]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    w = preset["warmup"]
    warmup = max(1, min(updates, w if isinstance(w, int) else int(updates * w)))

    def lr_at(u):
        if u < warmup:
            return lr * (u + 1) / warmup
        t = (u - warmup) / max(1, updates - warmup)
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t))

    start = 0
    ckdir = os.path.join(a.out, "checkpoints")
    if a.resume and os.path.isdir(ckdir):
        last = sorted(glob.glob(os.path.join(ckdir, "update-*")), key=lambda p: int(p.rsplit("-", 1)[1]))
        if last:
            from safetensors.torch import load_file
            model.load_state_dict(load_file(os.path.join(last[-1], "model.safetensors")))
            state = torch.load(os.path.join(last[-1], "trainer.pt"), weights_only=False)
            opt.load_state_dict(state["optimizer"])
            start = state["update"]
    if rank == 0:
        print(f"{a.recipe}: {updates} updates of {per_update} tokens on {world} process(es), "
              f"{sum(p.numel() for p in params) / 1e6:.2f} M trained parameters, device {device.type}",
              file=sys.stderr)
    t0, done = time.time(), 0
    for u in range(start, updates):
        tu = time.time()
        idx = [(u * a.batch + j) % len(windows) for j in range(rank, a.batch, world)]
        batch = windows[idx].to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        for g in opt.param_groups:
            g["lr"] = lr_at(u)
        if a.recipe == "transfer":
            # Layer by layer outside DDP's forward, so its gradients are averaged here.
            loss = transfer_loss(model, x)
            loss.backward()
            if world > 1:
                for p in params:
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
        else:
            logits = wrapped(x).logits
            flat = logits.reshape(-1, logits.shape[-1])
            if a.recipe.startswith("supra"):
                loss = F.cross_entropy(flat, y.reshape(-1))
                if preset["z_loss"]:  # PaLM's: keeps log Z near 0
                    loss = loss + preset["z_loss"] * flat.logsumexp(-1).pow(2).mean()
            else:
                with torch.no_grad():
                    target = teacher(x).logits.reshape(-1, flat.shape[-1]).log_softmax(-1)
                loss = F.kl_div(flat.log_softmax(-1), target, log_target=True, reduction="batchmean")
                if a.ce_weight:
                    loss = loss + a.ce_weight * F.cross_entropy(flat, y.reshape(-1))
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done += 1
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        if rank == 0:
            tps = done * per_update / (time.time() - t0)
            line = {"update": u + 1, "loss": mean.item(), "lr": lr_at(u), "update_s": time.time() - tu,
                    "tokens_per_s": tps}
            print(json.dumps(line) if a.json else f"update {u + 1}/{updates} loss {mean.item():.4f} {tps:.0f} tokens/s",
                  flush=True)
        if a.save_every and (u + 1) % a.save_every == 0 and u + 1 < updates:
            full = full_state(wrapped, a.fsdp and world > 1)
            if rank == 0:
                trainer = None if full is not None else {"optimizer": opt.state_dict(), "update": u + 1}
                save_state(model, full, config, a.model, os.path.join(ckdir, f"update-{u + 1}"), trainer)
    full = full_state(wrapped, a.fsdp and world > 1)
    if rank == 0:
        save_state(model, full, config, a.model, os.path.join(a.out, "final"))
        print(f"wrote {os.path.join(a.out, 'final')}", file=sys.stderr)
    if world > 1:
        dist.destroy_process_group()


def full_state(wrapped, fsdp):
    """Every parameter on rank 0 (FSDP gathers its shards; DDP and one process hold them)."""
    if not fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_state(model, full, config, src, out, extra=None):
    if full is not None:  # a plain model of the gathered weights
        model = SupraForCausalLM(config)
        model.load_state_dict(full)
    save(model, config, src, out, extra)


if __name__ == "__main__":
    main()
