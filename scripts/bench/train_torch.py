#!/usr/bin/env python3
"""PyTorch side of `supra bench train`: the same model directory, the same recipes, the same threads.

Loads a directory written by `supra convert` (config.json + model.safetensors) and builds the
model in plain PyTorch from the definitions in DESIGN.md and the cells' module docs, written
independently of the Rust code:
  softmax layers   the teacher's attention (RoPE, GQA, causal softmax)
  supra layers     φ = ReLU(Wx + b) with RoPE after φ, or Hedgehog [softmax(xW), softmax(-xW)]
                   per head on the RoPE'd q, k; per-head decay γ (lightning, retnet, none, an
                   explicit list, or learnable γ = sigmoid(θ)); ((φq φkᵀ/√d') ⊙ D) V; GroupNorm
  window layers    exact softmax over the first `sinks` and last `window` keys, the rest through
                   φ (on the RoPE'd q, k) with decay γ^(n−w−m); shared normaliser (α = sigmoid θ)
                   or gated (window softmax and GroupNorm'd linear branch, gate g = sigmoid θ)
All in the parallel form (T × T masks), which at T = 512 costs about what a chunked one does.

Recipes, timed as forward, backward and an AdamW step (torch.optim.AdamW, foreach):
  supra              cross-entropy through all parameters
  transfer           per-layer MSE of each linear layer's heads to the teacher's (GroupNorm'd for
                     SUPRA layers, raw for window layers), every layer fed the teacher's input;
                     φ (and decay/mix logits) only
  transfer+finetune  its fine-tuning phase: cross-entropy on LoRA adapters (rank 16, alpha 16)
                     on q, k, v, o plus φ
  distill            KL(teacher ‖ student) over the whole vocabulary at temperature 1, the
                     teacher (every layer softmax, no adapters) run without gradients on the
                     same window inside the timed forward; LoRA adapters plus φ as above
  transfer+distill   its distillation phase: the same update as distill

Usage:
  python scripts/bench/train_torch.py CONV --seq-len 512 --steps 3 [--recipes supra,transfer]
      [--threads 2] [--json]
`--json` prints one JSON object per recipe after the table (what `supra bench train
--against-pytorch` reads). `--check SCORE_JSON` instead compares this model's next-token
log-probs with `supra score MODEL --prompt TEXT --mode parallel --json`'s and prints the largest
difference: the check that this side computes the same model.
"""
import argparse, json, math, os, statistics, sys, time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

GN_EPS = 1e-5
MIX_EPS = 1e-12


def rope_tables(dim, theta, t):
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    a = torch.arange(t, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = a.cos(), a.sin()
    return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)


def rope(x, tables):
    cos, sin = tables
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos + rot * sin


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def group_norm(o):
    c = o - o.mean(-1, keepdim=True)
    return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + GN_EPS)


def heads(y, n, d):
    b, t, _ = y.shape
    return y.view(b, t, n, d).transpose(1, 2)


def merge_heads(y):
    b, n, t, d = y.shape
    return y.transpose(1, 2).reshape(b, t, n * d)


def fixed_gammas(decay, n):
    if isinstance(decay, list):
        return torch.tensor(decay, dtype=torch.float32)
    if decay in ("lightning", "fixed", "learnable"):
        return torch.tensor([math.exp(-(2 ** (-8 * (h + 1) / n))) for h in range(n)])
    if decay == "retnet":
        return torch.tensor([1 - 2 ** (-5 - h) for h in range(n)])
    if decay == "none":
        return torch.ones(n)
    sys.exit(f"unknown decay {decay!r}")


