//! Throughput benchmarks (run by `supra bench`, never by tests).

use crate::infer::generate::{GenStats, Generation};
use crate::infer::sampler::{Sampler, SamplingParams};
use crate::io::tokenizer::TextTokenizer;
use crate::model::llama::{Cache, Llama};
use anyhow::{bail, Result};

const FILLER: &str =
    "The history of the river valley is written in its stones. Farmers came first, \
then traders with salt and copper, and later the builders of bridges whose arches still stand. \
Each spring the water rose and carried silt over the fields, and each autumn the villages counted \
what the flood had given and what it had taken. ";

/// Peak resident set size of this process so far, in bytes (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Restarts the peak-RSS count (Linux: writing 5 to clear_refs resets VmHWM), so that
/// successive measurements in one process each get their own peak.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// A prompt of exactly `n` tokens of English prose.
pub fn prose_tokens(tokenizer: &TextTokenizer, n: usize) -> Result<Vec<u32>> {
    let unit = tokenizer.encode(FILLER)?;
    if unit.is_empty() {
        bail!("the tokenizer produced no tokens for the benchmark text");
    }
    Ok(unit.iter().copied().cycle().take(n).collect())
}

/// Prefill `context` tokens, then decode `gen` tokens greedily without stopping at EOS.
pub fn generate(
    model: &Llama,
    tokenizer: &TextTokenizer,
    context: usize,
    gen: usize,
) -> Result<GenStats> {
    let prompt = prose_tokens(tokenizer, context)?;
    let mut g = Generation::new(
        model,
        Sampler::new(SamplingParams::greedy(), 0),
        Vec::new(),
        gen,
    );
    let bar = indicatif::ProgressBar::new(gen as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bar:30} {pos}/{len} tokens [{elapsed}<{eta}]",
        )
        .expect("valid template"),
    );
    bar.set_message(format!("prefill {context} + decode"));
    let stats = g.run(&prompt, |_| {
        bar.inc(1);
        Ok(())
    })?;
    bar.finish_and_clear();
    Ok(stats)
}

