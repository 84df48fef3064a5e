//! The llama-family decoder in f32: embedding → N × [RMSNorm → attention → residual; RMSNorm →
//! SwiGLU → residual] → RMSNorm → LM head. Covers llama, mistral and qwen2 checkpoints.

use crate::attention::feature_map::FeatureMap;
use crate::attention::softmax::SoftmaxAttention;
use crate::attention::supra::HeadDecays;
use crate::attention::supra::SupraAttention;
use crate::attention::window::{Branches, Span, WindowAttention};
use crate::attention::{Cell, CellState, Exec, Projections};
use crate::config::{AttentionKind, Decay, FeatureKind, LinearRule, ModelConfig, SupraConfig};
use crate::model::linear::{Linear, GEMV_MAX_ROWS};
use crate::model::mlp::Mlp;
use crate::model::norm::RmsNorm;
use crate::model::quant::WeightFormat;
use crate::model::rope::Rope;
use crate::model::weights::Weights;
use anyhow::{anyhow, bail, ensure, Result};
use candle_core::{Device, IndexOp, Tensor, D};

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    attn: Cell,
    mlp_norm: RmsNorm,
    mlp: Mlp,
}

#[derive(Debug, Clone)]
pub struct Llama {
    pub config: ModelConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    /// Training or inference, fixed at construction: every layer takes the matching forms.
    exec: Exec,
    /// Let softmax layers run past the trained context (long-context probes measure how
    /// they fail there).
    pub past_context: bool,
}

/// How [`Llama::score_with`] reads a sequence; the three compute the same function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// The training form in one chunk: for SUPRA layers the quadratic parallel form.
    Parallel,
    /// The inference form: chunked prefill.
    Chunked,
    /// One token at a time through the state: the decoding step.
    Recurrent,
}

impl std::str::FromStr for Form {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "parallel" => Self::Parallel,
            "chunked" => Self::Chunked,
            "recurrent" => Self::Recurrent,
            other => bail!("unknown form '{other}' (known: parallel, chunked, recurrent)"),
        })
    }
}

/// Per-sequence generation state: the state of every layer and the next position.
#[derive(Debug, Clone)]
pub struct Cache {
    layers: Vec<CellState>,
    pub pos: usize,
}

impl Cache {
    /// `n` copies of this single-sequence state as one batch of `n` sequences.
    pub fn repeat(&self, n: usize) -> Result<Cache> {
        Ok(Cache {
            layers: self
                .layers
                .iter()
                .map(|l| l.repeat(n))
                .collect::<Result<_>>()?,
            pos: self.pos,
        })
    }

    /// A deep copy. Softmax layers write new keys into their KV buffer in place, so two
    /// continuations of one state must not share it.
    pub fn fork(&self) -> Result<Cache> {
        self.repeat(1)
    }

    /// The state's tensors by name, for saving: `layers.{i}.k` and `.v` (1, kv heads, pos,
    /// head dim) for softmax layers, `layers.{i}.state` (1, heads, d', d_v) for SUPRA layers.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            out.extend(l.named_tensors(&format!("layers.{i}"))?);
        }
        Ok(out)
    }

    /// Bytes of generation state: KV caches grow with the context, SUPRA states do not.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(CellState::bytes).sum()
    }
}

impl Llama {
    /// The model for inference.
    pub fn new(config: &ModelConfig, weights: &Weights) -> Result<Self> {
        Self::build(config, weights, Exec::Infer)
    }

    /// The model for training: every layer in its differentiable form.
    pub fn for_training(config: &ModelConfig, weights: &Weights) -> Result<Self> {
        Self::build(config, weights, Exec::Train)
    }

