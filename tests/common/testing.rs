//! Tiny random models for tests and examples: a GGUF file exactly like a real llama checkpoint
//! (byte-level BPE vocabulary, ChatML template, llama.cpp tensor names and Wq/Wk layout) small
//! enough to build in milliseconds.

use anyhow::Result;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, Var};
use std::path::Path;
use supra::config::{Arch, AttentionKind, ModelConfig};
use supra::io::gguf::{gguf_name, permute_rope_rows};
use supra::model::weights::expected_tensors;

pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// GPT-2's reversible map from bytes to printable characters, the alphabet of byte-level BPE.
pub fn byte_level_alphabet() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        out[*b as usize] = char::from_u32(c).expect("valid char");
    }
    out
}

pub fn tiny_config() -> ModelConfig {
    let (tokens, _, _) = tiny_vocab();
    ModelConfig {
        arch: Arch::Llama,
        vocab_size: tokens.len(),
        hidden_size: 64,
        intermediate_size: 96,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 256,
        tie_word_embeddings: true,
        attention_bias: false,
        bos_token_id: Some(0),
        eos_token_id: Some(2),
        layer_kinds: vec![AttentionKind::Softmax; 2],
        supra: None,
        lora: None,
    }
}

/// Control tokens, the 256 byte symbols and three merges ("Ġt", "he", "Ġthe").
fn tiny_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut types = vec![3; tokens.len()];
    for c in byte_level_alphabet() {
        tokens.push(c.to_string());
        types.push(1);
    }
    let merges = vec!["Ġ t".to_string(), "h e".to_string(), "Ġt he".to_string()];
    for m in &merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    (tokens, types, merges)
}

/// A GGUF file under construction: tests edit its metadata and tensors to make bad files.
pub struct TinyGguf {
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<(String, QTensor)>,
}

impl TinyGguf {
    /// Random weights (seeded by `seed`) stored as `dtype` (F32, F16, Q8_0, ...).
    pub fn new(cfg: &ModelConfig, seed: u64, dtype: GgmlDType) -> Result<Self> {
        let (tokens, types, merges) = tiny_vocab();
        let a = cfg.arch.name();
        let u32v = |x: usize| Value::U32(x as u32);
        let strs =
            |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
        let metadata = vec![
            (
                "general.architecture".to_string(),
                Value::String(a.to_string()),
            ),
            (
                format!("{a}.context_length"),
                u32v(cfg.max_position_embeddings),
            ),
            (format!("{a}.embedding_length"), u32v(cfg.hidden_size)),
            (
                format!("{a}.feed_forward_length"),
                u32v(cfg.intermediate_size),
            ),
            (format!("{a}.block_count"), u32v(cfg.num_hidden_layers)),
            (
                format!("{a}.attention.head_count"),
                u32v(cfg.num_attention_heads),
            ),
            (
                format!("{a}.attention.head_count_kv"),
                u32v(cfg.num_key_value_heads),
            ),
            (
                format!("{a}.rope.freq_base"),
                Value::F32(cfg.rope_theta as f32),
            ),
            (
                format!("{a}.attention.layer_norm_rms_epsilon"),
                Value::F32(cfg.rms_norm_eps as f32),
            ),
            (
                "tokenizer.ggml.model".to_string(),
                Value::String("gpt2".to_string()),
            ),
            (
                "tokenizer.ggml.pre".to_string(),
                Value::String("smollm".to_string()),
            ),
            ("tokenizer.ggml.tokens".to_string(), strs(&tokens)),
            (
                "tokenizer.ggml.token_type".to_string(),
                Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
            ),
            ("tokenizer.ggml.merges".to_string(), strs(&merges)),
            ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(0)),
            ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(2)),
            (
                "tokenizer.ggml.add_bos_token".to_string(),
                Value::Bool(false),
            ),
            (
                "tokenizer.chat_template".to_string(),
                Value::String(CHATML_TEMPLATE.to_string()),
            ),
        ];
        let dev = Device::Cpu;
        let mut rng_state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = move || {
            // xorshift: deterministic across platforms and candle versions.
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            (rng_state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut tensors = Vec::new();
        for (hf, shape) in expected_tensors(cfg) {
            let n: usize = shape.iter().product();
            let is_norm = shape.len() == 1 && hf.contains("norm");
            let data: Vec<f32> = (0..n)
                .map(|_| {
                    if is_norm {
                        1.0 + 0.2 * next()
                    } else {
                        0.4 * next()
                    }
                })
                .collect();
            let mut t = Tensor::from_vec(data, shape.as_slice(), &dev)?;
            if cfg.arch != Arch::Qwen2 {
                if hf.ends_with("q_proj.weight") {
                    t = permute_rope_rows(&t, cfg.num_attention_heads)?;
                } else if hf.ends_with("k_proj.weight") {
                    t = permute_rope_rows(&t, cfg.num_key_value_heads)?;
                }
            }
            let dt = if shape.len() == 1 {
                GgmlDType::F32
            } else {
                dtype
            };
            tensors.push((gguf_name(&hf), QTensor::quantize(&t, dt)?));
        }
        Ok(Self { metadata, tensors })
    }

    pub fn set_metadata(&mut self, key: &str, value: Value) {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.to_string(), value));
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let mut f = std::fs::File::create(path)?;
        let md: Vec<(&str, &Value)> = self.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = self.tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        candle_core::quantized::gguf_file::write(&mut f, &md, &ts)?;
        Ok(())
    }
}