/// Seconds per decoding step of `batch` sequences advanced together
/// ([`Llama::decode_step`]), each after its own `context` tokens of prose (a different offset
/// into the text per sequence): the median of `steps` steps after one warm-up step.
pub fn decode_batch(
    model: &Llama,
    tokenizer: &TextTokenizer,
    batch: usize,
    context: usize,
    steps: usize,
) -> Result<f64> {
    let text = prose_tokens(tokenizer, context + batch + steps + 1)?;
    let mut caches = Vec::with_capacity(batch);
    for b in 0..batch {
        let mut c = model.new_cache();
        model.prefill(&mut c, &text[b..b + context.max(1)], 512)?;
        caches.push(c);
    }
    let mut times = Vec::with_capacity(steps);
    for s in 0..=steps {
        let ids: Vec<u32> = (0..batch).map(|b| text[context + b + s]).collect();
        let mut refs: Vec<&mut Cache> = caches.iter_mut().collect();
        let t0 = std::time::Instant::now();
        model.decode_step(&ids, &mut refs)?;
        if s > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// One row of `supra bench attention`.
pub struct AttentionBench {
    pub forward: std::time::Duration,
    pub backward: std::time::Duration,
    pub peak_rss: Option<u64>,
}

/// Forward and backward of one SUPRA layer with SmolLM2-135M's shapes (hidden 576, 9 query and 3
/// key/value heads of 64) on `seq` tokens; median of `repeats` runs.
pub fn attention(
    seq: usize,
    form: crate::model::llama::Form,
    repeats: usize,
) -> Result<AttentionBench> {
    use crate::attention::supra::{Decay, SupraAttention};
    use crate::model::linear::Linear;
    use candle_core::{Device, Tensor, Var};
    let dev = Device::Cpu;
    let (hidden, h, hkv, d) = (576, 9, 3, 64);
    let var = |r: usize, c: usize| -> Result<Var> {
        Ok(Var::from_tensor(&Tensor::randn(
            0f32,
            (1.0 / c as f64).sqrt() as f32,
            (r, c),
            &dev,
        )?)?)
    };
    let vars = [
        var(h * d, hidden)?,
        var(hkv * d, hidden)?,
        var(hkv * d, hidden)?,
        var(hidden, h * d)?,
        var(h * d, h * d)?,
        var(hkv * d, hkv * d)?,
    ];
    let lin = |v: &Var| Linear::new(v.as_tensor().clone(), None);
    let layer = SupraAttention {
        proj: crate::attention::Projections {
            q: lin(&vars[0]),
            k: lin(&vars[1]),
            v: lin(&vars[2]),
            o: lin(&vars[3]),
            n_heads: h,
            n_kv_heads: hkv,
            head_dim: d,
        },
        phi: crate::attention::feature_map::FeatureMap::Relu {
            q: lin(&vars[4]),
            k: Some(lin(&vars[5])),
        },
        feature_dim: d,
        gammas: crate::attention::supra::HeadDecays::Fixed(Decay::Lightning.gammas(h)?),
        // The training form; in one chunk it is the parallel form.
        chunk_size: match form {
            crate::model::llama::Form::Parallel => usize::MAX,
            _ => 64,
        },
        rope: crate::model::rope::Rope::new(d, 100_000.0, seq, &dev)?,
    };
    let x = Tensor::randn(0f32, 1.0, (1, seq, hidden), &dev)?;
    time_forward_backward(repeats, || {
        layer.forward(&x, 0, None, crate::attention::Exec::Train)
    })
}

/// Forward and backward of the delta rule's training form with SmolLM2-135M's shapes (9 query
/// and 3 key/value heads, d' = d_v = 64, chunks of 64, the lightning decays) on `seq` tokens,
/// composed from candle ops or `fused`; median of `repeats` runs.
pub fn delta_rule(seq: usize, fused: bool, repeats: usize) -> Result<AttentionBench> {
    use crate::attention::delta;
    use crate::attention::supra::{Decay, HeadDecays};
    use candle_core::{Device, Tensor, Var};
    let dev = Device::Cpu;
    let (h, hkv, d) = (9, 3, 64);
    let var = |shape: &[usize]| -> Result<Var> {
        Ok(Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev)?)?)
    };
    let (q, v, params) = (
        var(&[1, h, seq, d])?,
        var(&[1, hkv, seq, d])?,
        var(&[h, d + 1])?,
    );
    // Key features as a ReLU map gives them.
    let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, hkv, seq, d), &dev)?.relu()?)?;
    let gammas = Decay::Lightning.gammas(h)?;
    let decays = HeadDecays::Fixed(gammas.clone());
    let (q, k, v, p) = (
        q.as_tensor(),
        k.as_tensor(),
        v.as_tensor(),
        params.as_tensor(),
    );
    time_forward_backward(repeats, || {
        Ok(if fused {
            delta::fused::chunked(q, k, v, p, &gammas, 64)?
        } else {
            delta::chunk::chunked(q, k, v, p, &decays, 64)?
        })
    })
}

/// Median times of `forward` (the loss Σ out ⊙ r, r fixed) and of its backward, and the peak
/// RSS over all the runs.
fn time_forward_backward(
    repeats: usize,
    forward: impl Fn() -> Result<candle_core::Tensor>,
) -> Result<AttentionBench> {
    reset_peak_rss();
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    let mut r = None;
    for _ in 0..repeats {
        let t0 = std::time::Instant::now();
        let out = forward()?;
        let r = match &r {
            Some(r) => r,
            None => r.insert(out.randn_like(0.0, 1.0)?),
        };
        let loss = (out * r)?.sum_all()?;
        let _ = loss.to_scalar::<f32>()?;
        fwd.push(t0.elapsed());
        let t1 = std::time::Instant::now();
        let grads = loss.backward()?;
        bwd.push(t1.elapsed());
        drop(grads);
    }
    fwd.sort();
    bwd.sort();
    Ok(AttentionBench {
        forward: fwd[repeats / 2],
        backward: bwd[repeats / 2],
        peak_rss: peak_rss_bytes(),
    })
}

