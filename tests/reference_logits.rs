//! supra against transformers on the default model (fixture from
//! scripts/reference/logits_fixture.py).

mod common;

use candle_core::{Device, Tensor};
use serde::Deserialize;
use supra::model::llama::Llama;

#[derive(Deserialize)]
struct Fixture {
    prompts: Vec<Prompt>,
}

#[derive(Deserialize)]
struct Prompt {
    name: String,
    text: String,
    token_ids: Vec<u32>,
    top5_ids: Vec<Vec<u32>>,
    top5_logits: Vec<Vec<f32>>,
    next_token_logprobs: Vec<f32>,
}

fn fixture() -> Fixture {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/smollm2_logits.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

const TOL: f32 = 1e-3;

#[test]
fn logits_match_transformers() {
    let loaded = supra::io::load(&common::real_model()).unwrap();
    let model = Llama::new(&loaded.config, &loaded.weights).unwrap();
    let mut worst = 0f32;
    for p in fixture().prompts {
        let ids = loaded.tokenizer.encode(&p.text).unwrap();
        assert_eq!(
            ids, p.token_ids,
            "{}: token ids differ from the reference tokenizer",
            p.name
        );
        let x = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model
            .logits(&model.forward_hidden(&x, None).unwrap())
            .unwrap();
        let logits: Vec<Vec<f32>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
        let mut max_diff = 0f32;
        for (pos, row) in logits.iter().enumerate() {
            let top1 = supra::infer::sampler::argmax(row);
            assert_eq!(
                top1, p.top5_ids[pos][0],
                "{}: top-1 differs at position {pos}",
                p.name
            );
            for (id, want) in p.top5_ids[pos].iter().zip(&p.top5_logits[pos]) {
                max_diff = max_diff.max((row[*id as usize] - want).abs());
            }
        }
        println!(
            "{}: {} tokens, max |logit diff| {max_diff:.2e}",
            p.name,
            ids.len()
        );
        assert!(
            max_diff <= TOL,
            "{}: max |logit diff| {max_diff} > {TOL}",
            p.name
        );
        worst = worst.max(max_diff);
    }
    println!("max |logit diff| over all prompts: {worst:.2e}");
}

/// The CLI contract: `supra score --json` gives the reference's next-token log-probs.
#[test]
fn score_json_matches_transformers() {
    let model = common::real_model();
    let mut worst = 0f32;
    for p in fixture().prompts {
        let out = common::supra_path("score", &model, &["--prompt", &p.text, "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ids: Vec<u32> = serde_json::from_value(v["token_ids"].clone()).unwrap();
        let lps: Vec<f32> = serde_json::from_value(v["logprobs"].clone()).unwrap();
        assert_eq!(ids, p.token_ids, "{}", p.name);
        assert_eq!(lps.len(), ids.len() - 1);
        let diff = lps
            .iter()
            .zip(&p.next_token_logprobs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        worst = worst.max(diff);
        let nll = v["nll"].as_f64().unwrap();
        let mean = -lps.iter().map(|&x| x as f64).sum::<f64>() / lps.len() as f64;
        assert!(
            (nll - mean).abs() < 1e-6
                && (v["ppl"].as_f64().unwrap() - nll.exp()).abs() < 1e-6 * nll.exp()
        );
    }
    println!("max |logprob diff| over all prompts: {worst:.2e}");
    assert!(worst <= TOL, "max |logprob diff| {worst} > {TOL}");
}

/// Sequences of different lengths scored as one padded batch equal each scored alone.
#[test]
fn batched_scoring_equals_single() {
    let loaded = supra::io::load(&common::real_model()).unwrap();
    let model = Llama::new(&loaded.config, &loaded.weights).unwrap();
    let seqs: Vec<Vec<u32>> = fixture()
        .prompts
        .into_iter()
        .take(3)
        .map(|p| p.token_ids)
        .collect();
    let batch = model.score_batch(&seqs).unwrap();
    for (s, b) in seqs.iter().zip(&batch) {
        let single = model
            .score_batch(std::slice::from_ref(s))
            .unwrap()
            .remove(0);
        assert_eq!(single.len(), s.len() - 1);
        let d = single
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-4, "batched vs single differ by {d}");
    }
}

/// GGUF → HF directory → reload: bit-identical logits.
#[test]
fn gguf_to_hf_dir_round_trip_is_exact() {
    let loaded = supra::io::load(&common::real_model()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    supra::io::hf_dir::save(&loaded, dir.path()).unwrap();
    let reloaded = supra::io::load(dir.path()).unwrap();
    assert_eq!(reloaded.config, loaded.config);
    let text = &fixture().prompts[1].text;
    let ids = loaded.tokenizer.encode(text).unwrap();
    assert_eq!(reloaded.tokenizer.encode(text).unwrap(), ids);
    assert_eq!(
        reloaded.tokenizer.chat_template,
        loaded.tokenizer.chat_template
    );
    let run = |m: &supra::io::LoadedModel| -> Vec<f32> {
        let model = Llama::new(&m.config, &m.weights).unwrap();
        let x = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        model
            .logits(&model.forward_hidden(&x, None).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_eq!(run(&loaded), run(&reloaded));
}
