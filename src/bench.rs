//! Throughput benchmarks (run by `supra bench`, never by tests).

use crate::infer::generate::{GenStats, Generation};
use crate::infer::sampler::{Sampler, SamplingParams};
use crate::io::tokenizer::TextTokenizer;
use crate::model::llama::Llama;
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
    let mut g = Generation {
        model,
        sampler: Sampler::new(SamplingParams::greedy(), 0),
        stop_ids: Vec::new(),
        max_tokens: gen,
    };
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
