//! GGUF (v2/v3) → config, f32 tensors in HF naming and layout, tokenizer.

use crate::config::{check_layer_count, Arch, AttentionKind, ModelConfig};
use crate::io::tokenizer::TextTokenizer;
use crate::io::LoadedModel;
use crate::model::weights::{check_weights, Weights};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

pub type Metadata = HashMap<String, Value>;

pub fn md_get<'a>(md: &'a Metadata, key: &str, source: &str) -> Result<&'a Value> {
    md.get(key)
        .ok_or_else(|| anyhow!("{source}: missing metadata key '{key}'"))
}

pub fn md_str<'a>(md: &'a Metadata, key: &str, source: &str) -> Result<&'a String> {
    md_get(md, key, source)?
        .to_string()
        .map_err(|e| anyhow!("{source}: metadata '{key}': {e}"))
}

fn md_usize(md: &Metadata, key: &str, source: &str) -> Result<usize> {
    let v = md_get(md, key, source)?;
    // Writers disagree on integer widths; accept any non-negative integer.
    let n = match v {
        Value::U8(x) => *x as u64,
        Value::U16(x) => *x as u64,
        Value::U32(x) => *x as u64,
        Value::U64(x) => *x,
        Value::I8(x) if *x >= 0 => *x as u64,
        Value::I16(x) if *x >= 0 => *x as u64,
        Value::I32(x) if *x >= 0 => *x as u64,
        Value::I64(x) if *x >= 0 => *x as u64,
        other => {
            bail!("{source}: metadata '{key}' should be a non-negative integer, found {other:?}")
        }
    };
    Ok(n as usize)
}

fn md_f64(md: &Metadata, key: &str, source: &str) -> Result<Option<f64>> {
    Ok(match md.get(key) {
        None => None,
        Some(Value::F32(x)) => Some(*x as f64),
        Some(Value::F64(x)) => Some(*x),
        Some(other) => bail!("{source}: metadata '{key}' should be a float, found {other:?}"),
    })
}

fn config_from_metadata(
    md: &Metadata,
    n_tokens: usize,
    has_output: bool,
    source: &str,
) -> Result<ModelConfig> {
    let arch_name = md_str(md, "general.architecture", source)?;
    let Some(arch) = Arch::parse(arch_name) else {
        bail!(
            "{source}: unsupported architecture '{arch_name}' (supported: {})",
            Arch::SUPPORTED
        );
    };
    let a = arch_name.as_str();
    let key = |k: &str| format!("{a}.{k}");
    let hidden = md_usize(md, &key("embedding_length"), source)?;
    let heads = md_usize(md, &key("attention.head_count"), source)?;
    let kv_heads = match md.get(&key("attention.head_count_kv")) {
        Some(_) => md_usize(md, &key("attention.head_count_kv"), source)?,
        None => heads,
    };
    if heads == 0 {
        bail!("{source}: {} is 0", key("attention.head_count"));
    }
    let head_dim = match md.get(&key("attention.key_length")) {
        Some(_) => md_usize(md, &key("attention.key_length"), source)?,
        None => hidden / heads,
    };
    if md.contains_key(&key("rope.dimension_count")) {
        let rot = md_usize(md, &key("rope.dimension_count"), source)?;
        if rot != head_dim {
            bail!("{source}: partial RoPE (rope.dimension_count {rot}, head dim {head_dim}) is not supported");
        }
    }
    if md.contains_key(&key("rope.scaling.type")) {
        let t = md_str(md, &key("rope.scaling.type"), source)?;
        if t != "none" {
            bail!("{source}: rope scaling '{t}' is not supported (only plain RoPE)");
        }
    }
    let vocab_size = match md.get(&key("vocab_size")) {
        Some(_) => md_usize(md, &key("vocab_size"), source)?,
        None => n_tokens,
    };
    let tok_id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
    let layers = md_usize(md, &key("block_count"), source)?;
    check_layer_count(layers).with_context(|| format!("{source}: {}", key("block_count")))?;
    let cfg = ModelConfig {
        arch,
        vocab_size,
        hidden_size: hidden,
        intermediate_size: md_usize(md, &key("feed_forward_length"), source)?,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rope_theta: md_f64(md, &key("rope.freq_base"), source)?.unwrap_or(10_000.0),
        rms_norm_eps: md_f64(md, &key("attention.layer_norm_rms_epsilon"), source)?.ok_or_else(
            || {
                anyhow!(
                    "{source}: missing metadata key '{}'",
                    key("attention.layer_norm_rms_epsilon")
                )
            },
        )?,
        max_position_embeddings: md_usize(md, &key("context_length"), source)?,
        tie_word_embeddings: !has_output,
        attention_bias: arch == Arch::Qwen2,
        bos_token_id: tok_id("tokenizer.ggml.bos_token_id"),
        eos_token_id: tok_id("tokenizer.ggml.eos_token_id"),
        layer_kinds: vec![AttentionKind::Softmax; layers],
        supra: None,
        lora: None,
    };
    cfg.validate()
        .with_context(|| format!("{source}: inconsistent metadata"))?;
    Ok(cfg)
}

