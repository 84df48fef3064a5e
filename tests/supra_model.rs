//! SUPRA layers inside whole models: gradients, conversion, modes, constant-size state.

mod common;

use candle_core::{Device, Tensor, Var};
use common::testing::{logits, write_tiny_gguf};
use supra::config::{AttentionKind, PhiInit};
use supra::convert::{convert, ConvertOptions};
use supra::io::LoadedModel;
use supra::model::llama::{Form, Llama};

fn tiny_teacher(dir: &std::path::Path, seed: u64) -> LoadedModel {
    let p = dir.join("teacher.gguf");
    write_tiny_gguf(&p, seed).unwrap();
    supra::io::load(&p).unwrap()
}

/// The fused cross-entropy that training uses reaches every parameter of a hybrid (softmax
/// layer 0, SUPRA layer 1) built for training: catches fused ops that silently drop gradients.
#[test]
fn every_parameter_of_a_hybrid_gets_a_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = tiny_teacher(dir.path(), 11);
    let opts = ConvertOptions {
        softmax_layers: vec![0],
        ..Default::default()
    };
    let model = convert(&teacher, &opts).unwrap();
    assert_eq!(
        model.config.layer_kinds,
        vec![AttentionKind::Softmax, AttentionKind::Supra]
    );
    let (vars, llama) = common::testing::training_model(&model);
    let ids: Vec<u32> = (0..40).map(|i| (i * 29 % 250 + 3) as u32).collect();
    let loss = common::testing::next_token_loss(&llama, &ids);
    let grads = loss.backward().unwrap();
    assert!(
        vars.iter().any(|(n, _)| n.contains("phi_k")),
        "GQA layer has its own key φ"
    );
    let mut bad: Vec<String> = vars
        .iter()
        .filter_map(|(name, var)| match common::testing::grad_l1(&grads, var) {
            Some(n) if n > 0.0 && n.is_finite() => None,
            other => Some(format!("{name} ({other:?})")),
        })
        .collect();
    bad.sort();
    assert!(
        bad.is_empty(),
        "parameters without a usable gradient: {bad:?}"
    );
}