    fn build(config: &ModelConfig, weights: &Weights, exec: Exec) -> Result<Self> {
        let get = |name: &str| -> Result<Tensor> {
            weights
                .get(name)
                .cloned()
                .ok_or_else(|| anyhow!("missing tensor '{name}'"))
        };
        let table = crate::model::params::by_name(config);
        let linear = |name: &str, bias: bool| -> Result<Linear> {
            let b = if bias {
                Some(get(&format!("{name}.bias"))?)
            } else {
                None
            };
            let lin = Linear::new(get(&format!("{name}.weight"))?, b);
            let adapted = table
                .get(&format!("{name}.weight"))
                .is_some_and(|p| p.lora_target);
            Ok(match (&config.lora, adapted) {
                (Some(l), true) => lin.with_lora(
                    get(&format!("{name}.lora_A"))?,
                    get(&format!("{name}.lora_B"))?,
                    l.scale(),
                ),
                _ => lin,
            })
        };
        let rope = |dim: usize| {
            Rope::new(
                dim,
                config.rope_theta,
                config.max_position_embeddings,
                &Device::Cpu,
            )
        };
        let head_rope = rope(config.head_dim)?;
        let feature_rope = match &config.supra {
            Some(sc) if !sc.feature_map.per_head() && sc.feature_dim != config.head_dim => {
                rope(sc.feature_dim)?
            }
            _ => head_rope.clone(),
        };
        let feature_map = |p: &str| -> Result<FeatureMap> {
            let sc = config
                .supra
                .as_ref()
                .ok_or_else(|| anyhow!("no SUPRA parameters"))?;
            let a = format!("{p}.self_attn");
            Ok(match sc.feature_map {
                FeatureKind::Relu => FeatureMap::Relu {
                    q: linear(&format!("{a}.phi_q"), true)?,
                    k: if config.separate_key_phi() {
                        Some(linear(&format!("{a}.phi_k"), true)?)
                    } else {
                        None
                    },
                },
                FeatureKind::Hedgehog => FeatureMap::Hedgehog {
                    q: get(&format!("{a}.phi_q.weight"))?,
                    k: get(&format!("{a}.phi_k.weight"))?,
                },
                FeatureKind::Taylor => FeatureMap::Taylor {
                    q: get(&format!("{a}.phi_q.weight"))?,
                    k: get(&format!("{a}.phi_k.weight"))?,
                },
            })
        };
        let decays = |p: &str| -> Result<HeadDecays> {
            let sc = config
                .supra
                .as_ref()
                .ok_or_else(|| anyhow!("no SUPRA parameters"))?;
            Ok(match sc.decay {
                Decay::Learnable => {
                    HeadDecays::Learned(get(&format!("{p}.self_attn.decay_logit"))?)
                }
                ref fixed => HeadDecays::Fixed(fixed.gammas(config.num_attention_heads)?),
            })
        };
        let eps = config.rms_norm_eps;
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let bias = config.attention_bias;
            let proj = Projections {
                q: linear(&format!("{p}.self_attn.q_proj"), bias)?,
                k: linear(&format!("{p}.self_attn.k_proj"), bias)?,
                v: linear(&format!("{p}.self_attn.v_proj"), bias)?,
                o: linear(&format!("{p}.self_attn.o_proj"), false)?,
                n_heads: config.num_attention_heads,
                n_kv_heads: config.num_key_value_heads,
                head_dim: config.head_dim,
            };
            let attn = match (config.layer_kinds[i], &config.supra) {
                (AttentionKind::Softmax, _) => Cell::Softmax(SoftmaxAttention {
                    proj,
                    rope: head_rope.clone(),
                }),
                (AttentionKind::Supra, Some(sc)) => Cell::Supra(SupraAttention {
                    proj,
                    phi: feature_map(&p)?,
                    feature_dim: sc.feature_dim,
                    gammas: decays(&p)?,
                    chunk_size: sc.chunk_size,
                    rope: if sc.feature_map.per_head() {
                        head_rope.clone()
                    } else {
                        feature_rope.clone()
                    },
                }),
                (
                    AttentionKind::Window,
                    Some(
                        sc @ SupraConfig {
                            window: Some(w), ..
                        },
                    ),
                ) => Cell::Window(WindowAttention {
                    proj,
                    phi: feature_map(&p)?,
                    mix_logit: get(&format!("{p}.self_attn.window_mix"))?,
                    mix: w.mix,
                    feature_dim: sc.feature_dim,
                    gammas: decays(&p)?,
                    delta: match w.rule {
                        LinearRule::Add => None,
                        LinearRule::Delta => Some(get(&format!("{p}.self_attn.window_beta"))?),
                    },
                    chunk_size: sc.chunk_size,
                    span: Span {
                        window: w.window,
                        sinks: w.sinks,
                        sink_positions: w.sink_positions,
                    },
                    rope: head_rope.clone(),
                    branches: Branches::Both,
                }),
                (kind, _) => {
                    bail!(
                        "layer {i} is {} but the config has no parameters for it",
                        kind.name()
                    )
                }
            };
            blocks.push(Block {
                attn_norm: RmsNorm::new(get(&format!("{p}.input_layernorm.weight"))?, eps),
                attn,
                mlp_norm: RmsNorm::new(get(&format!("{p}.post_attention_layernorm.weight"))?, eps),
                mlp: Mlp {
                    gate: linear(&format!("{p}.mlp.gate_proj"), false)?,
                    up: linear(&format!("{p}.mlp.up_proj"), false)?,
                    down: linear(&format!("{p}.mlp.down_proj"), false)?,
                },
            });
        }
        let embed = get("model.embed_tokens.weight")?;
        let lm_head = Linear::new(
            if config.tie_word_embeddings {
                embed.clone()
            } else {
                get("lm_head.weight")?
            },
            None,
        );
        Ok(Self {
            config: config.clone(),
            embed,
            blocks,
            norm: RmsNorm::new(get("model.norm.weight")?, eps),
            lm_head,
            exec,
            past_context: false,
        })
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// Stores every projection (attention and φ; the MLP; the LM head) as `format` for
    /// inference. The embedding table stays f32 (a lookup reads one row per token).
    pub fn quantize(&mut self, format: WeightFormat) -> Result<()> {
        if self.exec == Exec::Train {
            bail!("a model built for training cannot be quantized");
        }
        for b in &mut self.blocks {
            let mut layers = vec![&mut b.mlp.gate, &mut b.mlp.up, &mut b.mlp.down];
            layers.extend(b.attn.linears_mut());
            for l in layers {
                *l = l.quantized(format)?;
            }
        }
        self.lm_head = self.lm_head.quantized(format)?;
        crate::heap::release_freed();
        Ok(())
    }

