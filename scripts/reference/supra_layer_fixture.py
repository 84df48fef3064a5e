"""Golden fixture for one SUPRA layer, from an independent PyTorch implementation.

Written from the reference code's definitions (TRI-ML/linear_open_lm, `LinearAttn` and
`recurrent_forward`): φ(x) = ReLU(W x + b) on queries (one φ) and keys (their own φ under GQA),
keys and values repeated per query head, RoPE after φ, the decay γ_h = exp(−slope_h) with the
Lightning-Attention slopes, no denominator, GroupNorm with one group per head and no affine,
then Wo. The sum runs token by token, as `recurrent_forward` does:

    S ← S + (k̃ᵀ · scale) v,   o = q̃ S,   S ← γ S          (scale = 1/√d')

RoPE is transformers' rotate-half convention (the models supra loads). Shapes are small and
unequal on purpose: 4 query heads over 2 key/value heads, head dim 8, feature dim 6.

    python scripts/reference/supra_layer_fixture.py tests/fixtures/supra_layer.json

needs torch; the committed fixture is what the tests read.
"""

import json
import math
import sys

import torch


def lightning_slopes(n):
    # Lightning Attention's slopes for a power-of-two head count (the reference's
    # get_slopes_power_of_2 with start = None).
    ratio = 2 ** (-(2 ** -(math.log2(n) - 3)))
    return [ratio * ratio**i for i in range(n)]


def rope(x, theta):
    # x: (batch, heads, seq, dim), positions 0..seq-1, rotate-half.
    b, h, t, d = x.shape
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1)
    sin = torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rotated = torch.cat([-x2, x1], -1)
    return x * cos + rotated * sin


def main(out):
    torch.manual_seed(7)
    dt = torch.float64
    batch, seq, hidden = 2, 13, 32
    h, hkv, d, f = 4, 2, 8, 6
    theta = 10_000.0

    def w(rows, cols):
        return torch.randn(rows, cols, dtype=dt) / math.sqrt(cols)

    params = {
        "q_proj.weight": w(h * d, hidden),
        "k_proj.weight": w(hkv * d, hidden),
        "v_proj.weight": w(hkv * d, hidden),
        "o_proj.weight": w(hidden, h * d),
        "phi_q.weight": w(h * f, h * d),
        "phi_q.bias": 0.1 * torch.randn(h * f, dtype=dt),
        "phi_k.weight": w(hkv * f, hkv * d),
        "phi_k.bias": 0.1 * torch.randn(hkv * f, dtype=dt),
    }
    x = torch.randn(batch, seq, hidden, dtype=dt)

    q = x @ params["q_proj.weight"].T
    k = x @ params["k_proj.weight"].T
    v = (x @ params["v_proj.weight"].T).view(batch, seq, hkv, d)
    q = torch.relu(q @ params["phi_q.weight"].T + params["phi_q.bias"]).view(batch, seq, h, f)
    k = torch.relu(k @ params["phi_k.weight"].T + params["phi_k.bias"]).view(batch, seq, hkv, f)
    rep = h // hkv
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, ·)
    q, k = rope(q, theta), rope(k, theta)

    gamma = torch.exp(-torch.tensor(lightning_slopes(h), dtype=dt)).view(1, h, 1, 1)
    scale = 1.0 / math.sqrt(f)
    s = torch.zeros(batch, h, f, d, dtype=dt)
    outs = []
    for i in range(seq):
        s = s + (k[:, :, i : i + 1].transpose(-1, -2) * scale) @ v[:, :, i : i + 1]
        outs.append(q[:, :, i : i + 1] @ s)
        s = gamma * s
    o = torch.cat(outs, 2)  # (batch, heads, seq, d)
    # The state after the last token as supra keeps it: before the next token's decay.
    state = s / gamma
    o = o.transpose(1, 2).reshape(batch * seq, h * d)
    o = torch.nn.functional.group_norm(o, h, eps=1e-5)
    heads = o.view(batch, seq, h, d).transpose(1, 2)
    y = o.view(batch, seq, h * d) @ params["o_proj.weight"].T

    flat = lambda t: [float(a) for a in t.reshape(-1)]
    fixture = {
        "about": "one SUPRA layer, scripts/reference/supra_layer_fixture.py (PyTorch, float64)",
        "dims": {"batch": batch, "seq": seq, "hidden": hidden, "heads": h, "kv_heads": hkv,
                 "head_dim": d, "feature_dim": f, "rope_theta": theta},
        "gammas": flat(gamma),
        "params": {name: {"shape": list(t.shape), "data": flat(t)} for name, t in params.items()},
        "x": flat(x),
        "heads": flat(heads),
        "y": flat(y),
        "state": flat(state),
    }
    with open(out, "w") as fh:
        json.dump(fixture, fh)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/supra_layer.json")