/// Writes a tiny random llama GGUF (f32 weights) and returns its config.
pub fn write_tiny_gguf(path: &Path, seed: u64) -> Result<ModelConfig> {
    let cfg = tiny_config();
    TinyGguf::new(&cfg, seed, GgmlDType::F32)?.write(path)?;
    Ok(cfg)
}

/// max |a − b| over all elements of two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("tensors of the same shape")
}

/// max |a − b| over two slices of the same length.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A tiny model written to `dir` and loaded back: the softmax teacher (`softmax_layers: None`)
/// or its SUPRA conversion keeping softmax attention in the listed layers.
pub fn tiny_loaded(
    dir: &Path,
    seed: u64,
    softmax_layers: Option<&[usize]>,
) -> Result<supra::io::LoadedModel> {
    let path = dir.join(format!("tiny-{seed}.gguf"));
    write_tiny_gguf(&path, seed)?;
    let teacher = supra::io::load(&path)?;
    match softmax_layers {
        None => Ok(teacher),
        Some(keep) => supra::convert::convert(
            &teacher,
            &supra::convert::ConvertOptions {
                softmax_layers: keep.to_vec(),
                ..Default::default()
            },
        ),
    }
}

/// ‖got − want‖ / ‖want‖.
pub fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

/// [`rel_err`] of two tensors of any float dtype.
pub fn tensor_rel_err(got: &Tensor, want: &Tensor) -> f64 {
    rel_err(&flat_f64(got), &flat_f64(want))
}

/// Every element of `x` as f64.
pub fn flat_f64(x: &Tensor) -> Vec<f64> {
    x.to_dtype(DType::F64)
        .and_then(|x| x.flatten_all())
        .and_then(|x| x.to_vec1())
        .expect("a tensor")
}

