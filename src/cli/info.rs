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
            "supra               feature dim {}, decay {} (γ {:.4}..{:.4}), φ init {:?}, chunk {}",
            sc.feature_dim,
            sc.decay.name(),
            gammas.iter().copied().fold(f64::INFINITY, f64::min),
            gammas.iter().copied().fold(0.0, f64::max),
            sc.phi_init,
            sc.chunk_size
        );
    }
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

/// "supra ×28, softmax at 0, 15" or "softmax (all 30)".
pub(crate) fn layer_kinds_summary(kinds: &[AttentionKind]) -> String {
    let at = |k: AttentionKind| -> Vec<String> {
        kinds
            .iter()
            .enumerate()
            .filter(|(_, x)| **x == k)
            .map(|(i, _)| i.to_string())
            .collect()
    };
    let (soft, lin) = (at(AttentionKind::Softmax), at(AttentionKind::Supra));
    match (soft.is_empty(), lin.is_empty()) {
        (_, true) => format!("softmax (all {})", kinds.len()),
        (true, false) => format!("supra (all {})", kinds.len()),
        (false, false) => format!(
            "supra ×{}, softmax at layers {}",
            lin.len(),
            soft.join(", ")
        ),
    }
}
