"""supra's models as a transformers model: softmax (the teacher's), SUPRA and window + linear cells.

This one file is the whole model. `supra` writes it beside every config.json it saves, with
`auto_map` entries in the config, so that

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

loads any directory `supra convert`, `supra train` or `supra export` wrote; it is also the
`supra_torch` package's model (`pip install ./python`). Written from the definitions in supra's
DESIGN.md and the cells' module docs, in the same names as model.safetensors:

  softmax  RoPE'd q, k; causal softmax; grouped keys and values (GQA)
  supra    φ(q), φ(k) with φ = ReLU(W x + b) over the merged heads then RoPE on the features, or
           Hedgehog [softmax(x W_h), softmax(−x W_h)] per head on the RoPE'd q, k; per-head
           decay γ; o = GroupNorm(((φq φkᵀ / √d') ⊙ D) V) with D[n, m] = γ^(n−m), m ≤ n
  window   exact softmax over the first `sinks` and the last `window` keys, the rest through
           φ (on the RoPE'd q, k) with decay γ^(n−w−m); one shared normaliser
           (A + α B) / (a + α b + ε), α = sigmoid(θ), or gated (1 − g) A/a + g GroupNorm(B);
           with `sink_positions` "cache" query n scores the sinks RoPE'd at min(n, s + w − 1),
           as if they sat just before the window (StreamingLLM's cache), not at its own n;
           with `rule` "delta" (gated or value mix) B is a delta-rule state's answer instead:
           before query n, key m = n − w enters Z ← γZ + k̂ uᵀ, u = β(v − γ Zᵀ k̂),
           k̂ = φk/‖φk‖, β = sigmoid(w_h·k̂ + b_h) (window_beta, per head [w_h | b_h]), and
           B = Zᵀ φq; mix "value": (1 − g) A/a + g Zᵀ q̂ with q̂ = φq/‖φq‖, not GroupNorm'd

Two forms of each cell, one function: a block of T tokens read against the state left by the
tokens before it. Training reads a sequence in blocks of `chunk_size` (the chunked form: exact
inside a block, through the state across blocks); generation reads one token at a time (the
recurrent form, whose state does not grow for SUPRA and window layers). `forward(...,
form="recurrent")` reads a whole sequence one token at a time, to check the two agree.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

GROUP_NORM_EPS = 1e-5
MIX_EPS = 1e-12
KEY_EPS = 1e-12
KINDS = ("softmax", "supra", "window")


class SupraConfig(PretrainedConfig):
    """The config.json `supra` reads and writes: a llama/qwen2 config plus an optional `supra`
    section (attention_kinds, feature_dim, feature_map, decay, chunk_size, window) and an
    optional `lora` section (rank, alpha) for unmerged adapters."""

    model_type = "supra"

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        head_dim=None,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        attention_bias=False,
        rope_scaling=None,
        supra=None,
        lora=None,
        **kwargs,
    ):
        if rope_scaling:
            raise ValueError(f"rope_scaling {rope_scaling} is not supported (only plain RoPE)")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.attention_bias = attention_bias
        self.supra = supra
        self.lora = lora
        kinds = self.attention_kinds
        if len(kinds) != num_hidden_layers or any(k not in KINDS for k in kinds):
            raise ValueError(f"supra.attention_kinds {kinds}: one of {KINDS} per layer")
        window = (supra or {}).get("window")
        if "window" in kinds and not window:
            raise ValueError("window layers without supra.window (window, sinks, mix)")
        if window and window.get("sink_positions", "absolute") not in ("absolute", "cache"):
            raise ValueError(f"supra.window.sink_positions {window['sink_positions']!r}: absolute or cache")
        if window and window.get("rule", "add") not in ("add", "delta"):
            raise ValueError(f"supra.window.rule {window['rule']!r}: add or delta")
        if window and window.get("mix", "shared") not in ("shared", "gated", "value"):
            raise ValueError(f"supra.window.mix {window['mix']!r}: shared, gated or value")
        if window and window.get("rule", "add") == "delta" and window.get("mix") not in ("gated", "value"):
            raise ValueError("supra.window: the delta rule needs the gated or value mix")
        if window and window.get("mix") == "value" and window.get("rule", "add") != "delta":
            raise ValueError("supra.window: the value mix needs the delta rule")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        # supra's config.json keeps the teacher's model_type (llama or qwen2), which supra reads
        # back; here it is kept as `arch` and the dict read as this class's own type.
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        arch = config_dict.get("model_type", "llama")
        return dict(config_dict, model_type=cls.model_type, arch=config_dict.get("arch", arch)), kwargs

    def to_supra_dict(self):
        """The config.json that supra reads (and transformers, through auto_map)."""
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "max_position_embeddings",
                "tie_word_embeddings", "attention_bias", "bos_token_id", "eos_token_id")
        out = {k: getattr(self, k) for k in keys}
        arch = getattr(self, "arch", "llama")
        out.update(model_type=arch, hidden_act="silu", torch_dtype="float32",
                   architectures=["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
                   auto_map={"AutoConfig": "modeling_supra.SupraConfig",
                             "AutoModelForCausalLM": "modeling_supra.SupraForCausalLM"})
        if self.supra:
            out["supra"] = self.supra
        if self.lora:
            out["lora"] = self.lora
        return out

    @property
    def attention_kinds(self):
        if not self.supra:
            return ["softmax"] * self.num_hidden_layers
        return list(self.supra["attention_kinds"])


def rope_tables(dim, theta, positions):
    """cos, sin (T, dim) as supra computes them: inverse frequencies in f64 rounded to f32,
    f32 angles (as transformers has them), cos and sin of those angles in f64."""
    i = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device)
    inv = (1.0 / theta ** (i / dim)).float()
    a = (positions.float()[:, None] * inv[None, :]).double()
    cos, sin = a.cos().float(), a.sin().float()
    return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)


def rope(x, tables):
    cos, sin = tables
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


def group_norm(o):
    """Per head over its values, no affine (SUPRA's output norm)."""
    c = o - o.mean(-1, keepdim=True)
    return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + GROUP_NORM_EPS)