/// N(mean, std²) values of `dims` in `dtype` (drawn in f32).
pub fn randn_in(dtype: DType, mean: f32, std: f32, dims: &[usize]) -> Tensor {
    Tensor::randn(mean, std, dims, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("random tensor")
}

/// A fused op's output `ours` against `want`, the same function in candle's composed ops:
/// values within `tol` relative, and for each of `vars` the gradient of Σ out ⊙ `r`, of the
/// variable's shape, within `grad_tol`.
pub fn assert_matches_composed(
    (ours, want): (Tensor, Tensor),
    vars: &[&Var],
    r: &Tensor,
    (tol, grad_tol): (f64, f64),
    what: &str,
) {
    let e = tensor_rel_err(&ours, &want);
    assert!(e < tol, "{what}: values {e}");
    let grads = |y: Tensor| y.mul(r).unwrap().sum_all().unwrap().backward().unwrap();
    let (g1, g2) = (grads(ours), grads(want));
    for v in vars {
        let (a, b) = (
            g1.get(v.as_tensor()).unwrap(),
            g2.get(v.as_tensor()).unwrap(),
        );
        assert_eq!(a.dims(), v.dims(), "{what}");
        let e = tensor_rel_err(a, b);
        assert!(e < grad_tol, "{what}: gradient {e}");
    }
}

/// Central differences in f64 against candle's backward, for every element of `var`.
pub fn check_grad(var: &Var, loss: impl Fn() -> Tensor, name: &str) {
    let grads = loss().backward().unwrap();
    let analytic = flat_f64(
        grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient")),
    );
    let base = flat_f64(var.as_tensor());
    let shape = var.as_tensor().shape().clone();
    let eps = 1e-6;
    // Central differences cancel to about 1e-16·|loss|/eps absolute: elements far smaller
    // than the largest are held to the largest's scale, not their own.
    let floor = 1e-3 * analytic.iter().fold(1.0f64, |m, a| m.max(a.abs()));
    let mut max_err: f64 = 0.0;
    for i in 0..base.len() {
        let at = |delta: f64| {
            let mut x = base.clone();
            x[i] += delta;
            var.set(&Tensor::from_vec(x, shape.clone(), &Device::Cpu).unwrap())
                .unwrap();
            loss().to_scalar::<f64>().unwrap()
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        let scale = numeric.abs().max(analytic[i].abs()).max(floor);
        max_err = max_err.max((numeric - analytic[i]).abs() / scale);
    }
    var.set(&Tensor::from_vec(base, shape, &Device::Cpu).unwrap())
        .unwrap();
    assert!(max_err < 1e-5, "{name}: relative gradient error {max_err}");
}

/// Logits of one whole-sequence pass (no state) over `ids`: (len, vocab), flattened.
pub fn logits(model: &supra::model::llama::Llama, ids: &[u32]) -> Vec<f32> {
    let x = Tensor::new(ids, &Device::Cpu)
        .and_then(|x| x.unsqueeze(0))
        .expect("token ids");
    let h = model.forward_hidden(&x, None).expect("a forward pass");
    model
        .logits(&h)
        .and_then(|l| Ok(l.flatten_all()?.to_vec1()?))
        .expect("logits")
}

/// Logits after each token of `ids` fed one at a time through a decoding state (the step
/// forms), (len, vocab) flattened as [`logits`] lays them out.
pub fn stepwise_logits(model: &supra::model::llama::Llama, ids: &[u32]) -> Vec<f32> {
    let mut state = supra::infer::state::State::new(model);
    let mut out = Vec::new();
    for &id in ids {
        state.feed(model, &[id]).expect("a decoding step");
        let l = state.logits.as_ref().expect("logits after a token");
        out.extend(
            l.flatten_all()
                .and_then(|l| l.to_vec1::<f32>())
                .expect("logits"),
        );
    }
    out
}

/// The model built for training with every weight a variable: the variables by name, and the
/// model reading them.
pub fn training_model(
    m: &supra::io::LoadedModel,
) -> (Vec<(String, Var)>, supra::model::llama::Llama) {
    let vars: Vec<(String, Var)> = m
        .weights
        .iter()
        .map(|(n, t)| (n.clone(), Var::from_tensor(t).expect("a weight")))
        .collect();
    let weights = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let llama = supra::model::llama::Llama::for_training(&m.config, &weights).expect("a model");
    (vars, llama)
}

/// Mean next-token cross-entropy of one sequence `ids` (a differentiable scalar).
pub fn next_token_loss(model: &supra::model::llama::Llama, ids: &[u32]) -> Tensor {
    let n = ids.len() - 1;
    let x = Tensor::new(&ids[..n], &Device::Cpu)
        .and_then(|x| x.unsqueeze(0))
        .expect("token ids");
    let y = Tensor::new(&ids[1..], &Device::Cpu).expect("token ids");
    let logits = model
        .logits(&model.forward_hidden(&x, None).expect("a forward pass"))
        .and_then(|l| Ok(l.squeeze(0)?))
        .expect("logits");
    supra::train::cross_entropy::cross_entropy(&logits, &y).expect("a loss")
}

/// Σ|gradient| of `var`, `None` when it got none.
pub fn grad_l1(grads: &candle_core::backprop::GradStore, var: &Var) -> Option<f32> {
    grads.get(var).map(|g| {
        g.abs()
            .and_then(|g| g.sum_all())
            .and_then(|g| g.to_scalar::<f32>())
            .expect("a gradient")
    })
}

/// The corpus `supra fuzz` mutates (see `supra::fuzz`): real inputs of every reader, from
/// tiny models.
pub fn write_fuzz_corpus(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir.join("data"))?;
    TinyGguf::new(&tiny_config(), 1, GgmlDType::Q8_0)?.write(&dir.join("model.gguf"))?;
    // A hybrid (one softmax layer, one SUPRA layer): the config has every section.
    let hf = tiny_loaded(dir, 2, Some(&[0]))?;
    std::fs::remove_file(dir.join("tiny-2.gguf"))?;
    supra::io::hf_dir::save(&hf, &dir.join("hf"))?;
    let model = supra::model::llama::Llama::new(&hf.config, &hf.weights)?;
    let mut state = supra::infer::state::State::new(&model);
    state.feed(&model, &[5, 6, 7, 8])?;
    state.save(&model, &dir.join("state.safetensors"))?;
    let task: String = (0..4)
        .map(|i| {
            serde_json::json!({"query": format!("the cat {i}"), "choices": [" sat", " ran"], "gold": i % 2})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(dir.join("task.jsonl"), task)?;
    let mut journal = supra::eval::journal::Journal::open(
        &dir.join("journal.jsonl"),
        supra::fuzz::JOURNAL_HEADER,
        false,
    )?;
    for i in 0..3 {
        journal.put(
            &format!("task/{i}"),
            &serde_json::json!({"hash": i, "logprob": -1.5, "greedy": true, "tokens": 2, "s": 0.01}),
        )?;
    }
    std::fs::write(
        dir.join("data/a.txt"),
        "the cat sat on the mat. the dog ran to the door.\n".repeat(20),
    )?;
    Ok(())
}