/// f32 matmul throughput of this machine (GFLOP/s), 1024² × 1024 products: the peak that
/// training throughput is compared with.
pub fn matmul_peak_gflops() -> Result<f64> {
    use candle_core::{Device, Tensor};
    let n = 1024;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let _ = a.matmul(&b)?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let _ = a.matmul(&b)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * n * n) as f64 / best / 1e9)
}

pub struct TrainBench {
    pub tokens_per_s: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    pub trained_params: usize,
}

/// Median-time training steps of `recipe` on one window of `seq_len` prose tokens per step.
pub fn train_step(
    model: &crate::io::LoadedModel,
    recipe: crate::train::recipe::Recipe,
    seq_len: usize,
    steps: usize,
) -> Result<TrainBench> {
    use crate::train::optim::{AdamW, AdamWConfig};
    use crate::train::recipe;
    use candle_core::{Device, Tensor};
    crate::heap::keep_freed_for_reuse();
    // The two-phase recipes spend most of their tokens after the transfer phase: time that
    // one, with the default LoRA adapters (as the distillation recipe).
    let teacher = match recipe.distills() {
        true => Some(crate::train::distill::Teacher::new(model)?),
        false => None,
    };
    let mut model = model.clone();
    if recipe.adapts() {
        crate::train::lora::add(&mut model, 16, 16.0, 0)?;
    }
    let model = &model;
    let objective = recipe.objective(u64::MAX, 0);
    let trained = recipe::trainable(model, recipe, &[])?;
    let (weights, vars) = recipe::with_variables(model, &trained)?;
    let trained_params = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let llama = Llama::for_training(&model.config, &weights)?;
    let targets = recipe::Targets {
        transfer: crate::train::transfer::Teacher::new(model, &[], Default::default())?,
        distill: teacher,
        gap: None,
        z_loss: 0.0,
        temperature: 1.0,
        ce_weight: 0.0,
    };
    let mut opt = AdamW::new(vars, AdamWConfig::default());
    let ids = prose_tokens(&model.tokenizer, seq_len + 1)?;
    let window = Tensor::from_vec(ids, (1, seq_len + 1), &Device::Cpu)?;
    let (mut f, mut b, mut o) = (Vec::new(), Vec::new(), Vec::new());
    let bar = indicatif::ProgressBar::new(steps as u64 + 1);
    for i in 0..=steps {
        let t0 = std::time::Instant::now();
        let loss = recipe::loss(&llama, &targets, objective, &window, true)?;
        let _ = loss.to_scalar::<f32>()?;
        let t1 = std::time::Instant::now();
        let grads = loss.backward()?;
        let t2 = std::time::Instant::now();
        opt.accumulate(&grads, 1.0)?;
        opt.step(1e-5, 1.0)?;
        let t3 = std::time::Instant::now();
        bar.inc(1);
        if i > 0 {
            // The first step warms caches and allocators.
            f.push((t1 - t0).as_secs_f64());
            b.push((t2 - t1).as_secs_f64());
            o.push((t3 - t2).as_secs_f64());
        }
    }
    bar.finish_and_clear();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (forward_s, backward_s, optimizer_s) = (median(&mut f), median(&mut b), median(&mut o));
    Ok(TrainBench {
        tokens_per_s: seq_len as f64 / (forward_s + backward_s + optimizer_s),
        forward_s,
        backward_s,
        optimizer_s,
        trained_params,
    })
}