def fixed_gammas(decay, heads):
    """Per-head decay γ_h of the names `supra convert --decay` knows (a list is explicit)."""
    if isinstance(decay, list):
        return torch.tensor(decay, dtype=torch.float64)
    if decay in ("lightning", "fixed", "learnable"):
        return torch.tensor([math.exp(-(2 ** (-8 * (h + 1) / heads))) for h in range(heads)], dtype=torch.float64)
    if decay == "retnet":
        return torch.tensor([1 - 2 ** (-5 - h) for h in range(heads)], dtype=torch.float64)
    if decay == "none":
        return torch.ones(heads, dtype=torch.float64)
    raise ValueError(f"unknown supra.decay {decay!r} (lightning, retnet, none, learnable or a list)")


def split_heads(y, n):
    b, t, _ = y.shape
    return y.view(b, t, n, -1).transpose(1, 2)


def merge_heads(y):
    b, n, t, d = y.shape
    return y.transpose(1, 2).reshape(b, t, n * d)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Linear(nn.Module):
    """y = x Wᵀ (+ b), plus (α/r)·(x Aᵀ) Bᵀ when the config carries unmerged LoRA adapters
    (names `<proj>.lora_A`, `<proj>.lora_B`, as supra's checkpoints write them)."""

    def __init__(self, out_dim, in_dim, bias=False, lora=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_dim, in_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim)) if bias else None
        self.lora_scale = None
        if lora:
            self.lora_A = nn.Parameter(torch.zeros(lora["rank"], in_dim))
            self.lora_B = nn.Parameter(torch.zeros(out_dim, lora["rank"]))
            self.lora_scale = lora["alpha"] / lora["rank"]

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.lora_scale is not None:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.lora_scale
        return y