#[test]
fn converted_model_saves_reloads_and_runs_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = tiny_teacher(dir.path(), 12);
    let out = dir.path().join("linear");
    let teacher_path = dir.path().join("teacher.gguf");
    let run = common::supra(&[
        "convert",
        teacher_path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--softmax-layers",
        "1",
        "--seed",
        "3",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let info = common::supra_path("info", &out, &[]);
    let info = String::from_utf8_lossy(&info.stdout).to_string();
    assert!(info.contains("supra ×1, softmax at layers 1"), "{info}");
    assert!(info.contains("new"), "{info}");

    let loaded = supra::io::load(&out).unwrap();
    assert_eq!(
        loaded.config.layer_kinds,
        vec![AttentionKind::Supra, AttentionKind::Softmax]
    );
    let sc = loaded.config.supra.as_ref().unwrap();
    assert_eq!(
        (sc.feature_dim, sc.chunk_size, sc.phi_init),
        (16, 64, PhiInit::Random)
    );
    // The teacher's weights are kept as they were.
    for (name, t) in &teacher.weights {
        let d = common::testing::max_abs_diff(t, &loaded.weights[name]);
        assert_eq!(d, 0.0, "{name} changed");
    }
    // Same seed, same φ: the library path gives the CLI's model.
    let opts = ConvertOptions {
        softmax_layers: vec![1],
        seed: 3,
        ..Default::default()
    };
    let again = convert(&teacher, &opts).unwrap();
    let ids: Vec<u32> = (3..120).collect();
    let model = Llama::new(&loaded.config, &loaded.weights).unwrap();
    let reference = logits(&Llama::new(&again.config, &again.weights).unwrap(), &ids);
    assert_eq!(logits(&model, &ids), reference);
    let chunked = model.score_with(&ids, Form::Chunked).unwrap();
    for form in [Form::Parallel, Form::Recurrent] {
        let d = common::testing::max_diff(&model.score_with(&ids, form).unwrap(), &chunked);
        assert!(d < 1e-4, "{form:?} differs from chunked by {d}");
    }
    // The CLI modes agree too.
    let text = "the cat and the dog, the end";
    let lp = |mode: &str| -> Vec<f32> {
        let o = common::supra_path("score", &out, &["--prompt", text, "--json", "--mode", mode]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        serde_json::from_value(v["logprobs"].clone()).unwrap()
    };
    let p = lp("parallel");
    assert!(
        common::testing::max_diff(&p, &lp("chunked")) < 1e-4
            && common::testing::max_diff(&p, &lp("recurrent")) < 1e-4
    );
}

#[test]
fn unknown_attention_kind_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = tiny_teacher(dir.path(), 13);
    let out = dir.path().join("linear");
    supra::io::hf_dir::save(
        &convert(&teacher, &ConvertOptions::default()).unwrap(),
        &out,
    )
    .unwrap();
    let p = out.join("config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replacen("\"supra\",", "\"mamba\",", 1);
    std::fs::write(&p, text).unwrap();
    let o = common::supra_path("info", &out, &[]);
    common::assert_clean_error(
        &o,
        &[
            "config.json",
            "attention_kinds[0]",
            "unknown attention kind 'mamba'",
            "softmax, supra",
        ],
    );
}

/// 4,096 tokens from a fully linear model: the state never grows, and generation goes on past
/// the teacher's context (256 here) because nothing depends on it any more.
#[test]
fn recurrent_state_is_constant_over_4096_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = tiny_teacher(dir.path(), 14);
    let m = convert(&teacher, &ConvertOptions::default()).unwrap();
    let model = Llama::new(&m.config, &m.weights).unwrap();
    assert_eq!(model.context_limit(), None);
    let mut cache = model.new_cache();
    let prompt = Tensor::new(&[3u32, 4, 5, 6, 7], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut logits = model.forward_last(&prompt, &mut cache).unwrap();
    let size = cache.bytes();
    let c = &m.config;
    assert_eq!(
        size,
        c.num_hidden_layers * c.num_attention_heads * 16 * c.head_dim * 4
    );
    for step in 0..4096 {
        let next =
            supra::infer::sampler::argmax(&logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
        let x = Tensor::new(&[next], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        logits = model.forward_last(&x, &mut cache).unwrap();
        assert_eq!(cache.bytes(), size, "state grew at step {step}");
    }
    assert_eq!(cache.pos, 5 + 4096);
    // Through the generation loop too: a prompt longer than the teacher's context is fine.
    let long: Vec<u32> = (0..300).map(|i| (i * 7 % 250 + 3) as u32).collect();
    let mut g = supra::infer::generate::Generation::new(
        &model,
        supra::infer::sampler::Sampler::new(supra::infer::sampler::SamplingParams::greedy(), 0),
        vec![],
        20,
    );
    let stats = g.run(&long, |_| Ok(())).unwrap();
    assert_eq!((stats.generated_tokens, stats.state_bytes), (20, size));
    // A softmax teacher's cache, by contrast, grows with every token.
    let teacher_model = Llama::new(&teacher.config, &teacher.weights).unwrap();
    let mut kv = teacher_model.new_cache();
    teacher_model.forward_last(&prompt, &mut kv).unwrap();
    let before = kv.bytes();
    teacher_model.forward_last(&prompt, &mut kv).unwrap();
    assert!(kv.bytes() > before);
}

/// The converted SmolLM2 (untrained φ): the three forms give the same log-probs on a
/// 1,000-token text.
#[test]
fn converted_smollm2_modes_agree_on_1000_tokens() {
    let teacher = supra::io::load(&common::real_model()).unwrap();
    let m = convert(&teacher, &ConvertOptions::default()).unwrap();
    let text = std::fs::read_to_string(common::data_dir().join("text/test/pg1342.txt")).unwrap();
    let mut ids = m.tokenizer.encode(&text[..20_000]).unwrap();
    ids.truncate(1000);
    let model = Llama::new(&m.config, &m.weights).unwrap();
    let run = |form| model.score_with(&ids, form).unwrap();
    let p = run(Form::Parallel);
    let c = run(Form::Chunked);
    let r = run(Form::Recurrent);
    let (dc, dr) = (
        common::testing::max_diff(&p, &c),
        common::testing::max_diff(&p, &r),
    );
    println!(
        "1000 tokens: max |logprob diff| parallel-chunked {dc:.2e}, parallel-recurrent {dr:.2e}"
    );
    assert!(dc <= 1e-3 && dr <= 1e-3, "chunked {dc}, recurrent {dr}");
}

/// Decoding one token at a time (the fused recurrent step in SUPRA layers, the KV cache in
/// softmax ones) gives the logits of one whole-sequence pass, for SUPRA and hybrid models; with
/// Q8_0 weights it stays within quantization noise of them.
#[test]
fn token_by_token_decoding_equals_one_pass() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = tiny_teacher(dir.path(), 21);
    let ids: Vec<u32> = (0..40).map(|i| (i * 13 % 200) as u32 + 3).collect();
    for keep in [vec![], vec![0]] {
        let m = convert(
            &teacher,
            &ConvertOptions {
                softmax_layers: keep.clone(),
                ..Default::default()
            },
        )
        .unwrap();
        let mut model = Llama::new(&m.config, &m.weights).unwrap();
        let whole = logits(&model, &ids);
        let scale = whole.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (format, tol) in [
            (supra::model::quant::WeightFormat::F32, 1e-5),
            (supra::model::quant::WeightFormat::Q8_0, 0.05),
        ] {
            model.quantize(format).unwrap();
            let steps = common::testing::stepwise_logits(&model, &ids);
            let worst = common::testing::max_diff(&steps, &whole);
            assert!(
                worst < tol * scale,
                "softmax layers {keep:?}, {format:?}: differs by {worst} (logits up to {scale})"
            );
        }
    }
}

/// Every decay kind goes through `supra convert --decay`, config.json and back, and is the
/// decay the layers then use.
#[test]
fn decay_kinds_travel_through_config_json() {
    use supra::attention::supra::Decay;
    let dir = tempfile::tempdir().unwrap();
    tiny_teacher(dir.path(), 31);
    let teacher = dir.path().join("teacher.gguf");
    let ids: Vec<u32> = (0..60).map(|i| (i * 17 % 240 + 3) as u32).collect();
    let mut scores = Vec::new();
    for (flag, want) in [
        ("lightning", Decay::Lightning),
        ("retnet", Decay::RetNet),
        ("none", Decay::None),
        ("0.5,0.6,0.7,0.8", Decay::Explicit(vec![0.5, 0.6, 0.7, 0.8])),
    ] {
        let out = dir.path().join(format!("decay-{}", want.name()));
        let m = common::cli_convert(&teacher, &out, &["--decay", flag]);
        let text = std::fs::read_to_string(out.join("config.json")).unwrap();
        assert_eq!(
            m.config.supra.as_ref().unwrap().decay,
            want,
            "{flag}: {text}"
        );
        let model = Llama::new(&m.config, &m.weights).unwrap();
        scores.push(model.score_with(&ids, Form::Chunked).unwrap());
    }
    // Same φ (same seed), different decays: different models.
    for i in 1..scores.len() {
        let d = common::testing::max_diff(&scores[0], &scores[i]);
        assert!(d > 1e-3, "decay {i} scores like lightning (max diff {d})");
    }
    let bad = common::supra(&[
        "convert",
        teacher.to_str().unwrap(),
        "--out",
        dir.path().join("bad").to_str().unwrap(),
        "--decay",
        "0.5,1.5,0.7,0.8",
    ]);
    common::assert_clean_error(&bad, &["decay 1.5 is outside (0, 1]"]);
}

/// `--phi-init identity`: φ starts as ReLU alone (W = I, b = 0); it needs d' = d.
#[test]
fn phi_init_identity_is_relu() {
    let dir = tempfile::tempdir().unwrap();
    tiny_teacher(dir.path(), 32);
    let teacher = dir.path().join("teacher.gguf");
    let m = common::cli_convert(
        &teacher,
        &dir.path().join("id"),
        &["--phi-init", "identity"],
    );
    let eye = |n: usize| Tensor::eye(n, candle_core::DType::F32, &Device::Cpu).unwrap();
    for (name, t) in &m.weights {
        if name.ends_with("phi_q.weight") || name.ends_with("phi_k.weight") {
            let n = t.dim(0).unwrap();
            assert_eq!(common::testing::max_abs_diff(t, &eye(n)), 0.0, "{name}");
        } else if name.contains(".phi_") {
            assert_eq!(
                t.abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                0.0
            );
        }
    }
    assert!(m.weights.keys().any(|n| n.ends_with("phi_k.weight")));
    let bad = common::supra(&[
        "convert",
        teacher.to_str().unwrap(),
        "--out",
        dir.path().join("bad").to_str().unwrap(),
        "--phi-init",
        "identity",
        "--feature-dim",
        "8",
    ]);
    common::assert_clean_error(&bad, &["--phi-init identity needs the feature dim (8)"]);
}

/// A whole model whose feature dim d' differs from the head dim (16): smaller and larger. The
/// forms agree, the state is (heads, d', d) per layer, and training reaches φ.
#[test]
fn feature_dim_other_than_head_dim_runs_in_every_form() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = tiny_teacher(dir.path(), 33);
    let ids: Vec<u32> = (0..70).map(|i| (i * 11 % 240 + 3) as u32).collect();
    for f in [8, 24] {
        let opts = ConvertOptions {
            feature_dim: Some(f),
            softmax_layers: vec![1],
            chunk_size: 16,
            ..Default::default()
        };
        let m = convert(&teacher, &opts).unwrap();
        let model = Llama::new(&m.config, &m.weights).unwrap();
        let chunked = model.score_with(&ids, Form::Chunked).unwrap();
        for form in [Form::Parallel, Form::Recurrent] {
            let d = common::testing::max_diff(&model.score_with(&ids, form).unwrap(), &chunked);
            assert!(d < 1e-4, "d' = {f}, {form:?}: {d}");
        }
        let mut state = supra::infer::state::State::new(&model);
        state.feed(&model, &ids[..1]).unwrap();
        // Layer 0 is SUPRA ((1, 4, f, 16) f32); layer 1 keeps a KV cache of one position.
        let kv = 2 * 2 * 16 * 4;
        assert_eq!(state.cache.bytes(), 4 * f * 16 * 4 + kv, "d' = {f}");

        let vars: Vec<(String, Var)> = m
            .weights
            .iter()
            .filter(|(n, _)| n.contains(".phi_"))
            .map(|(n, t)| (n.clone(), Var::from_tensor(t).unwrap()))
            .collect();
        let mut weights = m.weights.clone();
        for (n, v) in &vars {
            weights.insert(n.clone(), v.as_tensor().clone());
        }
        let train = Llama::for_training(&m.config, &weights).unwrap();
        let loss = common::testing::next_token_loss(&train, &ids[..70]);
        let grads = loss.backward().unwrap();
        for (n, v) in &vars {
            let g = grads
                .get(v)
                .unwrap_or_else(|| panic!("d' = {f}: no gradient for {n}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "d' = {f}: {n} gradient {norm}"
            );
        }
    }
}