    /// The longest sequence the model runs: the teacher's context while any layer keeps a KV
    /// cache (positions past it were never trained), unbounded for a fully linear model.
    pub fn context_limit(&self) -> Option<usize> {
        (self.has_softmax_layers() && !self.past_context)
            .then_some(self.config.max_position_embeddings)
    }

    pub fn has_softmax_layers(&self) -> bool {
        self.blocks.iter().any(|b| b.attn.state_grows())
    }

    /// Per layer, the bytes of one sequence's state after each of `lens` tokens.
    pub fn state_bytes_by_layer(&self, lens: &[usize]) -> Vec<Vec<usize>> {
        self.blocks
            .iter()
            .map(|b| lens.iter().map(|&n| b.attn.state_bytes(n)).collect())
            .collect()
    }

    /// Runs every window layer with only some of its branches (controls); no effect on other
    /// layers.
    pub fn set_branches(&mut self, branches: Branches) {
        for b in &mut self.blocks {
            if let Cell::Window(a) = &mut b.attn {
                a.branches = branches;
            }
        }
    }

    /// Runs every window layer with a window of `window` tokens (the sinks unchanged); no
    /// effect on other layers. Training draws shorter windows than the config's
    /// (`--min-window`) so that the linear state must carry what the window drops.
    pub fn set_window(&mut self, window: usize) {
        for b in &mut self.blocks {
            if let Cell::Window(a) = &mut b.attn {
                a.span.window = window;
            }
        }
    }

    /// Sets the chunk size of every layer's chunked forms.
    pub fn set_chunk_size(&mut self, chunk: usize) {
        for b in &mut self.blocks {
            b.attn.set_chunk_size(chunk);
        }
    }