class Model:
    def __init__(self, w, cfg, lora):
        self.w, self.c, self.lora = w, cfg, lora
        s = cfg.get("supra") or {}
        n = cfg["num_hidden_layers"]
        self.kinds = s.get("attention_kinds", ["softmax"] * n)
        self.H, self.Hk, self.d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        self.f = s.get("feature_dim", self.d)
        self.fmap = s.get("feature_map", "relu")
        self.decay = s.get("decay", "lightning")
        self.gammas = fixed_gammas(self.decay, self.H)
        win = s.get("window") or {}
        self.window, self.sinks, self.mix = win.get("window"), win.get("sinks", 0), win.get("mix", "shared")

    def linear(self, x, name):
        y = x @ self.w[name + ".weight"].T
        if self.lora and (name + ".lora_A") in self.w:
            y = y + (x @ self.w[name + ".lora_A"].T) @ self.w[name + ".lora_B"].T * self.lora
        return y

    def phi(self, x, p, role, n, d_in):
        """x (B, n, T, d_in) → (B, n, T, f)."""
        name = p + ("phi_k" if role == "k" and (p + "phi_k.weight") in self.w else "phi_q")
        if self.fmap == "relu":
            y = merge_heads(x) @ self.w[name + ".weight"].T + self.w[name + ".bias"]
            return heads(F.relu(y), n, self.f)
        y = torch.einsum("bhti,hij->bhtj", x, self.w[name + ".weight"])
        return torch.cat([y.softmax(-1), (-y).softmax(-1)], -1)

    def gamma(self, p):
        if self.decay == "learnable":
            return torch.sigmoid(self.w[p + "decay_logit"])
        return self.gammas

    def attention(self, i, xn, t):
        """(teacher heads output, student heads output or None), each (B, H, T, d)."""
        p, H, Hk, d = f"model.layers.{i}.self_attn.", self.H, self.Hk, self.d
        rep = H // Hk
        q = heads(self.linear(xn, p + "q_proj"), H, d)
        k = heads(self.linear(xn, p + "k_proj"), Hk, d)
        v = heads(self.linear(xn, p + "v_proj"), Hk, d).repeat_interleave(rep, 1)
        kind = self.kinds[i]
        qr, kr = rope(q, self.rope_d), rope(k, self.rope_d)
        teacher = None
        if kind == "softmax" or self.transfer:
            with torch.no_grad() if self.transfer else torch.enable_grad():
                teacher = F.scaled_dot_product_attention(qr, kr.repeat_interleave(rep, 1), v, is_causal=True)
            if kind == "softmax":
                return teacher, None
        if kind == "supra":
            if self.fmap == "relu":
                fq = rope(self.phi(q, p, "q", H, d), self.rope_f)
                fk = rope(self.phi(k, p, "k", Hk, d), self.rope_f)
            else:
                fq, fk = self.phi(qr, p, "q", H, d), self.phi(kr, p, "k", Hk, d)
            fk = fk.repeat_interleave(rep, 1)
            g = self.gamma(p)[:, None, None]
            D = torch.where(self.causal, g ** self.dist, torch.zeros(()))
            o = ((fq @ fk.transpose(-1, -2)) / math.sqrt(self.f) * D) @ v
            return teacher, group_norm(o)
        # window: exact over sinks + the last w keys, linear over the rest.
        fq, fk = self.phi(qr, p, "q", H, d), self.phi(kr, p, "k", Hk, d).repeat_interleave(rep, 1)
        logits = (qr @ kr.repeat_interleave(rep, 1).transpose(-1, -2)) / math.sqrt(d)
        logits = logits.masked_fill(~self.exact, float("-inf"))
        e = (logits - logits.amax(-1, keepdim=True).detach()).exp()
        A, a = e @ v, e.sum(-1, keepdim=True)
        g = self.gamma(p)[:, None, None]
        D = torch.where(self.lin, g ** (self.dist - self.window).clamp(min=0), torch.zeros(()))
        W = (fq @ fk.transpose(-1, -2)) / math.sqrt(self.f) * D
        B, b = W @ v, W.sum(-1, keepdim=True)
        m = torch.sigmoid(self.w[p + "window_mix"])[:, None, None]
        if self.mix == "shared":
            return teacher, (A + m * B) / (a + m * b + MIX_EPS)
        return teacher, (1 - m) * A / a + m * group_norm(B)

    def forward(self, ids, transfer=False):
        self.transfer = transfer
        w, c = self.w, self.c
        eps = c["rms_norm_eps"]
        t = ids.shape[1]
        self.rope_d = rope_tables(self.d, c["rope_theta"], t)
        self.rope_f = rope_tables(self.f, c["rope_theta"], t)
        n = torch.arange(t)
        self.dist = (n[:, None] - n[None, :]).float().clamp(min=0)
        self.causal = n[:, None] >= n[None, :]
        if self.window is not None:
            self.exact = self.causal & ((n[None, :] < self.sinks) | (n[None, :] > n[:, None] - self.window))
            self.lin = self.causal & ~self.exact
        x = w["model.embed_tokens.weight"][ids]
        losses = []
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            xn = rms(x, w[p + "input_layernorm.weight"], eps)
            teacher, student = self.attention(i, xn, t)
            if transfer and student is not None:
                target = group_norm(teacher) if self.kinds[i] == "supra" else teacher
                losses.append(F.mse_loss(student, target))
                y = teacher
            else:
                y = student if student is not None else teacher
            y = self.linear(merge_heads(y), p + "self_attn.o_proj")
            x = (x + y).detach() if transfer else x + y
            h = rms(x, w[p + "post_attention_layernorm.weight"], eps)
            m = self.linear(F.silu(self.linear(h, p + "mlp.gate_proj")) * self.linear(h, p + "mlp.up_proj"), p + "mlp.down_proj")
            x = (x + m).detach() if transfer else x + m
        if transfer:
            return torch.stack(losses).mean()
        h = rms(x, w["model.norm.weight"], eps)
        head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        return h @ head.T


