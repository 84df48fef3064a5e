//! The llama-family decoder in f32: embedding → N × [RMSNorm → attention → residual; RMSNorm →
//! SwiGLU → residual] → RMSNorm → LM head. Covers llama, mistral and qwen2 checkpoints.

use crate::attention::softmax::SoftmaxAttention;
use crate::attention::supra::{group_norm_heads, Mode, SupraAttention, GROUP_NORM_EPS};
use crate::config::{AttentionKind, LoraConfig, ModelConfig};
use crate::model::linear::Linear;
use crate::model::mlp::Mlp;
use crate::model::norm::RmsNorm;
use crate::model::quant::WeightFormat;
use crate::model::rope::Rope;
use crate::model::weights::Weights;
use anyhow::{anyhow, bail, Result};
use candle_core::{Device, IndexOp, Tensor, D};
use candle_nn::kv_cache::KvCache;

#[derive(Debug, Clone)]
enum Attention {
    Softmax(SoftmaxAttention),
    Supra(SupraAttention),
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
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
    rope: Rope,
    /// RoPE over φ's features (d' may differ from the head dim).
    rope_features: Rope,
    /// The form SUPRA layers use when scoring without a cache.
    pub mode: Mode,
    /// Per layer, the teacher's Wo where it differs from the model's (attention transfer after
    /// Wo calibration).
    teacher_o: Vec<Option<Linear>>,
    /// Let softmax layers run past the trained context (long-context probes measure how
    /// they fail there).
    pub past_context: bool,
}

/// What one layer keeps between generation steps.
#[derive(Debug, Clone)]
enum LayerState {
    /// Softmax: keys and values of every position so far.
    Kv(KvCache),
    /// SUPRA: the (B, H, d', d_v) state, of constant size.
    Rnn(Option<Tensor>),
}

/// Per-sequence generation state: the KV cache of every layer and the next position.
#[derive(Debug, Clone)]
pub struct Cache {
    layers: Vec<LayerState>,
    pub pos: usize,
}

