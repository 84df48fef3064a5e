#!/usr/bin/env python3
"""PyTorch side of `supra bench train`: the same converted model, the same two recipes, 2 threads.

Loads a directory written by `supra convert` (config.json + model.safetensors), builds the
SUPRA model in plain PyTorch (φ = ReLU(Wx + b), RoPE after φ, fixed per-head decay, GroupNorm
per head; the parallel form, which at T = 512 costs about what the chunked one does), and times
forward, backward and an AdamW step (torch.optim.AdamW, foreach) for:
  supra    — cross-entropy through all parameters
  transfer — per-layer MSE of the SUPRA output to the teacher's GroupNorm'd softmax output, φ only

Usage:
  /tmp/refenv/bin/python scripts/bench/train_torch.py /tmp/conv --seq-len 512 --steps 3
"""
import argparse, json, math, os, statistics, time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def rope_tables(dim, theta, t):
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    a = torch.arange(t, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = a.cos(), a.sin()
    return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)


def rope(x, cos, sin):
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos + rot * sin


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def group_norm(o, eps=1e-5):
    m = o.mean(-1, keepdim=True)
    c = o - m
    return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)


class Model:
    def __init__(self, d, cfg):
        self.w, self.c = d, cfg
        s = cfg["supra"]
        self.kinds = s["attention_kinds"]
        H, f = cfg["num_attention_heads"], s["feature_dim"]
        decay = s["decay"]
        assert decay == "lightning", "this script implements the lightning decay only"
        self.gamma = torch.tensor([math.exp(-(2 ** (-8 * (h + 1) / H))) for h in range(H)])
        self.f = f

    def heads(self, y, n, d):
        b, t, _ = y.shape
        return y.view(b, t, n, d).transpose(1, 2)

    def layer_io(self, i, xn, cos, sin, cos_f, sin_f):
        """(teacher per-head output, student per-head output or None)."""
        w, c, p = self.w, self.c, f"model.layers.{i}.self_attn."
        H, Hk, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        q = self.heads(xn @ w[p + "q_proj.weight"].T, H, d)
        k = self.heads(xn @ w[p + "k_proj.weight"].T, Hk, d)
        v = self.heads(xn @ w[p + "v_proj.weight"].T, Hk, d)
        rep = H // Hk
        vv = v.repeat_interleave(rep, 1)
        t = xn.shape[1]
        teacher = None
        if self.kinds[i] == "softmax" or self.transfer:
            qt, kt = rope(q, cos, sin), rope(k, cos, sin).repeat_interleave(rep, 1)
            teacher = F.scaled_dot_product_attention(qt, kt, vv, is_causal=True)
            if self.kinds[i] == "softmax":
                return teacher, None
        b = xn.shape[0]
        qf = F.relu(q.transpose(1, 2).reshape(b, t, H * d) @ w[p + "phi_q.weight"].T + w[p + "phi_q.bias"])
        kn = p + ("phi_k" if (p + "phi_k.weight") in w else "phi_q")
        kf = F.relu(k.transpose(1, 2).reshape(b, t, Hk * d) @ w[kn + ".weight"].T + w[kn + ".bias"])
        qf, kf = rope(self.heads(qf, H, self.f), cos_f, sin_f), rope(self.heads(kf, Hk, self.f), cos_f, sin_f)
        kf = kf.repeat_interleave(rep, 1)
        idx = torch.arange(t)
        diff = (idx[:, None] - idx[None, :]).float()
        D = torch.where(diff >= 0, self.gamma[:, None, None] ** diff.clamp(min=0), torch.zeros(()))
        o = ((qf @ kf.transpose(-1, -2)) / math.sqrt(self.f) * D) @ vv
        return teacher, group_norm(o)

    def forward(self, ids, transfer=False):
        self.transfer = transfer
        w, c = self.w, self.c
        eps = c["rms_norm_eps"]
        t = ids.shape[1]
        cos, sin = rope_tables(c["head_dim"], c["rope_theta"], t)
        cos_f, sin_f = rope_tables(self.f, c["rope_theta"], t)
        x = w["model.embed_tokens.weight"][ids]
        losses = []
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            xn = rms(x, w[p + "input_layernorm.weight"], eps)
            teacher, student = self.layer_io(i, xn, cos, sin, cos_f, sin_f)
            if transfer and student is not None:
                losses.append(F.mse_loss(student, group_norm(teacher.detach())))
                y = teacher
            else:
                y = student if student is not None else teacher
            b = y.shape[0]
            y = y.transpose(1, 2).reshape(b, t, -1) @ w[p + "self_attn.o_proj.weight"].T
            x = (x + y).detach() if transfer else x + y
            h = rms(x, w[p + "post_attention_layernorm.weight"], eps)
            m = (F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
            x = (x + m).detach() if transfer else x + m
        if transfer:
            return torch.stack(losses).mean()
        h = rms(x, w["model.norm.weight"], eps)
        head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        return h @ head.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = json.load(open(os.path.join(args.model_dir, "config.json")))
    weights = {k: v.float() for k, v in load_file(os.path.join(args.model_dir, "model.safetensors")).items()}
    ids = torch.randint(0, cfg["vocab_size"], (1, args.seq_len + 1))
    x, y = ids[:, :-1], ids[:, 1:]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, seq {args.seq_len}")
    print("| recipe | tokens/s | forward (s) | backward (s) | optimizer (s) |")
    print("|---|---:|---:|---:|---:|")
    for recipe in ["supra", "transfer"]:
        w = {k: v.clone().requires_grad_(recipe == "supra" or ".phi_" in k) for k, v in weights.items()}
        params = [v for v in w.values() if v.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=True)
        model = Model(w, cfg)
        f, b, o = [], [], []
        for step in range(args.steps + 1):
            t0 = time.perf_counter()
            if recipe == "supra":
                logits = model.forward(x)
                loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
            else:
                loss = model.forward(x, transfer=True)
            loss.item()
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            if step > 0:
                f.append(t1 - t0); b.append(t2 - t1); o.append(t3 - t2)
        fm, bm, om = statistics.median(f), statistics.median(b), statistics.median(o)
        print(f"| {recipe} | {args.seq_len / (fm + bm + om):.1f} | {fm:.2f} | {bm:.2f} | {om:.2f} |")


if __name__ == "__main__":
    main()