    pub fn new_cache(&self) -> Cache {
        let n = self.config.max_position_embeddings.min(1024);
        let layers = self.blocks.iter().map(|b| b.attn.new_state(n)).collect();
        Cache { layers, pos: 0 }
    }

    /// The inverse of [`Cache::named_tensors`]: a single-sequence state at position `pos`,
    /// every tensor checked against this model's shapes.
    pub fn cache_from_tensors(
        &self,
        tensors: &std::collections::HashMap<String, Tensor>,
        pos: usize,
    ) -> Result<Cache> {
        let layers = self
            .blocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                b.attn
                    .state_from_tensors(tensors, &format!("layers.{i}"), pos)
            })
            .collect::<Result<_>>()?;
        Ok(Cache { layers, pos })
    }

    /// Reads `ids` into `cache` in chunks of at most `chunk` tokens (a softmax layer's scores
    /// are chunk × context, not context²) and returns the logits (1, vocab) after the last.
    pub fn prefill(&self, cache: &mut Cache, ids: &[u32], chunk: usize) -> Result<Tensor> {
        if ids.is_empty() {
            bail!("nothing to read: the token list is empty");
        }
        // Only the last position's logits are wanted: the chunks before it stop at the hidden
        // states.
        let chunk = chunk.max(1);
        let (rest, last) = ids.split_at((ids.len() - 1) / chunk * chunk);
        let input = |piece: &[u32]| -> Result<Tensor> {
            Ok(Tensor::new(piece, self.device())?.unsqueeze(0)?)
        };
        for piece in rest.chunks(chunk) {
            self.forward_hidden(&input(piece)?, Some(cache))?;
        }
        self.forward_last(&input(last)?, cache)
    }

    /// Final hidden states (after the last RMSNorm) for `tokens` of shape (batch, seq), whose first
    /// position is `cache.pos` (0 without a cache). Advances the cache.
    pub fn forward_hidden(&self, tokens: &Tensor, mut cache: Option<&mut Cache>) -> Result<Tensor> {
        let t = tokens.dim(1)?;
        let offset = cache.as_ref().map_or(0, |c| c.pos);
        if let Some(limit) = self.context_limit().filter(|&l| offset + t > l) {
            bail!(
                "sequence of {} tokens exceeds the model's context length {limit}",
                offset + t
            );
        }
        let exec = self.exec;
        let h = self.forward_with(tokens, exec, |i, cell, xn| {
            let state = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            cell.forward(xn, offset, state, exec)
        })?;
        if let Some(c) = cache {
            c.pos += t;
        }
        Ok(h)
    }

    /// The decoder with a hook in place of each layer's attention: `attend(layer, cell, x)`
    /// gets the layer's normalized input x (batch, seq, hidden) and returns what goes into the
    /// residual stream. Norms and MLPs run as `exec` says. Returns the final hidden states.
    pub fn forward_with(
        &self,
        tokens: &Tensor,
        exec: Exec,
        mut attend: impl FnMut(usize, &Cell, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let mut x = self
            .embed
            .embedding(&tokens.flatten_all()?)?
            .reshape((b, t, ()))?;
        for (i, block) in self.blocks.iter().enumerate() {
            let h = attend(i, &block.attn, &block.attn_norm.forward(&x, exec)?)?;
            x = (x + h)?;
            let h = block
                .mlp
                .forward(&block.mlp_norm.forward(&x, exec)?, exec)?;
            x = (x + h)?;
        }
        self.norm.forward(&x, exec)
    }

    /// Logits (…, vocab) from final hidden states (…, hidden).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        // A plain 2-D product: candle's broadcast_matmul takes a path ~40× slower here.
        let dims = hidden.dims();
        let (lead, h) = dims.split_at(dims.len() - 1);
        let flat = hidden.reshape((lead.iter().product::<usize>(), h[0]))?;
        let mut out_shape = lead.to_vec();
        out_shape.push(self.config.vocab_size);
        Ok(self.lm_head.forward(&flat, self.exec)?.reshape(out_shape)?)
    }

    /// Logits of the last position only: what generation needs.
    pub fn forward_last(&self, tokens: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let h = self.forward_hidden(tokens, Some(cache))?;
        let t = h.dim(1)?;
        self.logits(&h.i((.., t - 1..t, ..))?)?
            .squeeze(1)
            .map_err(Into::into)
    }

    /// One decoding step of several sequences at once: `ids[b]` read into `caches[b]`, each at
    /// its own position. The products run once for all rows (the weights read once per step, per
    /// group of [`GEMV_MAX_ROWS`] sequences);
    /// every row goes through the same kernels a lone sequence's step takes, so row b of the
    /// logits (B, vocab) is what that sequence alone would give, bit for bit.
    pub fn decode_step(&self, ids: &[u32], caches: &mut [&mut Cache]) -> Result<Tensor> {
        ensure!(
            ids.len() == caches.len() && !ids.is_empty(),
            "a decoding step takes one token per sequence ({} tokens for {} sequences)",
            ids.len(),
            caches.len()
        );
        ensure!(self.exec == Exec::Infer, "decoding steps run in inference");
        if ids.len() > GEMV_MAX_ROWS {
            let mut parts = Vec::new();
            for (ids, caches) in ids
                .chunks(GEMV_MAX_ROWS)
                .zip(caches.chunks_mut(GEMV_MAX_ROWS))
            {
                parts.push(self.decode_step(ids, caches)?);
            }
            return Ok(Tensor::cat(&parts, 0)?);
        }
        let offsets: Vec<usize> = caches.iter().map(|c| c.pos).collect();
        if let Some(limit) = self.context_limit() {
            if let Some(p) = offsets.iter().find(|&&p| p + 1 > limit) {
                bail!(
                    "sequence of {} tokens exceeds the model's context length {limit}",
                    p + 1
                );
            }
        }
        let tokens = Tensor::from_vec(ids.to_vec(), (ids.len(), 1), self.device())?;
        let h = self.forward_with(&tokens, Exec::Infer, |i, cell, xn| {
            let mut states: Vec<&mut CellState> =
                caches.iter_mut().map(|c| &mut c.layers[i]).collect();
            cell.step_batch(xn, &offsets, &mut states)
        })?;
        for c in caches.iter_mut() {
            c.pos += 1;
        }
        Ok(self.logits(&h)?.squeeze(1)?)
    }

    /// [`Llama::decode_step`] for `ids` and, in the same pass over the weights, the next piece
    /// of one more sequence's prompt (`piece`, read into `piece_cache`, as
    /// [`Llama::forward_last`] reads it): the server's pass while a prompt is being read. The
    /// MLPs and the LM head take the step's rows and the piece's together, each layer's
    /// attention the two apart (the step's rows as a step, the piece as a prompt's piece), so
    /// every row's values are what the two calls would give, bit for bit, as long as the
    /// products' rows are independent ([`Llama::can_read_beside_steps`]). Returns the step's
    /// logits (B, vocab) and the piece's last position's (1, vocab).
    pub fn step_and_read(
        &self,
        ids: &[u32],
        caches: &mut [&mut Cache],
        piece: &[u32],
        piece_cache: &mut Cache,
    ) -> Result<(Tensor, Tensor)> {
        let (b, p) = (ids.len(), piece.len());
        ensure!(
            self.can_read_beside_steps(b + p) && b == caches.len() && b > 0 && p > 0,
            "a step of {b} rows and a piece of {p} prompt tokens cannot share a pass"
        );
        let offsets: Vec<usize> = caches.iter().map(|c| c.pos).collect();
        let at = piece_cache.pos;
        if let Some(limit) = self.context_limit() {
            let longest = offsets.iter().map(|o| o + 1).chain([at + p]).max();
            if let Some(n) = longest.filter(|&n| n > limit) {
                bail!("sequence of {n} tokens exceeds the model's context length {limit}");
            }
        }
        let all: Vec<u32> = ids.iter().chain(piece).copied().collect();
        let tokens = Tensor::from_vec(all, (1, b + p), self.device())?;
        let h = self.forward_with(&tokens, Exec::Infer, |i, cell, xn| {
            let step = xn.narrow(1, 0, b)?.reshape((b, 1, ()))?;
            let mut states: Vec<&mut CellState> =
                caches.iter_mut().map(|c| &mut c.layers[i]).collect();
            let stepped = cell.step_batch(&step, &offsets, &mut states)?;
            let read = cell.forward(
                &xn.narrow(1, b, p)?,
                at,
                Some(&mut piece_cache.layers[i]),
                Exec::Infer,
            )?;
            Ok(Tensor::cat(&[stepped.reshape((1, b, ()))?, read], 1)?)
        })?;
        for c in caches.iter_mut() {
            c.pos += 1;
        }
        piece_cache.pos += p;
        // The step's rows and the piece's last: one product with the LM head.
        let rows = Tensor::cat(&[h.narrow(1, 0, b)?, h.narrow(1, b + p - 1, 1)?], 1)?;
        let logits = self.logits(&rows)?.squeeze(0)?;
        Ok((logits.narrow(0, 0, b)?, logits.narrow(0, b, 1)?))
    }

    /// Whether `rows` rows can share the MLPs' and the LM head's products without changing any
    /// row's values: always with quantized weights, with f32 up to [`GEMV_MAX_ROWS`].
    pub fn can_read_beside_steps(&self, rows: usize) -> bool {
        self.exec == Exec::Infer
            && (rows <= GEMV_MAX_ROWS
                || self.lm_head.is_quantized()
                    && self.blocks.iter().all(|b| {
                        [&b.mlp.gate, &b.mlp.up, &b.mlp.down]
                            .iter()
                            .all(|l| l.is_quantized())
                    }))
    }

    /// Log-probability of each next token: for each sequence of n tokens, n−1 values
    /// log p(ids[i+1] | ids[..=i]). Sequences of different lengths run as one right-padded batch
    /// (the causal mask keeps padding out of real positions).
    pub fn score_batch(&self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let max_len = seqs.iter().map(Vec::len).max().unwrap_or(0);
        if max_len < 2 {
            return Ok(seqs.iter().map(|_| Vec::new()).collect());
        }
        let pad = self.config.eos_token_id.unwrap_or(0);
        let flat: Vec<u32> = seqs
            .iter()
            .flat_map(|s| {
                s.iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad, max_len - s.len()))
            })
            .collect();
        let tokens = Tensor::from_vec(flat, (seqs.len(), max_len), self.device())?;
        let hidden = self.forward_hidden(&tokens, None)?;
        let mut out = Vec::with_capacity(seqs.len());
        for (b, s) in seqs.iter().enumerate() {
            out.push(self.next_token_logprobs(&hidden.i(b)?, s)?);
        }
        Ok(out)
    }

    /// Log-probabilities of one sequence's next tokens (as [`Self::score_batch`]) through the
    /// given form: a check that the forms agree, and what `supra score --mode` runs.
    pub fn score_with(&self, ids: &[u32], form: Form) -> Result<Vec<f32>> {
        match form {
            Form::Chunked if self.exec == Exec::Infer => Ok(self
                .score_batch(std::slice::from_ref(&ids.to_vec()))?
                .remove(0)),
            Form::Chunked => {
                let mut m = self.clone();
                m.exec = Exec::Infer;
                m.score_with(ids, form)
            }
            Form::Parallel => {
                let mut m = self.clone();
                m.exec = Exec::Train;
                m.set_chunk_size(usize::MAX);
                Ok(m.score_batch(std::slice::from_ref(&ids.to_vec()))?
                    .remove(0))
            }
            Form::Recurrent => {
                let mut m = self.clone();
                m.exec = Exec::Infer;
                let mut cache = m.new_cache();
                let mut hidden = Vec::with_capacity(ids.len());
                for &id in ids {
                    let x = Tensor::new(&[id], m.device())?.unsqueeze(0)?;
                    hidden.push(m.forward_hidden(&x, Some(&mut cache))?.squeeze(0)?);
                }
                m.next_token_logprobs(&Tensor::cat(&hidden, 0)?, ids)
            }
        }
    }

    /// log p(ids[i+1] | ..) from one sequence's hidden states (seq, hidden). The vocabulary
    /// projection runs in slices so long texts never hold every position's logits at once.
    pub fn next_token_logprobs(&self, hidden: &Tensor, ids: &[u32]) -> Result<Vec<f32>> {
        const SLICE: usize = 256;
        let n = ids.len().saturating_sub(1);
        let mut out = Vec::with_capacity(n);
        let mut start = 0;
        while start < n {
            let len = SLICE.min(n - start);
            let logits = self.logits(&hidden.narrow(0, start, len)?)?;
            let lsm = log_softmax_f64(&logits)?;
            let targets = Tensor::new(&ids[start + 1..start + 1 + len], self.device())?;
            let picked = lsm.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
            // Models run in f64 too (examples/conditioning), log-probs are reported in f32.
            out.extend(picked.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?);
            start += len;
        }
        Ok(out)
    }
}