/// One row of `supra bench infer`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InferPoint {
    pub model: String,
    pub weights: &'static str,
    pub context: usize,
    /// Prompt tokens read per second, over everything read up to `context`.
    pub prefill_tps: f64,
    /// Tokens generated per second with `context` tokens before them.
    pub decode_tps: f64,
    /// Tokens generated per second from the first context's state, each run right after one of
    /// `decode_tps`'s: the machine's speed at that moment, so `decode_tps / decode_tps_first`
    /// is the context's own effect with the machine's drift between contexts taken out.
    pub decode_tps_first: f64,
    /// Peak resident memory of the process so far, MiB.
    pub peak_rss_mib: Option<f64>,
    /// The generation state (KV cache or recurrent state), MiB.
    pub state_mib: f64,
}

/// Reads one growing prompt of prose up to each of `contexts` (ascending) in turn and decodes
/// `gen` tokens greedily at each, `repeats` times: the prefill rate counts every prompt token
/// read so far, the decode rate (median over the repeats) the steps after the first token. The
/// decoded tokens stay in the context (a few among thousands), so one pass serves every
/// context. Each repeat is paired with a decode from a copy of the first context's state, run
/// right after it: a shared machine's speed drifts by more than 10 % over the minutes a long
/// prefill takes, and the pair compares the two contexts at the same moment.
pub fn infer(
    model: &Llama,
    tokenizer: &TextTokenizer,
    name: &str,
    weights: &'static str,
    contexts: &[usize],
    (gen, repeats): (usize, usize),
    mut on_point: impl FnMut(&InferPoint) -> Result<()>,
) -> Result<()> {
    use crate::infer::state::State;
    let Some(&longest) = contexts.last() else {
        return Ok(());
    };
    let prompt = prose_tokens(tokenizer, longest)?;
    let bar = indicatif::ProgressBar::new(longest as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bar:30} {pos}/{len} tokens of context [{elapsed}<{eta}]",
        )
        .expect("valid template"),
    );
    bar.set_message(format!("{name} {weights}"));
    reset_peak_rss();
    let mut state = State::new(model);
    let mut first: Option<State> = None;
    let (mut read, mut read_time) = (0usize, std::time::Duration::ZERO);
    for &context in contexts {
        while state.tokens.len() < context {
            let from = state.tokens.len();
            let to = (from + crate::infer::state::PREFILL_CHUNK).min(context);
            let t0 = std::time::Instant::now();
            state.feed(model, &prompt[from..to])?;
            read_time += t0.elapsed();
            read += to - from;
            bar.set_position(to as u64);
        }
        // Decode rates are noisy on a shared machine: the median of `repeats` runs, one after
        // another (each adds `gen` tokens of context).
        let first = match &first {
            Some(f) => f,
            None => first.insert(state.fork()?),
        };
        let decode = |state: &mut State| {
            Generation::new(
                model,
                Sampler::new(SamplingParams::greedy(), 0),
                Vec::new(),
                gen,
            )
            .resume(state, &[], |_| Ok(true))
        };
        let (mut rates, mut rates_first) = (Vec::new(), Vec::new());
        let mut state_bytes = 0;
        for _ in 0..repeats.max(1) {
            let stats = decode(&mut state)?;
            rates.push(stats.decode_tps());
            state_bytes = stats.state_bytes;
            rates_first.push(decode(&mut first.fork()?)?.decode_tps());
        }
        let median = |mut r: Vec<f64>| {
            r.sort_by(f64::total_cmp);
            r[r.len() / 2]
        };
        let point = InferPoint {
            model: name.to_string(),
            weights,
            context,
            prefill_tps: read as f64 / read_time.as_secs_f64().max(1e-9),
            decode_tps: median(rates),
            decode_tps_first: median(rates_first),
            peak_rss_mib: peak_rss_bytes().map(mib),
            state_mib: mib(state_bytes as u64),
        };
        bar.suspend(|| on_point(&point))?;
    }
    bar.finish_and_clear();
    Ok(())
}
