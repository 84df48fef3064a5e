//! `supra info`: a model's architecture, sizes, tokenizer and chat format.

use anyhow::Result;
use supra::config::AttentionKind;

use super::model::ModelArg;

pub(crate) fn info(m: &ModelArg) -> Result<()> {
    let (loaded, _) = m.load()?;
    let c = &loaded.config;
    let t = &loaded.tokenizer;
    let tok_name = |id: Option<u32>| {
        id.and_then(|i| t.inner.id_to_token(i))
            .map_or("-".to_string(), |s| format!("{s} ({})", id.unwrap()))
    };
    println!("architecture        {}", c.arch.name());
    println!(
        "parameters          {:.2} M ({:.2} M kept from the teacher, {:.2} M new)",
        c.param_count() as f64 / 1e6,
        c.teacher_param_count() as f64 / 1e6,
        c.new_param_count() as f64 / 1e6
    );
    println!("layers              {}", c.num_hidden_layers);
    println!(
        "attention per layer {}",
        layer_kinds_summary(&c.layer_kinds)
    );
    if let Some(sc) = &c.supra {
        let gammas = sc.decay.gammas(c.num_attention_heads)?;
        println!(
            "linear branch       φ {} (init {:?}), feature dim {}, decay {} (γ {:.4}..{:.4}), chunk {}",
            sc.feature_map.name(),
            sc.phi_init,
            sc.feature_dim,
            sc.decay.name(),
            gammas.iter().copied().fold(f64::INFINITY, f64::min),
            gammas.iter().copied().fold(0.0, f64::max),
            sc.chunk_size
        );
        if let Some(w) = &sc.window {
            println!(
                "window              {} tokens + {} sinks (at {} positions), {} mix, {} rule",
                w.window,
                w.sinks,
                w.sink_positions.name(),
                w.mix.name(),
                w.rule.name()
            );
        }
    }
    let llama = supra::model::llama::Llama::new(c, &loaded.weights)?;
    let lens = [1, 1 << 10, 1 << 15];
    let states = llama.state_bytes_by_layer(&lens);
    println!("state per sequence  at 1 token / 1k / 32k tokens of context:");
    // Runs of consecutive layers of one kind and size, one line each.
    let mut i = 0;
    while i < states.len() {
        let j = (i..states.len())
            .find(|&j| c.layer_kinds[j] != c.layer_kinds[i] || states[j] != states[i])
            .unwrap_or(states.len());
        let mib = |b: usize| format!("{:.2} MiB", b as f64 / (1 << 20) as f64);
        let layers = if j - i == 1 {
            format!("layer {i}")
        } else {
            format!("layers {i}-{}", j - 1)
        };
        println!(
            "  {layers:<14} {:<8} {} / {} / {} per layer",
            c.layer_kinds[i].name(),
            mib(states[i][0]),
            mib(states[i][1]),
            mib(states[i][2])
        );
        i = j;
    }
    let total = |k: usize| states.iter().map(|s| s[k]).sum::<usize>() as f64 / (1 << 20) as f64;
    println!(
        "  all layers              {:.2} MiB / {:.2} MiB / {:.2} MiB",
        total(0),
        total(1),
        total(2)
    );
    println!("hidden size         {}", c.hidden_size);
    println!("intermediate size   {}", c.intermediate_size);
    println!(
        "attention heads     {} query, {} key/value, head dim {}",
        c.num_attention_heads, c.num_key_value_heads, c.head_dim
    );
    println!("context length      {}", c.max_position_embeddings);
    println!("rope theta          {}", c.rope_theta);
    println!("rms norm eps        {:e}", c.rms_norm_eps);
    println!("tied embeddings     {}", c.tie_word_embeddings);
    println!(
        "vocabulary          {} (tokenizer: {})",
        c.vocab_size,
        t.vocab_size()
    );
    println!(
        "bos / eos           {} / {}",
        tok_name(t.bos_id),
        tok_name(t.eos_id)
    );
    let chat = match t.chat_format() {
        Ok(supra::io::tokenizer::ChatFormat::ChatMl { .. }) => "ChatML".to_string(),
        Ok(supra::io::tokenizer::ChatFormat::Llama3) => "Llama 3".to_string(),
        Err(e) => format!("none ({e})"),
    };
    println!("chat template       {chat}");
    Ok(())
}

/// "supra (all 30)", "window ×28, softmax at layers 0, 15", "softmax (all 30)".
pub(crate) fn layer_kinds_summary(kinds: &[AttentionKind]) -> String {
    let kinds_present: Vec<AttentionKind> = [
        AttentionKind::Window,
        AttentionKind::Supra,
        AttentionKind::Softmax,
    ]
    .into_iter()
    .filter(|k| kinds.contains(k))
    .collect();
    if let [only] = kinds_present[..] {
        return format!("{} (all {})", only.name(), kinds.len());
    }
    let (first, rest) = kinds_present.split_first().expect("a model has layers");
    let mut out = format!(
        "{} ×{}",
        first.name(),
        kinds.iter().filter(|k| *k == first).count()
    );
    for k in rest {
        let at: Vec<String> = kinds
            .iter()
            .enumerate()
            .filter(|(_, x)| *x == k)
            .map(|(i, _)| i.to_string())
            .collect();
        out += &format!(", {} at layers {}", k.name(), at.join(", "));
    }
    out
}