/// Log-softmax over the last axis in f64. Its sum of exponentials in f32 (49,152 of them one
/// after another) came out short: every log-prob ~1.2e-4 too high against transformers and
/// against the same model in PyTorch, far above the f32 forward's own ~1e-5.
pub fn log_softmax_f64(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(
        &logits.to_dtype(candle_core::DType::F64)?,
        D::Minus1,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Mix, SinkPositions, WindowConfig};
    use crate::convert::{convert, ConvertOptions};
    use crate::testing::tiny_loaded;

    /// Every kind of layer in one model each: softmax beside SUPRA; window + linear beside
    /// SUPRA.
    fn every_kind_of_layer(dir: &std::path::Path) -> [crate::io::LoadedModel; 2] {
        let hybrid = tiny_loaded(dir, 3, Some(&[1])).unwrap();
        let teacher = tiny_loaded(dir, 3, None).unwrap();
        let window = convert(
            &teacher,
            &ConvertOptions {
                window: Some(WindowConfig {
                    window: 4,
                    sinks: 1,
                    mix: Mix::Shared,
                    sink_positions: SinkPositions::Cache,
                    rule: crate::config::LinearRule::Add,
                }),
                supra_layers: vec![0],
                mix_share: Some(0.3),
                ..Default::default()
            },
        )
        .unwrap();
        [hybrid, window]
    }

    /// Every kind of layer in one model each (softmax beside SUPRA; window + linear beside
    /// SUPRA), in f32 and Q8_0: sequences at different positions stepped together (more of them
    /// than one group of rows) give each the logits it gets stepped alone, exactly.
    #[test]
    fn a_batched_decoding_step_gives_each_row_its_lone_logits() {
        let dir = tempfile::tempdir().unwrap();
        let [hybrid, window] = every_kind_of_layer(dir.path());
        for loaded in [&hybrid, &window] {
            for format in [WeightFormat::F32, WeightFormat::Q8_0] {
                let mut model = Llama::new(&loaded.config, &loaded.weights).unwrap();
                if format != WeightFormat::F32 {
                    model.quantize(format).unwrap();
                }
                // More sequences than one group of GEMV_MAX_ROWS, at different positions.
                let prompts: Vec<Vec<u32>> = (0..GEMV_MAX_ROWS + 2)
                    .map(|n| {
                        (0..1 + n * 7 % 17)
                            .map(|i| (i * 11 % 40) as u32 + 2)
                            .collect()
                    })
                    .collect();
                let rows = prompts.len() as u32;
                let fresh = || -> Vec<Cache> {
                    prompts
                        .iter()
                        .map(|p| {
                            let mut c = model.new_cache();
                            model.prefill(&mut c, p, 4).unwrap();
                            c
                        })
                        .collect()
                };
                let (mut alone, mut together) = (fresh(), fresh());
                for step in 0..6u32 {
                    let ids: Vec<u32> = (0..rows).map(|b| 5 + 7 * b % 31 + step).collect();
                    let mut refs: Vec<&mut Cache> = together.iter_mut().collect();
                    let batch: Vec<Vec<f32>> = model
                        .decode_step(&ids, &mut refs)
                        .unwrap()
                        .to_vec2()
                        .unwrap();
                    for (b, cache) in alone.iter_mut().enumerate() {
                        let x = Tensor::new(&[ids[b]], model.device()).unwrap().unsqueeze(0);
                        let one: Vec<f32> = model
                            .forward_last(&x.unwrap(), cache)
                            .unwrap()
                            .squeeze(0)
                            .unwrap()
                            .to_vec1()
                            .unwrap();
                        assert_eq!(one, batch[b], "row {b} at step {step} ({format:?})");
                        assert_eq!(cache.pos, together[b].pos);
                    }
                }
            }
        }
    }

    /// A step and a prompt's piece in one pass give what the step and the piece give apart,
    /// bit for bit (every kind of layer, f32 with rows that fit the matrix-vector path and
    /// Q8_0 with more), the states included (the same next logits after it), and a pass that
    /// cannot keep that is refused.
    #[test]
    fn a_step_and_a_prompt_piece_share_a_pass_without_changing_either() {
        let dir = tempfile::tempdir().unwrap();
        let [hybrid, window] = every_kind_of_layer(dir.path());
        let prompt: Vec<u32> = (0..23).map(|i| (i * 13 % 37) as u32 + 2).collect();
        for loaded in [&hybrid, &window] {
            for (format, piece) in [(WeightFormat::F32, 5), (WeightFormat::Q8_0, 9)] {
                let mut model = Llama::new(&loaded.config, &loaded.weights).unwrap();
                if format != WeightFormat::F32 {
                    model.quantize(format).unwrap();
                }
                let seqs: Vec<Vec<u32>> = (0..3)
                    .map(|n| (0..2 + 5 * n).map(|i| (i * 7 % 29) as u32 + 3).collect())
                    .collect();
                let fresh = || -> (Vec<Cache>, Cache) {
                    let caches = seqs
                        .iter()
                        .map(|p| {
                            let mut c = model.new_cache();
                            model.prefill(&mut c, p, 4).unwrap();
                            c
                        })
                        .collect();
                    (caches, model.new_cache())
                };
                let (mut apart, mut reader_apart) = fresh();
                let (mut shared, mut reader_shared) = fresh();
                for (n, part) in prompt.chunks(piece).enumerate() {
                    let ids: Vec<u32> = (0..seqs.len() as u32)
                        .map(|b| 4 + 3 * b + n as u32)
                        .collect();
                    let mut refs: Vec<&mut Cache> = apart.iter_mut().collect();
                    let want_step = model.decode_step(&ids, &mut refs).unwrap();
                    let want_last = model
                        .forward_last(
                            &Tensor::new(part, model.device())
                                .unwrap()
                                .unsqueeze(0)
                                .unwrap(),
                            &mut reader_apart,
                        )
                        .unwrap();
                    let mut refs: Vec<&mut Cache> = shared.iter_mut().collect();
                    let (step, last) = model
                        .step_and_read(&ids, &mut refs, part, &mut reader_shared)
                        .unwrap();
                    let v = |t: &Tensor| -> Vec<Vec<f32>> { t.to_vec2().unwrap() };
                    assert_eq!(v(&step), v(&want_step), "step rows, piece {n} ({format:?})");
                    assert_eq!(v(&last), v(&want_last), "piece {n}'s logits ({format:?})");
                    assert_eq!(reader_shared.pos, reader_apart.pos);
                }
                // f32 past the matrix-vector path's rows would change the products' values.
                if format == WeightFormat::F32 {
                    let mut refs: Vec<&mut Cache> = shared.iter_mut().collect();
                    let long = vec![3u32; GEMV_MAX_ROWS];
                    let err = model
                        .step_and_read(&[3, 4, 5], &mut refs, &long, &mut reader_shared)
                        .unwrap_err();
                    assert!(err.to_string().contains("cannot share a pass"), "{err}");
                }
            }
        }
    }
}