/// llama.cpp tensor name → HF name.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match tail {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// HF name → llama.cpp name, for error messages that point into the GGUF file.
pub fn gguf_name(hf: &str) -> String {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return f.to_string();
    }
    let Some((layer, tail)) = hf
        .strip_prefix("model.layers.")
        .and_then(|r| r.split_once('.'))
    else {
        return hf.to_string();
    };
    let g = match tail {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return hf.to_string(),
    };
    format!("blk.{layer}.{g}")
}

/// llama.cpp's converter interleaves the two RoPE halves of each head in Wq/Wk
/// (`reshape(n_head, 2, d/2, in).swapaxes(1, 2)`); undo it so the HF rotate-half RoPE applies.
pub fn unpermute_rope_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let half = rows / n_head / 2;
    Ok(w.reshape((n_head, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// Inverse of [`unpermute_rope_rows`]: HF layout → llama.cpp layout (used to write test files).
pub fn permute_rope_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let half = rows / n_head / 2;
    Ok(w.reshape((n_head, 2, half, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

fn header_error(source: &str, e: candle_core::Error) -> anyhow::Error {
    let msg = e.to_string();
    if let Some(code) = msg.strip_prefix("unknown dtype for tensor ") {
        return anyhow!(
            "{source}: unknown tensor type {code} (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K-Q8_K)"
        );
    }
    if msg.contains("failed to fill whole buffer") || msg.contains("remaining") {
        return anyhow!("{source}: the file is truncated (its header ends early): {msg}");
    }
    anyhow!("{source}: not a valid GGUF file: {msg}")
}

/// `general.alignment` as the reader applied it (candle's default when absent): tensor data
/// offsets are multiples of it.
fn alignment(md: &Metadata) -> u64 {
    match md.get("general.alignment") {
        Some(Value::U8(v)) => *v as u64,
        Some(Value::U16(v)) => *v as u64,
        Some(Value::U32(v)) => *v as u64,
        Some(Value::I8(v)) if *v >= 0 => *v as u64,
        Some(Value::I16(v)) if *v >= 0 => *v as u64,
        Some(Value::I32(v)) if *v >= 0 => *v as u64,
        _ => candle_core::quantized::gguf_file::DEFAULT_ALIGNMENT,
    }
}

/// Every tensor's bytes must lie inside the file, at an aligned offset, in whole blocks of its
/// type: a download cut short or a corrupt tensor table fails here, by name, before anything
/// is read or allocated. Sizes are computed in u128, so that no declared dimension overflows.
fn check_extents(content: &Content, file_len: u64, source: &str) -> Result<()> {
    let align = alignment(&content.metadata);
    for (name, info) in &content.tensor_infos {
        if info.offset % align != 0 {
            bail!(
                "{source}: tensor '{name}' starts at data offset {}, not a multiple of the file's alignment {align}",
                info.offset
            );
        }
        let dims = info.shape.dims();
        let elems = dims
            .iter()
            .try_fold(1u128, |n, &d| n.checked_mul(d as u128))
            .unwrap_or(u128::MAX);
        let block = info.ggml_dtype.block_size();
        if dims.last().is_some_and(|&d| d % block != 0) {
            bail!(
                "{source}: tensor '{name}' has shape {dims:?}, whose rows are not whole blocks of {block} ({:?})",
                info.ggml_dtype
            );
        }
        let bytes = (elems / block as u128).saturating_mul(info.ggml_dtype.type_size() as u128);
        let end = (content.tensor_data_offset as u128 + info.offset as u128).saturating_add(bytes);
        if end > file_len as u128 {
            bail!(
                "{source}: the file is truncated: tensor '{name}' ends at byte {end} but the file has {file_len} bytes"
            );
        }
    }
    Ok(())
}

pub fn load(path: &Path) -> Result<LoadedModel> {
    let source = path.display().to_string();
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {source}"))?;
    let content = Content::read(&mut file).map_err(|e| header_error(&source, e))?;
    check_extents(&content, file.metadata()?.len(), &source)?;
    let md = &content.metadata;
    let has_output = content.tensor_infos.contains_key("output.weight");
    let n_tokens = md
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
        .map_or(0, Vec::len);
    let cfg = config_from_metadata(md, n_tokens, has_output, &source)?;
    let tokenizer = TextTokenizer::from_gguf(md, &source)?;

    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut weights = Weights::new();
    for name in names {
        let hf = match hf_name(name) {
            Some(hf) => hf,
            None if name == "rope_freqs.weight" => {
                bail!("{source}: tensor 'rope_freqs.weight' means scaled RoPE, which is not supported")
            }
            None => bail!(
                "{source}: unexpected tensor '{name}' (not part of a {} model)",
                cfg.arch.name()
            ),
        };
        let qt = content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| anyhow!("{source}: reading tensor '{name}': {e}"))?;
        let mut t = qt
            .dequantize(&Device::Cpu)
            .map_err(|e| anyhow!("{source}: dequantizing tensor '{name}': {e}"))?;
        // Qwen2 GGUFs use NEOX RoPE and are stored unpermuted.
        if cfg.arch != Arch::Qwen2 {
            let heads = if hf.contains("q_proj") {
                Some(cfg.num_attention_heads)
            } else if hf.contains("k_proj") {
                Some(cfg.num_key_value_heads)
            } else {
                None
            };
            if let Some(n) = heads {
                if t.dims()[0] % (2 * n) != 0 {
                    bail!(
                        "{source}: tensor '{name}' has shape {:?}, not a whole number of heads",
                        t.dims()
                    );
                }
                t = unpermute_rope_rows(&t, n)?;
            }
        }
        weights.insert(hf, t);
    }
    check_weights(&cfg, &weights, &source, gguf_name)?;
    Ok(LoadedModel {
        config: cfg,
        weights,
        tokenizer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_permutation_round_trips() {
        let w = Tensor::arange(0f32, 8.0 * 3.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 3))
            .unwrap();
        let p = permute_rope_rows(&w, 2).unwrap();
        // Head 0 has rows 0..4 = halves [0,1] and [2,3]; interleaved: 0,2,1,3.
        let rows: Vec<f32> = p
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(rows, vec![0., 6., 3., 9., 12., 18., 15., 21.]);
        let back = unpermute_rope_rows(&p, 2).unwrap();
        let diff = (back - &w)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn names_map_both_ways() {
        for g in [
            "token_embd.weight",
            "blk.3.attn_q.weight",
            "blk.12.ffn_down.weight",
            "output.weight",
        ] {
            assert_eq!(gguf_name(&hf_name(g).unwrap()), g);
        }
    }
}