def is_phi(name):
    return any(s in name for s in (".phi_", ".decay_logit", ".window_mix"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--recipes", default="supra,transfer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--check", metavar="SCORE_JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = json.load(open(os.path.join(args.model_dir, "config.json")))
    weights = {k: v.float() for k, v in load_file(os.path.join(args.model_dir, "model.safetensors")).items()}
    if args.check:
        score = json.load(open(args.check))
        ids = torch.tensor([score["token_ids"]])
        with torch.no_grad():
            logp = Model(weights, cfg, None).forward(ids[:, :-1]).log_softmax(-1)
        ours = logp[0].gather(-1, ids[0, 1:, None])[:, 0]
        diff = (ours - torch.tensor(score["logprobs"])).abs().max().item()
        print(f"{len(score['logprobs'])} tokens: max |log-prob difference| against supra {diff:.2e}")
        return
    ids = torch.randint(0, cfg["vocab_size"], (1, args.seq_len + 1))
    x, y = ids[:, :-1], ids[:, 1:]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, seq {args.seq_len}")
    print("| recipe | trained params | tokens/s | forward (s) | backward (s) | optimizer (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for recipe in args.recipes.split(","):
        w = {k: v.clone() for k, v in weights.items()}
        lora = None
        if recipe in ("transfer+finetune", "distill", "transfer+distill"):
            r = args.lora_rank
            for i in range(cfg["num_hidden_layers"]):
                for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    name = f"model.layers.{i}.self_attn.{proj}"
                    out_dim, in_dim = w[name + ".weight"].shape
                    bound = 1 / math.sqrt(in_dim)
                    w[name + ".lora_A"] = torch.empty(r, in_dim).uniform_(-bound, bound)
                    w[name + ".lora_B"] = torch.zeros(out_dim, r)
            lora = args.lora_alpha / r
        elif recipe not in ("supra", "transfer"):
            sys.exit(f"unknown recipe {recipe!r} (known: supra, transfer, transfer+finetune, distill, transfer+distill)")
        for k, v in w.items():
            trained = True if recipe == "supra" else is_phi(k) if recipe == "transfer" else is_phi(k) or ".lora_" in k
            v.requires_grad_(trained)
        params = [v for v in w.values() if v.requires_grad]
        if not params:
            sys.exit(f"recipe {recipe}: this model has nothing it trains (convert it first)")
        opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=True)
        model = Model(w, cfg, lora)
        # Distillation's teacher: the same weights with every layer softmax and no adapters.
        teacher_cfg = {k: v for k, v in cfg.items() if k != "supra"}
        teacher = Model({k: v.detach() for k, v in weights.items()}, teacher_cfg, None)
        f, b, o = [], [], []
        for step in range(args.steps + 1):
            t0 = time.perf_counter()
            if recipe == "transfer":
                loss = model.forward(x, transfer=True)
            elif recipe in ("distill", "transfer+distill"):
                with torch.no_grad():
                    target = teacher.forward(x).view(-1, cfg["vocab_size"]).log_softmax(-1)
                logits = model.forward(x)
                student = logits.view(-1, logits.shape[-1]).log_softmax(-1)
                loss = F.kl_div(student, target, log_target=True, reduction="batchmean")
            else:
                logits = model.forward(x)
                loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
            loss.item()
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            if step > 0:  # the first step warms caches and allocators
                f.append(t1 - t0); b.append(t2 - t1); o.append(t3 - t2)
        fm, bm, om = statistics.median(f), statistics.median(b), statistics.median(o)
        n = sum(p.numel() for p in params)
        row = {"recipe": recipe, "trained_params": n, "tokens_per_s": args.seq_len / (fm + bm + om),
               "forward_s": fm, "backward_s": bm, "optimizer_s": om}
        rows.append(row)
        print(f"| {recipe} | {n / 1e6:.2f} M | {row['tokens_per_s']:.1f} | {fm:.2f} | {bm:.2f} | {om:.2f} |", flush=True)
    if args.json:
        for row in rows:
            print(json.dumps(row))


if __name__ == "__main__":
    main()