class FeatureMap(nn.Module):
    """φ of one role (q or k). ReLU: one affine map over the merged heads, (heads·d') × (heads·d);
    Hedgehog: per head x W_h (d × d), then [softmax, softmax of the negation] (2d features);
    Taylor: per head y = x W_h (d × p), then [1, y, y_i y_j for i < j and y_i²/√2, row by row]
    (1 + p + p(p+1)/2 features), so that φ(q)·φ(k) = 1 + u + u²/2 with u = y_q·y_k."""

    def __init__(self, kind, heads, head_dim, feature_dim):
        super().__init__()
        self.kind, self.heads = kind, heads
        if kind == "relu":
            self.weight = nn.Parameter(torch.zeros(heads * feature_dim, heads * head_dim))
            self.bias = nn.Parameter(torch.zeros(heads * feature_dim))
        elif kind == "hedgehog":
            self.weight = nn.Parameter(torch.zeros(heads, head_dim, head_dim))
        elif kind == "taylor":
            p = next((p for p in range(1, feature_dim + 1) if 1 + p + p * (p + 1) // 2 == feature_dim), None)
            if p is None:
                raise ValueError(f"supra.feature_dim {feature_dim} is no taylor map's 1 + p + p(p+1)/2")
            self.weight = nn.Parameter(torch.zeros(heads, head_dim, p))
        else:
            raise ValueError(f"unknown supra.feature_map {kind!r} (relu, hedgehog or taylor)")

    def forward(self, x):
        """x (B, heads, T, d) → (B, heads, T, d')."""
        if self.kind == "relu":
            return split_heads(F.relu(F.linear(merge_heads(x), self.weight, self.bias)), self.heads)
        y = torch.einsum("bhti,hij->bhtj", x, self.weight)
        if self.kind == "taylor":
            # The pairs i ≤ j row by row, with 1/√2 on the diagonal.
            i, j = torch.triu_indices(y.shape[-1], y.shape[-1], device=y.device)
            c = torch.where(i == j, 0.5 ** 0.5, 1.0).to(y.dtype)
            quad = y[..., i] * y[..., j] * c
            return torch.cat([torch.ones_like(y[..., :1]), y, quad], -1)
        return torch.cat([y.softmax(-1), (-y).softmax(-1)], -1)


@dataclass
class LayerState:
    """What one layer keeps between blocks. softmax: every key and value (k, v); supra: S
    (B, H, d', d); window: the kept keys/values/key features with their positions, S and z."""

    k: torch.Tensor = None
    v: torch.Tensor = None
    fk: torch.Tensor = None
    positions: torch.Tensor = None
    S: torch.Tensor = None
    z: torch.Tensor = None


class SupraState:
    """The recurrent state of a whole model after `length` tokens (batch rows advance together)."""

    def __init__(self, layers):
        self.layers = [LayerState() for _ in range(layers)]
        self.length = 0


class Attention(nn.Module):
    def __init__(self, config, kind):
        super().__init__()
        c, s = config, config.supra or {}
        self.kind = kind
        self.H, self.Hk, self.d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.theta = c.rope_theta
        bias, lora = c.attention_bias, c.lora
        self.q_proj = Linear(self.H * self.d, c.hidden_size, bias, lora)
        self.k_proj = Linear(self.Hk * self.d, c.hidden_size, bias, lora)
        self.v_proj = Linear(self.Hk * self.d, c.hidden_size, bias, lora)
        self.o_proj = Linear(c.hidden_size, self.H * self.d, False, lora)
        if kind == "softmax":
            return
        self.fmap = s.get("feature_map", "relu")
        self.f = s["feature_dim"]
        self.decay = s["decay"]
        self.chunk = s.get("chunk_size", 64)
        self.phi_q = FeatureMap(self.fmap, self.H, self.d, self.f)
        # Keys get their own map when they have their own heads (GQA) or under a per-head map.
        if self.Hk != self.H or self.fmap != "relu":
            self.phi_k = FeatureMap(self.fmap, self.Hk, self.d, self.f)
        if self.decay == "learnable":
            self.decay_logit = nn.Parameter(torch.zeros(self.H))
        if kind == "window":
            w = s["window"]
            self.window, self.sinks, self.mix = w["window"], w.get("sinks", 0), w.get("mix", "shared")
            # Configs from before the option had the sinks at their own positions.
            self.sink_positions = w.get("sink_positions", "absolute")
            self.window_mix = nn.Parameter(torch.zeros(self.H))
            self.rule = w.get("rule", "add")
            if self.rule == "delta":
                self.window_beta = nn.Parameter(torch.zeros(self.H, self.f + 1))

    def gammas(self, like):
        """γ per head, in `like`'s dtype: powers of an f32 γ make a split sequence and a whole
        one differ by ~1e-5 in f64 logits."""
        if self.decay == "learnable":
            return torch.sigmoid(self.decay_logit).to(like.dtype)
        return fixed_gammas(self.decay, self.H).to(device=like.device, dtype=like.dtype)

    def phi(self, x, role):
        return (self.phi_k if role == "k" and hasattr(self, "phi_k") else self.phi_q)(x)

    def repeat(self, x):
        return x.repeat_interleave(self.H // self.Hk, 1)

    def project(self, x, pos):
        """q, k, v as heads and the RoPE'd q, k, for tokens at positions `pos`."""
        q = split_heads(self.q_proj(x), self.H)
        k = split_heads(self.k_proj(x), self.Hk)
        v = split_heads(self.v_proj(x), self.Hk)
        rd = rope_tables(self.d, self.theta, pos)
        return q, k, v, rope(q, rd), rope(k, rd)

    def linear_cell(self, q, k, v, qr, kr, pos, state, chunk):
        """The SUPRA or window cell over the tokens in blocks of `chunk`, carrying `state`."""
        if self.kind == "supra" and self.fmap == "relu":
            rf = rope_tables(self.f, self.theta, pos)
            fq, fk = rope(self.phi(q, "q"), rf), rope(self.phi(k, "k"), rf)
        else:  # Hedgehog, Taylor and every window cell read the RoPE'd q and k.
            fq, fk = self.phi(qr, "q"), self.phi(kr, "k")
        cell = self.supra if self.kind == "supra" else self.window_cell
        qs = self.sink_queries(q, qr, pos)
        ys = []
        for a in range(0, q.shape[2], chunk):
            b = slice(a, a + chunk)
            ys.append(cell(qr[:, :, b], qs[:, :, b], kr[:, :, b], v[:, :, b], fq[:, :, b], fk[:, :, b], pos[b], state))
        return torch.cat(ys, 2)

    def sink_queries(self, q, qr, pos):
        """The queries the sinks are scored with: RoPE'd at min(n, s + w − 1) with cache
        positions, else the RoPE'd q itself."""
        if self.kind != "window" or self.sink_positions == "absolute":
            return qr
        at = pos.clamp(max=max(self.sinks + self.window - 1, 0))
        return rope(q, rope_tables(self.d, self.theta, at))

    def forward(self, x, state, start, chunk=None):
        """x (B, T, hidden) at positions start.. start+T−1 → (B, T, hidden); updates `state`
        (a LayerState, or None when nothing is kept)."""
        pos = torch.arange(start, start + x.shape[1], device=x.device)
        q, k, v, qr, kr = self.project(x, pos)
        if self.kind == "softmax":
            y = self.softmax(qr, kr, v, state)
        else:
            y = self.linear_cell(q, k, v, qr, kr, pos, state or LayerState(), chunk or self.chunk)
        return self.o_proj(merge_heads(y))

    def transfer_pair(self, x):
        """Attention transfer's two outputs on the same input x (B, T, hidden), heads
        (B, H, T, d) before o_proj: the teacher's softmax attention (no gradient) and this
        layer's linear cell."""
        pos = torch.arange(x.shape[1], device=x.device)
        with torch.no_grad():
            q, k, v, qr, kr = self.project(x, pos)
            teacher = self.softmax(qr, kr, v, None)
        return teacher, self.linear_cell(q, k, v, qr, kr, pos, LayerState(), self.chunk)

    def softmax(self, q, k, v, state):
        if state is not None:
            if state.k is not None:
                k, v = torch.cat([state.k, k], 2), torch.cat([state.v, v], 2)
            state.k, state.v = k, v
        t, n = q.shape[2], k.shape[2]
        causal = torch.ones(t, n, dtype=torch.bool, device=q.device).tril(n - t)
        return F.scaled_dot_product_attention(q, self.repeat(k), self.repeat(v), attn_mask=causal)

    def supra(self, _q, _qs, _k, v, fq, fk, pos, st):
        """One block of the SUPRA cell: exact inside the block, S for every key before it."""
        g = self.gammas(v)[:, None, None]  # (H, 1, 1)
        fk, v = self.repeat(fk), self.repeat(v)
        t = pos.shape[0]
        i = torch.arange(t, device=v.device)
        dist = (i[:, None] - i[None, :]).clamp(min=0).float()
        D = torch.where(i[:, None] >= i[None, :], g ** dist, torch.zeros((), device=v.device))
        scale = 1 / math.sqrt(self.f)
        o = ((fq @ fk.transpose(-1, -2)) * scale * D) @ v
        if st.S is not None:  # S holds Σ γ^(p−1−m) φk_m v_mᵀ over the keys m < p before the block
            o = o + (fq * g ** (i[:, None] + 1).float()) @ st.S * scale
        carried = st.S * g ** t if st.S is not None else 0
        st.S = carried + (fk * g ** (t - 1 - i[:, None]).float()).transpose(-1, -2) @ v
        return group_norm(o)

    def window_cell(self, q, qs, k, v, fq, fk, pos, st):
        """One block of the window cell against the kept keys (sinks and the last window) and
        the linear state S, z of every key that has left the window; qs scores the sinks."""
        w, s = self.window, self.sinks
        p, t = int(pos[0]), pos.shape[0]
        if st.positions is not None:
            k, v, fk = (torch.cat([a, b], 2) for a, b in ((st.k, k), (st.v, v), (st.fk, fk)))
            kpos = torch.cat([st.positions, pos])
        else:
            kpos = pos
        K, V, FK = self.repeat(k), self.repeat(v), self.repeat(fk)
        n, m = pos[:, None], kpos[None, :]
        exact = (m <= n) & ((m < s) | (m + w > n))
        Kt = K.transpose(-1, -2)
        logits = torch.where(m < s, qs @ Kt, q @ Kt) / math.sqrt(self.d)
        logits = logits.masked_fill(~exact, float("-inf"))
        c = logits.amax(-1, keepdim=True).detach()
        c = torch.where(torch.isfinite(c), c, torch.zeros((), device=c.device))
        e = (logits - c).exp()
        A, a = e @ V, e.sum(-1, keepdim=True)
        g = self.gammas(v)[:, None, None]
        if self.rule == "delta":
            if self.mix == "value":  # unit queries: a key matched exactly answers its value
                fq = fq / (fq.pow(2).sum(-1, keepdim=True) + KEY_EPS).sqrt()
            B = self.delta_steps(fq, FK, V, kpos, pos, st)
        else:
            # Keys not yet in S: S holds those m ≤ p − 1 − w (what query p − 1 reads linearly).
            linear = (m >= s) & (m + w <= n) & (m + w > p - 1)
            expo = (n - w - m).clamp(min=0).float()
            scale = 1 / math.sqrt(self.f)
            Wl = (fq @ FK.transpose(-1, -2)) * scale * torch.where(linear, g ** expo, torch.zeros((), device=v.device))
            B, b = Wl @ V, Wl.sum(-1, keepdim=True)
            if st.S is not None:  # query n reads S with γ^(n − p + 1)
                r = g ** (pos - p + 1).float()[:, None]
                B = B + (fq * r) @ st.S * scale
                b = b + (fq * r) @ st.z[..., None] * scale
        # The state after the block: keys m with p − 1 − w < m ≤ p + t − 1 − w enter S.
        last = p + t - 1
        if self.rule == "add":
            enter = ((kpos >= s) & (kpos + w <= last) & (kpos + w > p - 1)).float()
            wk = (g ** (last - w - kpos).clamp(min=0).float()[:, None]) * enter[:, None]  # (H, M, 1)
            S_new = (FK * wk).transpose(-1, -2) @ V
            z_new = (FK * wk).sum(2)
            if st.S is not None:
                S_new = S_new + st.S * g ** t
                z_new = z_new + st.z * g[..., 0] ** t
            st.S, st.z = S_new, z_new
        # What the next block still reads outside S: the sinks and every key m > last − w.
        keep = (kpos < s) | (kpos + w > last)
        st.k, st.v, st.fk, st.positions = k[:, :, keep], v[:, :, keep], fk[:, :, keep], kpos[keep]
        mix = torch.sigmoid(self.window_mix)[:, None, None]
        if self.mix == "shared":
            return (A + mix * B) / (a + mix * b + MIX_EPS)
        window = torch.where(a > 0, A / a.clamp(min=1e-30), torch.zeros((), device=A.device))
        return (1 - mix) * window + mix * (B if self.mix == "value" else group_norm(B))

    def delta_steps(self, fq, FK, V, kpos, pos, st):
        """The delta rule's B for the block's queries, token by token (st.S holds Z, (B, H, d',
        d)): before query n the state decays and takes in key n − w when it is past the sinks."""
        g = self.gammas(V)[None, :, None]  # (1, H, 1)
        Z = st.S if st.S is not None else fq.new_zeros(fq.shape[0], self.H, self.f, self.d)
        w, b = self.window_beta[:, :-1].to(fq.dtype), self.window_beta[:, -1].to(fq.dtype)
        out = []
        for i, n in enumerate(pos.tolist()):
            Z = Z * g[..., None]
            m = n - self.window
            if m >= self.sinks:
                j = int((kpos == m).nonzero())
                key = FK[:, :, j]
                key = key / (key.pow(2).sum(-1, keepdim=True) + KEY_EPS).sqrt()  # (B, H, d')
                beta = torch.sigmoid((key * w).sum(-1) + b)[..., None]  # (B, H, 1)
                # Z_{n−1} is Z / γ here: u = β(v − γ Z_{n−1}ᵀ k̂) = β(v − (Zᵀ k̂)).
                u = beta * (V[:, :, j] - torch.einsum("bhf,bhfd->bhd", key, Z))
                Z = Z + key[..., None] * u[..., None, :]
            out.append(torch.einsum("bhf,bhfd->bhd", fq[:, :, i], Z))
        st.S = Z
        return torch.stack(out, 2)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(f, h)
        self.up_proj = Linear(f, h)
        self.down_proj = Linear(h, f)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config, kind):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, kind)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, state, start, chunk=None):
        x = x + self.self_attn(self.input_layernorm(x), state, start, chunk)
        return x + self.mlp(self.post_attention_layernorm(x))


class SupraModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, k) for k in config.attention_kinds)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class SupraOutput(ModelOutput):
    loss: torch.Tensor = None
    logits: torch.Tensor = None
    state: SupraState = None


class SupraPreTrainedModel(PreTrainedModel):
    config_class = SupraConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module):
        # Every weight comes from the checkpoint; a fresh model starts as a small random one.
        if isinstance(module, (Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, Linear) and module.lora_scale is not None:
            nn.init.normal_(module.lora_A, std=0.02)
            nn.init.zeros_(module.lora_B)


class SupraForCausalLM(SupraPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = SupraModel(config)
        # Tied embeddings are read from embed_tokens directly (no lm_head parameter to tie).
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def head_weight(self):
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def forward(self, input_ids, labels=None, state=None, use_cache=None, form="chunked",
                attention_mask=None, chunk_size=None, **kwargs):
        """Logits for `input_ids` (B, T). `state` (from an earlier call with use_cache=True)
        continues a sequence; `form="recurrent"` reads the tokens one at a time; `labels`
        gives the mean next-token cross-entropy (−100 ignored) as `loss`."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches are not supported: every row must be all tokens")
        if form not in ("chunked", "recurrent"):
            raise ValueError(f"form {form!r}: chunked or recurrent")
        keep = use_cache or state is not None or form == "recurrent"
        if keep and state is None:
            state = SupraState(len(self.model.layers))
        x = self.model.embed_tokens(input_ids)
        start = state.length if state is not None else 0
        if form == "recurrent":
            outs = []
            for j in range(x.shape[1]):
                h = x[:, j : j + 1]
                for i, layer in enumerate(self.model.layers):
                    h = layer(h, state.layers[i], start + j, 1)
                outs.append(h)
            x = torch.cat(outs, 1)
        else:
            for i, layer in enumerate(self.model.layers):
                x = layer(x, state.layers[i] if keep else None, start, chunk_size)
        if keep:
            state.length = start + input_ids.shape[1]
        logits = F.linear(self.model.norm(x), self.head_weight())
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return SupraOutput(loss=loss, logits=logits, state=state if keep else None)

    # generate(): the state is this model's own object, passed under its own name.
    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False

    def prepare_inputs_for_generation(self, input_ids, state=None, attention_mask=None, **kwargs):
        if state is not None:
            input_ids = input_ids[:, state.length :]
        return {"input_ids": input_ids, "state": state, "use_cache": True, "attention_mask": attention_mask}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1):
        model_kwargs["state"] = outputs.state
        mask = model_kwargs.get("attention_mask")
        if mask is not None:
            model_kwargs["attention_mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], num_new_tokens))], -1)
        return model_kwargs
