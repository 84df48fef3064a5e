//! The llama-family decoder in f32: embedding → N × [RMSNorm → attention → residual; RMSNorm →
//! SwiGLU → residual] → RMSNorm → LM head. Covers llama, mistral and qwen2 checkpoints.

use crate::attention::softmax::SoftmaxAttention;
use crate::config::ModelConfig;
use crate::model::linear::Linear;
use crate::model::mlp::Mlp;
use crate::model::norm::RmsNorm;
use crate::model::rope::Rope;
use crate::model::weights::Weights;
use anyhow::{anyhow, bail, Result};
use candle_core::{Device, IndexOp, Tensor, D};
use candle_nn::kv_cache::KvCache;

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    attn: SoftmaxAttention,
    mlp_norm: RmsNorm,
    mlp: Mlp,
}

#[derive(Debug, Clone)]
pub struct Llama {
    pub config: ModelConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Tensor,
    rope: Rope,
}

/// Per-sequence generation state: the KV cache of every layer and the next position.
#[derive(Debug, Clone)]
pub struct Cache {
    layers: Vec<KvCache>,
    pub pos: usize,
}

impl Cache {
    /// Bytes held by cached keys and values (what grows with the context).
    pub fn bytes(&self) -> usize {
        let len =
            |t: candle_core::Result<Option<Tensor>>| t.ok().flatten().map_or(0, |t| t.elem_count());
        self.layers
            .iter()
            .map(|c| 4 * (len(c.k()) + len(c.v())))
            .sum()
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
            Ok(Linear::new(get(&format!("{name}.weight"))?, b))
        };
        let eps = config.rms_norm_eps;
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let bias = config.attention_bias;
            blocks.push(Block {
                attn_norm: RmsNorm::new(get(&format!("{p}.input_layernorm.weight"))?, eps),
                attn: SoftmaxAttention {
                    q: linear(&format!("{p}.self_attn.q_proj"), bias)?,
                    k: linear(&format!("{p}.self_attn.k_proj"), bias)?,
                    v: linear(&format!("{p}.self_attn.v_proj"), bias)?,
                    o: linear(&format!("{p}.self_attn.o_proj"), false)?,
                    n_heads: config.num_attention_heads,
                    n_kv_heads: config.num_key_value_heads,
                    head_dim: config.head_dim,
                },
                mlp_norm: RmsNorm::new(get(&format!("{p}.post_attention_layernorm.weight"))?, eps),
                mlp: Mlp {
                    gate: linear(&format!("{p}.mlp.gate_proj"), false)?,
                    up: linear(&format!("{p}.mlp.up_proj"), false)?,
                    down: linear(&format!("{p}.mlp.down_proj"), false)?,
                },
            });
        }
        let embed = get("model.embed_tokens.weight")?;
        let lm_head = if config.tie_word_embeddings {
            embed.clone()
        } else {
            get("lm_head.weight")?
        };
        let rope = Rope::new(
            config.head_dim,
            config.rope_theta,
            config.max_position_embeddings,
            &Device::Cpu,
        )?;
        Ok(Self {
            config: config.clone(),
            embed,
            blocks,
            norm: RmsNorm::new(get("model.norm.weight")?, eps),
            lm_head,
            rope,
        })
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    pub fn new_cache(&self) -> Cache {
        let n = self.config.max_position_embeddings.min(1024);
        Cache {
            layers: (0..self.blocks.len()).map(|_| KvCache::new(2, n)).collect(),
            pos: 0,
        }
    }

    /// Final hidden states (after the last RMSNorm) for `tokens` of shape (batch, seq), whose first
    /// position is `cache.pos` (0 without a cache). Advances the cache.
    pub fn forward_hidden(&self, tokens: &Tensor, mut cache: Option<&mut Cache>) -> Result<Tensor> {
        let (_b, t) = tokens.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.pos);
        if offset + t > self.rope.max_len() {
            bail!(
                "sequence of {} tokens exceeds the model's context length {}",
                offset + t,
                self.rope.max_len()
            );
        }
        let mut x =
            self.embed
                .embedding(&tokens.flatten_all()?)?
                .reshape((tokens.dim(0)?, t, ()))?;
        for (i, block) in self.blocks.iter().enumerate() {
            let kv = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let h = block
                .attn
                .forward(&block.attn_norm.forward(&x)?, &self.rope, offset, kv)?;
            x = (x + h)?;
            let h = block.mlp.forward(&block.mlp_norm.forward(&x)?)?;
            x = (x + h)?;
        }
        if let Some(c) = cache {
            c.pos += t;
        }
        self.norm.forward(&x)
    }

    /// Logits (…, vocab) from final hidden states (…, hidden).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        // A plain 2-D matmul: candle's broadcast_matmul takes a path ~40× slower here.
        let dims = hidden.dims();
        let (lead, h) = dims.split_at(dims.len() - 1);
        let flat = hidden.reshape((lead.iter().product::<usize>(), h[0]))?;
        let mut out_shape = lead.to_vec();
        out_shape.push(self.config.vocab_size);
        Ok(flat.matmul(&self.lm_head.t()?)?.reshape(out_shape)?)
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