impl Cache {
    /// `n` copies of this single-sequence state as one batch of `n` sequences.
    pub fn repeat(&self, n: usize) -> Result<Cache> {
        let rows = |t: &Tensor| -> Result<Tensor> {
            if t.dim(0)? != 1 {
                bail!("only a single-sequence state repeats (batch {})", t.dim(0)?);
            }
            Ok(t.repeat((n, 1, 1, 1))?.contiguous()?)
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(match l {
                    LayerState::Kv(c) => {
                        let mut kv = KvCache::new(2, c.current_seq_len().max(1));
                        if let (Some(k), Some(v)) = (c.k()?, c.v()?) {
                            kv.append(&rows(&k)?, &rows(&v)?)?;
                        }
                        LayerState::Kv(kv)
                    }
                    LayerState::Rnn(s) => LayerState::Rnn(s.as_ref().map(rows).transpose()?),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Cache {
            layers,
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
            match l {
                LayerState::Kv(c) => {
                    if let (Some(k), Some(v)) = (c.k()?, c.v()?) {
                        out.push((format!("layers.{i}.k"), k));
                        out.push((format!("layers.{i}.v"), v));
                    }
                }
                LayerState::Rnn(Some(s)) => out.push((format!("layers.{i}.state"), s.clone())),
                LayerState::Rnn(None) => {}
            }
        }
        Ok(out)
    }

    /// Bytes of generation state: KV caches grow with the context, SUPRA states do not.
    pub fn bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let cached =
            |t: candle_core::Result<Option<Tensor>>| t.ok().flatten().map_or(0, |t| bytes(&t));
        self.layers
            .iter()
            .map(|l| match l {
                LayerState::Kv(c) => cached(c.k()) + cached(c.v()),
                LayerState::Rnn(s) => s.as_ref().map_or(0, bytes),
            })
            .sum()
    }
}

/// Gives freed heap memory back to the system. glibc keeps freed blocks below its (adaptive)
/// mmap threshold for reuse, so without this the f32 weights a quantized model let go would
/// still count in its resident memory.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl Llama {
    pub fn new(config: &ModelConfig, weights: &Weights) -> Result<Self> {
        let get = |name: &str| -> Result<Tensor> {
            weights
                .get(name)
                .cloned()
                .ok_or_else(|| anyhow!("missing tensor '{name}'"))
        };
        let linear = |name: &str, bias: bool| -> Result<Linear> {
            let b = if bias {
                Some(get(&format!("{name}.bias"))?)
            } else {
                None
            };
            let lin = Linear::new(get(&format!("{name}.weight"))?, b);
            let adapted = LoraConfig::TARGETS.iter().any(|t| name.ends_with(t));
            Ok(match (&config.lora, adapted) {
                (Some(l), true) => lin.with_lora(
                    get(&format!("{name}.lora_A"))?,
                    get(&format!("{name}.lora_B"))?,
                    l.scale(),
                ),
                _ => lin,
            })
        };
        let eps = config.rms_norm_eps;
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let bias = config.attention_bias;
            let (q, k, v, o) = (
                linear(&format!("{p}.self_attn.q_proj"), bias)?,
                linear(&format!("{p}.self_attn.k_proj"), bias)?,
                linear(&format!("{p}.self_attn.v_proj"), bias)?,
                linear(&format!("{p}.self_attn.o_proj"), false)?,
            );
            let (n_heads, n_kv_heads, head_dim) = (
                config.num_attention_heads,
                config.num_key_value_heads,
                config.head_dim,
            );
            let attn = match (config.layer_kinds[i], &config.supra) {
                (AttentionKind::Softmax, _) => Attention::Softmax(SoftmaxAttention {
                    q,
                    k,
                    v,
                    o,
                    n_heads,
                    n_kv_heads,
                    head_dim,
                }),
                (AttentionKind::Supra, Some(sc)) => Attention::Supra(SupraAttention {
                    q,
                    k,
                    v,
                    o,
                    phi_q: linear(&format!("{p}.self_attn.phi_q"), true)?,
                    phi_k: if config.separate_key_phi() {
                        Some(linear(&format!("{p}.self_attn.phi_k"), true)?)
                    } else {
                        None
                    },
                    n_heads,
                    n_kv_heads,
                    head_dim,
                    feature_dim: sc.feature_dim,
                    gammas: sc.decay.gammas(n_heads)?,
                    chunk_size: sc.chunk_size,
                }),
                (AttentionKind::Supra, None) => {
                    bail!("layer {i} is SUPRA but the config has no SUPRA parameters")
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
        let rope = Rope::new(
            config.head_dim,
            config.rope_theta,
            config.max_position_embeddings,
            &Device::Cpu,
        )?;
        let rope_features = match &config.supra {
            Some(sc) if sc.feature_dim != config.head_dim => Rope::new(
                sc.feature_dim,
                config.rope_theta,
                config.max_position_embeddings,
                &Device::Cpu,
            )?,
            _ => rope.clone(),
        };
        Ok(Self {
            config: config.clone(),
            embed,
            blocks,
            norm: RmsNorm::new(get("model.norm.weight")?, eps),
            lm_head,
            rope,
            rope_features,
            mode: Mode::Chunked,
            teacher_o: vec![None; config.num_hidden_layers],
            past_context: false,
        })
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// The longest sequence the model runs: the teacher's context while any layer is softmax
    /// attention, unbounded for a fully linear model.
    /// Stores every projection (attention q, k, v, o and φ; the MLP; the LM head) as `format`
    /// for inference. The embedding table stays f32 (a lookup reads one row per token).
    pub fn quantize(&mut self, format: WeightFormat) -> Result<()> {
        for b in &mut self.blocks {
            let mut layers = vec![&mut b.mlp.gate, &mut b.mlp.up, &mut b.mlp.down];
            match &mut b.attn {
                Attention::Softmax(a) => layers.extend([&mut a.q, &mut a.k, &mut a.v, &mut a.o]),
                Attention::Supra(a) => {
                    layers.extend([&mut a.q, &mut a.k, &mut a.v, &mut a.o, &mut a.phi_q]);
                    layers.extend(a.phi_k.as_mut());
                }
            }
            for l in layers {
                *l = l.quantized(format)?;
            }
        }
        self.lm_head = self.lm_head.quantized(format)?;
        self.teacher_o.iter_mut().for_each(|t| *t = None);
        release_freed_memory();
        Ok(())
    }

    pub fn context_limit(&self) -> Option<usize> {
        (self.has_softmax_layers() && !self.past_context)
            .then_some(self.config.max_position_embeddings)
    }

    pub fn has_softmax_layers(&self) -> bool {
        self.blocks
            .iter()
            .any(|b| matches!(b.attn, Attention::Softmax(_)))
    }

    pub fn new_cache(&self) -> Cache {
        let n = self.config.max_position_embeddings.min(1024);
        let layers = self
            .blocks
            .iter()
            .map(|b| match b.attn {
                Attention::Softmax(_) => LayerState::Kv(KvCache::new(2, n)),
                Attention::Supra(_) => LayerState::Rnn(None),
            })
            .collect();
        Cache { layers, pos: 0 }
    }

    /// The inverse of [`Cache::named_tensors`]: a single-sequence state at position `pos`,
    /// every tensor checked against this model's shapes.
    pub fn cache_from_tensors(
        &self,
        tensors: &std::collections::HashMap<String, Tensor>,
        pos: usize,
    ) -> Result<Cache> {
        let c = &self.config;
        let mut cache = self.new_cache();
        for (i, layer) in cache.layers.iter_mut().enumerate() {
            let get = |name: &str, want: &[usize]| -> Result<Option<Tensor>> {
                let key = format!("layers.{i}.{name}");
                let Some(t) = tensors.get(&key) else {
                    return Ok(None);
                };
                if t.dims() != want {
                    bail!(
                        "'{key}' has shape {:?}; this model needs {want:?}",
                        t.dims()
                    );
                }
                Ok(Some(t.to_device(self.device())?))
            };
            match layer {
                LayerState::Kv(kv) => {
                    let want = [1, c.num_key_value_heads, pos, c.head_dim];
                    match (get("k", &want)?, get("v", &want)?) {
                        (Some(k), Some(v)) => {
                            *kv = KvCache::new(2, pos.max(1));
                            kv.append(&k, &v)?;
                        }
                        (None, None) if pos == 0 => {}
                        _ => bail!("layer {i} (softmax) needs both 'layers.{i}.k' and '.v'"),
                    }
                }
                LayerState::Rnn(s) => {
                    let d = c.supra.as_ref().map_or(c.head_dim, |s| s.feature_dim);
                    *s = get("state", &[1, c.num_attention_heads, d, c.head_dim])?;
                    if s.is_none() && pos > 0 {
                        bail!("layer {i} (SUPRA) needs 'layers.{i}.state'");
                    }
                }
            }
        }
        cache.pos = pos;
        Ok(cache)
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
        let (b, t) = tokens.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.pos);
        if let Some(limit) = self.context_limit().filter(|&l| offset + t > l) {
            bail!(
                "sequence of {} tokens exceeds the model's context length {limit}",
                offset + t
            );
        }
        let mut x = self
            .embed
            .embedding(&tokens.flatten_all()?)?
            .reshape((b, t, ()))?;
        for (i, block) in self.blocks.iter().enumerate() {
            let state = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let xn = block.attn_norm.forward(&x)?;
            let h = match (&block.attn, state) {
                (Attention::Softmax(a), Some(LayerState::Kv(kv))) => {
                    a.forward(&xn, &self.rope, offset, Some(kv))?
                }
                (Attention::Softmax(a), None) => a.forward(&xn, &self.rope, offset, None)?,
                (Attention::Supra(a), Some(LayerState::Rnn(s)))
                    if b == 1 && t == 1 && !xn.track_op() =>
                {
                    a.decode_step(&xn, &self.rope_features, offset, s)?
                }
                (Attention::Supra(a), Some(LayerState::Rnn(s))) => {
                    a.forward(&xn, &self.rope_features, offset, self.mode, Some(s))?
                }
                (Attention::Supra(a), None) => {
                    a.forward(&xn, &self.rope_features, offset, self.mode, None)?
                }
                _ => bail!("layer {i}: the cache does not belong to this model"),
            };
            x = (x + h)?;
            let h = block.mlp.forward(&block.mlp_norm.forward(&x)?)?;
            x = (x + h)?;
        }
        if let Some(c) = cache {
            c.pos += t;
        }
        self.norm.forward(&x)
    }

    /// Declares that each listed layer's Wo was multiplied per head by `scales`, so that the
    /// teacher (used by [`Self::transfer_loss`]) divides them out again.
    pub fn set_teacher_output_scales(&mut self, scales: &[Option<Vec<f32>>]) -> Result<()> {
        for (i, s) in scales.iter().enumerate() {
            let (
                Some(s),
                Some(Block {
                    attn: Attention::Supra(a),
                    ..
                }),
            ) = (s, self.blocks.get(i))
            else {
                continue;
            };
            let cols = crate::train::recipe::head_columns(s, a.head_dim)?;
            let w = a.o.weight()?.broadcast_div(&cols)?;
            self.teacher_o[i] = Some(Linear::new(w, None));
        }
        Ok(())
    }

    /// Runs the teacher — each SUPRA layer replaced by softmax attention on its own q, k, v, o —
    /// and shows every SUPRA layer (by index) its input and the teacher's per-head output there.
    /// Hidden states are detached between layers: nothing learned here crosses a layer.
    fn teacher_walk(
        &self,
        tokens: &Tensor,
        mut visit: impl FnMut(usize, &SupraAttention, &Tensor, &Tensor) -> Result<()>,
    ) -> Result<()> {
        let (b, t) = tokens.dims2()?;
        let mut x = self
            .embed
            .embedding(&tokens.flatten_all()?)?
            .reshape((b, t, ()))?;
        for (i, block) in self.blocks.iter().enumerate() {
            let xn = block.attn_norm.forward(&x)?;
            let h = match &block.attn {
                Attention::Softmax(a) => a.forward(&xn, &self.rope, 0, None)?,
                Attention::Supra(a) => {
                    let y = a.teacher().heads_output(&xn, &self.rope, 0, None)?.detach();
                    visit(i, a, &xn, &y)?;
                    let o = self.teacher_o[i].as_ref().unwrap_or(&a.o);
                    o.forward(&y.transpose(1, 2)?.reshape((b, t, ()))?)?
                }
            };
            x = (x + h)?.detach();
            let h = block.mlp.forward(&block.mlp_norm.forward(&x)?)?;
            x = (x + h)?.detach();
        }
        Ok(())
    }

    /// Attention transfer (LoLCATs stage 1). For each SUPRA layer, the mean squared error
    /// between its per-head output (after GroupNorm, before Wo) and the teacher's softmax output
    /// on the same input, GroupNorm'd the same way: the student can only produce per-head
    /// normalized outputs, so the target is the teacher's output in that form. Each layer's loss
    /// reaches only that layer's φ. Returns the mean over SUPRA layers.
    pub fn transfer_loss(&self, tokens: &Tensor) -> Result<Tensor> {
        let mut losses = Vec::new();
        self.teacher_walk(tokens, |_, a, xn, y| {
            let target = group_norm_heads(y, GROUP_NORM_EPS)?;
            let student = a.heads_output(xn, &self.rope_features, 0, Mode::Chunked, None)?;
            losses.push((student - target)?.sqr()?.mean_all()?);
            Ok(())
        })?;
        if losses.is_empty() {
            bail!("attention transfer needs SUPRA layers; this model has none (run `supra convert` first)");
        }
        let n = losses.len() as f64;
        Ok((Tensor::stack(&losses, 0)?.sum_all()? / n)?)
    }

    /// For each SUPRA layer, the teacher's per-head attention output RMS (before Wo) averaged
    /// over batch and tokens; `None` for softmax layers. GroupNorm removes this scale; the
    /// transfer recipe puts it back into Wo.
    pub fn teacher_head_rms(&self, tokens: &Tensor) -> Result<Vec<Option<Vec<f64>>>> {
        let mut out = vec![None; self.blocks.len()];
        self.teacher_walk(tokens, |i, _, _, y| {
            // (b, h, t, d) → per-token RMS (b, h, t) → mean over batch and tokens (h).
            let rms = y.sqr()?.mean(3)?.sqrt()?.mean(2)?.mean(0)?;
            out[i] = Some(rms.to_vec1::<f32>()?.into_iter().map(f64::from).collect());
            Ok(())
        })?;
        Ok(out)
    }

    /// Logits (…, vocab) from final hidden states (…, hidden).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        // A plain 2-D product: candle's broadcast_matmul takes a path ~40× slower here.
        let dims = hidden.dims();
        let (lead, h) = dims.split_at(dims.len() - 1);
        let flat = hidden.reshape((lead.iter().product::<usize>(), h[0]))?;
        let mut out_shape = lead.to_vec();
        out_shape.push(self.config.vocab_size);
        Ok(self.lm_head.forward(&flat)?.reshape(out_shape)?)
    }

    /// Logits of the last position only: what generation needs.
    pub fn forward_last(&self, tokens: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let h = self.forward_hidden(tokens, Some(cache))?;
        let t = h.dim(1)?;
        self.logits(&h.i((.., t - 1..t, ..))?)?
            .squeeze(1)
            .map_err(Into::into)
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
            let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let targets = Tensor::new(&ids[start + 1..start + 1 + len], self.device())?;
            let picked = lsm.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
            out.extend(picked.to_vec1::<f32>()?);
            start += len;
        }
        Ok(out)
    }
}
