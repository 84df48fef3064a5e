//! Window + linear layers inside whole models: conversion, config.json, every form, states,
//! quantized weights, export, the branch controls, training's gradients.

mod common;

use candle_core::{Device, Tensor};
use common::testing::{logits, max_diff, stepwise_logits, write_tiny_gguf};
use supra::attention::window::Branches;
use supra::config::{AttentionKind, FeatureKind, LinearRule, Mix, SinkPositions, WindowConfig};
use supra::convert::{convert, ConvertOptions};
use supra::io::LoadedModel;
use supra::model::llama::{Form, Llama};
use supra::model::quant::WeightFormat;

fn tiny_teacher(dir: &std::path::Path) -> (std::path::PathBuf, LoadedModel) {
    let p = dir.join("teacher.gguf");
    write_tiny_gguf(&p, 31).unwrap();
    let m = supra::io::load(&p).unwrap();
    (p, m)
}

/// The tiny models' linear branch starts at a share of 0.1, well above the defaults (chosen so
/// that an untrained real model reads as its window): loud enough that every test here sees it.
const AUDIBLE: Option<f64> = Some(0.1);

fn window_opts(window: usize, feature_map: FeatureKind, mix: Mix) -> ConvertOptions {
    ConvertOptions {
        window: Some(WindowConfig {
            window,
            sinks: 2,
            mix,
            sink_positions: SinkPositions::Cache,
            rule: LinearRule::Add,
        }),
        feature_map,
        mix_share: AUDIBLE,
        seed: 5,
        ..Default::default()
    }
}

fn ids(n: usize) -> Vec<u32> {
    (0..n).map(|i| (i * 37 % 250 + 3) as u32).collect()
}

/// Each feature map, mix and decay kind through `supra convert --window`, config.json and back
/// (layer 0 a window layer, layer 1 a pure SUPRA layer): the three forms agree, decoding token by token (f32 and Q8_0) gives the one-pass logits, a state saved
/// midway continues exactly, and `supra export` writes a model that gives the same logits.
#[test]
fn window_models_convert_reload_and_agree_in_every_form() {
    let dir = tempfile::tempdir().unwrap();
    let (teacher_path, _) = tiny_teacher(dir.path());
    for (fm, mix, decay, rule) in [
        ("relu", "shared", "fixed", "add"),
        ("relu", "gated", "learnable", "add"),
        ("hedgehog", "shared", "learnable", "add"),
        ("hedgehog", "gated", "none", "add"),
        ("relu", "gated", "fixed", "delta"),
        ("hedgehog", "value", "learnable", "delta"),
    ] {
        let out = dir.path().join(format!("{fm}-{mix}-{decay}-{rule}"));
        let flags = [
            "--window",
            "8",
            "--sinks",
            "2",
            "--feature-map",
            fm,
            "--mix",
            mix,
            "--mix-share",
            "0.1",
            "--linear-rule",
            rule,
        ];
        let more = ["--supra-layers", "1", "--decay", decay];
        let m = common::cli_convert(&teacher_path, &out, &[&flags[..], &more[..]].concat());
        let info = common::supra_path("info", &out, &[]);
        let info = String::from_utf8_lossy(&info.stdout).to_string();
        assert!(
            info.contains("window ×1, supra at layers 1")
                && info.contains("8 tokens + 2 sinks (at cache positions)")
                && info.contains(&format!("φ {fm}"))
                && info.contains(&format!("{mix} mix, {rule} rule")),
            "{info}"
        );
        assert_eq!(
            m.config.layer_kinds,
            vec![AttentionKind::Window, AttentionKind::Supra]
        );
        let sc = m.config.supra.as_ref().unwrap();
        assert_eq!(sc.feature_map, fm.parse::<FeatureKind>().unwrap());
        assert_eq!(sc.window.unwrap().mix, mix.parse::<Mix>().unwrap());
        assert_eq!(sc.window.unwrap().rule, rule.parse::<LinearRule>().unwrap());
        assert_eq!(
            m.weights
                .keys()
                .filter(|n| n.ends_with("window_beta"))
                .count(),
            usize::from(rule == "delta")
        );
        assert_eq!(sc.decay, decay.parse().unwrap());
        assert_eq!(
            m.weights
                .keys()
                .filter(|n| n.ends_with("decay_logit"))
                .count(),
            if decay == "learnable" { 2 } else { 0 }
        );
        let label = format!("{fm} {mix} {decay} {rule}");

        let ids = ids(40);
        let mut model = Llama::new(&m.config, &m.weights).unwrap();
        let chunked = model.score_with(&ids, Form::Chunked).unwrap();
        for form in [Form::Parallel, Form::Recurrent] {
            let d = max_diff(&model.score_with(&ids, form).unwrap(), &chunked);
            assert!(d < 1e-4, "{label}: {form:?} differs from chunked by {d}");
        }

        // A state saved after 20 tokens and restored continues as if nothing happened.
        let whole = logits(&model, &ids);
        let vocab = m.config.vocab_size;
        let mut state = supra::infer::state::State::new(&model);
        state.feed(&model, &ids[..20]).unwrap();
        let tensors: std::collections::HashMap<_, _> =
            state.cache.named_tensors().unwrap().into_iter().collect();
        let mut cache = model.cache_from_tensors(&tensors, 20).unwrap();
        for (i, &id) in ids.iter().enumerate().skip(20) {
            let x = Tensor::new(&[id], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let l: Vec<f32> = model
                .forward_last(&x, &mut cache)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let d = max_diff(&l, &whole[i * vocab..(i + 1) * vocab]);
            assert!(d < 1e-4, "{label}: restored state, token {i}: {d}");
        }

        // Exported and reloaded: the same model.
        let exported = dir.path().join(format!("{fm}-{mix}-{decay}-{rule}-export"));
        let run = common::supra_path("export", &out, &["--out", exported.to_str().unwrap()]);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let e = supra::io::load(&exported).unwrap();
        assert_eq!(
            logits(&Llama::new(&e.config, &e.weights).unwrap(), &ids),
            whole
        );
        // ...and transformers' too: the model file beside it, the config pointing to it.
        let code = std::fs::read_to_string(exported.join("modeling_supra.py")).unwrap();
        assert_eq!(
            code,
            include_str!("../python/supra_torch/modeling_supra.py")
        );
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(exported.join("config.json")).unwrap()).unwrap();
        assert_eq!(
            cfg["auto_map"]["AutoModelForCausalLM"],
            "modeling_supra.SupraForCausalLM"
        );

        // Q8_0 weights: token by token within quantization noise of the f32 pass.
        model.quantize(WeightFormat::Q8_0).unwrap();
        let scale = whole.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = max_diff(&stepwise_logits(&model, &ids), &whole);
        assert!(
            worst < 0.05 * scale,
            "{label} Q8_0: {worst} (logits up to {scale})"
        );
    }
}

/// With a window longer than the sequence nothing ever reaches the linear branch: the
/// converted model is the teacher, whichever branches run but the linear one alone. With a
/// short window, the window-only control differs from the teacher, and from the hybrid.
#[test]
fn a_window_longer_than_the_text_is_the_teacher() {
    let dir = tempfile::tempdir().unwrap();
    let (_, teacher) = tiny_teacher(dir.path());
    let ids = ids(50);
    let want = logits(
        &Llama::new(&teacher.config, &teacher.weights).unwrap(),
        &ids,
    );
    for fm in [
        FeatureKind::Relu,
        FeatureKind::Hedgehog,
        FeatureKind::Taylor,
    ] {
        let m = convert(&teacher, &window_opts(64, fm, Mix::Shared)).unwrap();
        let mut model = Llama::new(&m.config, &m.weights).unwrap();
        for b in [Branches::Both, Branches::Window] {
            model.set_branches(b);
            let d = max_diff(&logits(&model, &ids), &want);
            assert!(d < 1e-4, "{fm:?} {b:?}: {d}");
        }
        model.set_branches(Branches::Linear);
        assert!(max_diff(&logits(&model, &ids), &want) > 1e-2);

        let m = convert(&teacher, &window_opts(4, fm, Mix::Shared)).unwrap();
        let mut model = Llama::new(&m.config, &m.weights).unwrap();
        let both = logits(&model, &ids);
        model.set_branches(Branches::Window);
        let window = logits(&model, &ids);
        assert!(max_diff(&window, &want) > 1e-3 && max_diff(&window, &both) > 1e-4);
    }
}

/// Each window layer's mix starts at the share chosen for its feature map and mix, or at the
/// one asked for.
#[test]
fn the_linear_share_starts_where_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (_, teacher) = tiny_teacher(dir.path());
    for fm in [
        FeatureKind::Relu,
        FeatureKind::Hedgehog,
        FeatureKind::Taylor,
    ] {
        for mix in [Mix::Shared, Mix::Gated] {
            for share in [None, Some(0.25)] {
                let opts = ConvertOptions {
                    mix_share: share,
                    ..window_opts(8, fm, mix)
                };
                let m = convert(&teacher, &opts).unwrap();
                let want = share.unwrap_or_else(|| supra::convert::initial_share(fm, mix));
                for i in 0..m.config.num_hidden_layers {
                    let theta = &m.weights[&format!("model.layers.{i}.self_attn.window_mix")];
                    let got: Vec<f32> = theta.to_vec1().unwrap();
                    for g in got {
                        let got = 1.0 / (1.0 + (-f64::from(g)).exp());
                        assert!(
                            (got - want).abs() < 1e-6 * want,
                            "{fm:?} {mix:?}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

/// `--branches` runs the controls from the command line, and refuses a model without window
/// layers rather than ignoring the flag; convert refuses settings that do not fit together.
#[test]
fn branch_controls_and_convert_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let (teacher_path, teacher) = tiny_teacher(dir.path());
    let t = teacher_path.to_str().unwrap();
    let out = common::supra(&["score", t, "--prompt", "a b c d", "--branches", "window"]);
    common::assert_clean_error(&out, &["--branches", "no window layers"]);
    let converted = dir.path().join("w");
    let o = converted.to_str().unwrap();
    for (args, needle) in [
        (vec!["--supra-layers", "1"], "--window"),
        (vec!["--window", "0"], "at least 1"),
        (vec!["--window", "8", "--supra-layers", "9"], "layer 9"),
        (vec!["--mix-share", "0.1"], "--window"),
        (vec!["--window", "8", "--mix-share", "1"], "(0, 1)"),
        (vec!["--window", "8", "--mix-share", "NaN"], "(0, 1)"),
        (
            vec!["--window", "8", "--linear-rule", "delta"],
            "--mix shared with --linear-rule delta: the delta rule needs the gated or value mix",
        ),
        (
            vec!["--window", "8", "--mix", "value"],
            "--mix value with --linear-rule add: the value mix needs the delta rule",
        ),
        (vec!["--linear-rule", "delta"], "--window"),
        (
            vec!["--feature-map", "hedgehog", "--feature-dim", "8"],
            "hedgehog",
        ),
        (
            vec!["--feature-map", "hedgehog", "--phi-init", "random"],
            "identity",
        ),
    ] {
        let mut a = vec!["convert", t, "--out", o];
        a.extend(args.iter());
        let run = common::supra(&a);
        assert!(!run.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(
            stderr.contains(needle) && !stderr.contains("panicked"),
            "{args:?}: {stderr}"
        );
    }
    let m = convert(&teacher, &window_opts(4, FeatureKind::Relu, Mix::Gated)).unwrap();
    supra::io::hf_dir::save(&m, &converted).unwrap();
    let score = |branches: &str| -> f64 {
        let out = common::supra(&[
            "score",
            o,
            "--prompt",
            "the cat sat on the mat and the dog sat",
            "--json",
            "--branches",
            branches,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["nll"].as_f64().unwrap()
    };
    let (both, window, linear) = (score("both"), score("window"), score("linear"));
    assert!(both != window && window != linear && both != linear);
}

/// Attention transfer and cross-entropy training reach every new parameter of a window
/// layer: φ (each feature map), the mix, learned decays and the delta rule's β.
#[test]
fn training_reaches_phi_the_mix_and_the_decays() {
    let dir = tempfile::tempdir().unwrap();
    let (_, teacher) = tiny_teacher(dir.path());
    for (fm, rule) in [
        (FeatureKind::Relu, LinearRule::Add),
        (FeatureKind::Hedgehog, LinearRule::Add),
        (FeatureKind::Taylor, LinearRule::Add),
        (FeatureKind::Relu, LinearRule::Delta),
        (FeatureKind::Taylor, LinearRule::Delta),
    ] {
        let delta = rule == LinearRule::Delta;
        // The delta rule with each of its mixes.
        let mix = match (delta, fm) {
            (false, _) => Mix::Shared,
            (true, FeatureKind::Relu) => Mix::Gated,
            (true, _) => Mix::Value,
        };
        let mut opts = window_opts(4, fm, mix);
        opts.window.as_mut().unwrap().rule = rule;
        opts.decay = supra::config::Decay::Learnable;
        let m = convert(&teacher, &opts).unwrap();
        let (vars, llama) = common::testing::training_model(&m);
        let tokens = Tensor::new(&ids(24)[..], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let teacher_walk =
            supra::train::transfer::Teacher::new(&m, &[], Default::default()).unwrap();
        let transfer = teacher_walk.loss(&llama, &tokens).unwrap();
        let ce = common::testing::next_token_loss(&llama, &ids(24));
        for (what, loss) in [("transfer", transfer), ("cross-entropy", ce)] {
            let grads = loss.backward().unwrap();
            let new = ["phi_", "window_mix", "decay_logit", "window_beta"];
            let reached = vars
                .iter()
                .filter(|(n, _)| new.iter().any(|p| n.contains(p)));
            assert_eq!(
                reached
                    .clone()
                    .filter(|(n, _)| n.contains("window_beta"))
                    .count(),
                if delta { 2 } else { 0 },
                "{fm:?} {rule:?}"
            );
            for (name, var) in reached {
                let g = common::testing::grad_l1(&grads, var);
                assert!(
                    g.is_some_and(|g| g > 0.0 && g.is_finite()),
                    "{fm:?} {rule:?} {what}: {name} gets {g:?}"
                );
            }
        }
    }
}

/// The converted SmolLM2 with a 64-token window (each feature map, untrained, each linear
/// branch at its default starting share): the three forms give the same log-probs on 1,000
/// tokens of a held-out book, within 1e-3 (4e-5 measured). At a starting share of 0.1 the
/// random relu map's linear branch drowned the window and made the untrained model
/// ill-conditioned: its forms were 1.7e-3 apart, each 7.5e-4 to 9.9e-4 from the exact (f64)
/// log-probs (docs/results/window.md).
#[test]
fn window_smollm2_modes_agree_on_1000_tokens() {
    let teacher = supra::io::load(&common::real_model()).unwrap();
    let text = std::fs::read_to_string(common::data_dir().join("text/test/pg1342.txt")).unwrap();
    let mut ids = teacher.tokenizer.encode(&text[..20_000]).unwrap();
    ids.truncate(1000);
    for fm in [
        FeatureKind::Hedgehog,
        FeatureKind::Relu,
        FeatureKind::Taylor,
    ] {
        let mut opts = window_opts(64, fm, Mix::Shared);
        opts.window.as_mut().unwrap().sinks = 4;
        opts.seed = 0;
        opts.mix_share = None;
        let m = convert(&teacher, &opts).unwrap();
        let model = Llama::new(&m.config, &m.weights).unwrap();
        let run = |form| model.score_with(&ids, form).unwrap();
        let (p, c, r) = (
            run(Form::Parallel),
            run(Form::Chunked),
            run(Form::Recurrent),
        );
        let (dc, dr) = (max_diff(&p, &c), max_diff(&p, &r));
        println!("{fm:?}: 1000 tokens, max |logprob diff| parallel-chunked {dc:.2e}, parallel-recurrent {dr:.2e}");
        assert!(
            dc <= 1e-3 && dr <= 1e-3,
            "{fm:?}: chunked {dc}, recurrent {dr}"
        );
    }
}

/// A hand-edited config.json with a bad window is refused by name, never run; one without
/// the sinks' positions (written before the option) reads as absolute.
#[test]
fn bad_window_configs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (_, teacher) = tiny_teacher(dir.path());
    let out = dir.path().join("w");
    let m = convert(&teacher, &window_opts(8, FeatureKind::Relu, Mix::Shared)).unwrap();
    supra::io::hf_dir::save(&m, &out).unwrap();
    let p = out.join("config.json");
    let good = std::fs::read_to_string(&p).unwrap();
    let v: serde_json::Value = serde_json::from_str(&good).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = v.clone();
        f(&mut v);
        std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
        common::supra_path("info", &out, &[])
    };
    let o = edit(&|v| {
        v["supra"]
            .as_object_mut()
            .unwrap()
            .remove("window")
            .map(drop)
            .unwrap()
    });
    common::assert_clean_error(&o, &["config.json", "window layers without supra.window"]);
    let o = edit(&|v| v["supra"]["window"]["window"] = 0.into());
    common::assert_clean_error(&o, &["config.json", "at least 1"]);
    let o = edit(&|v| v["supra"]["window"]["mix"] = "blend".into());
    common::assert_clean_error(&o, &["config.json", "blend"]);
    let o = edit(&|v| v["supra"]["feature_map"] = "cosine".into());
    common::assert_clean_error(&o, &["config.json", "cosine"]);
    let o = edit(&|v| v["supra"]["window"]["sink_positions"] = "middle".into());
    common::assert_clean_error(&o, &["config.json", "middle"]);
    let o = edit(&|v| v["supra"]["window"]["rule"] = "multiply".into());
    common::assert_clean_error(&o, &["config.json", "multiply"]);
    let o = edit(&|v| v["supra"]["window"]["rule"] = "delta".into());
    common::assert_clean_error(
        &o,
        &[
            "config.json",
            "supra.window",
            "needs the gated or value mix",
        ],
    );
    let o = edit(&|v| v["supra"]["window"]["mix"] = "value".into());
    common::assert_clean_error(
        &o,
        &[
            "config.json",
            "supra.window",
            "the value mix needs the delta rule",
        ],
    );
    // A config from before the option loads with the positions its model had.
    let o = edit(&|v| {
        v["supra"]["window"]
            .as_object_mut()
            .unwrap()
            .remove("sink_positions")
            .map(drop)
            .unwrap()
    });
    let info = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && info.contains("2 sinks (at absolute positions)"),
        "{info}"
    );
}

/// `supra bench attention --rule delta`: one row for each of the delta rule's training forms;
/// an unknown rule and zero repeats are refused.
#[test]
fn bench_attention_times_both_delta_forms() {
    let out = common::supra(&[
        "bench",
        "attention",
        "--rule",
        "delta",
        "--seq",
        "128",
        "--repeats",
        "1",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for form in ["| delta, fused | 128 |", "| delta, composed | 128 |"] {
        assert!(text.contains(form), "{form} missing from:\n{text}");
    }
    let bad = common::supra(&["bench", "attention", "--rule", "mult"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("known: add, delta"),
        "{err}"
    );
    let none = common::supra(&["bench", "attention", "--rule", "delta", "--repeats", "0"]);
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(!none.status.success() && err.contains("--repeats"), "{err}");
}

/// `supra bench infer` on a window hybrid: one row per context, each decode rate paired with
/// the first context's at the same moment, and the state the same size at every context.
#[test]
fn bench_infer_pairs_each_context_with_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let (teacher, _) = tiny_teacher(dir.path());
    let model = dir.path().join("w");
    common::cli_convert(&teacher, &model, &["--window", "8", "--sinks", "2"]);
    let csv = dir.path().join("bench.csv");
    let out = common::supra(&[
        "bench",
        "infer",
        model.to_str().unwrap(),
        "--contexts",
        "16,64",
        "--weights",
        "f32",
        "--gen",
        "4",
        "--repeats",
        "2",
        "--csv",
        csv.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut rows = csv::Reader::from_reader(text.as_bytes());
    let head = rows.headers().unwrap().clone();
    let col = |r: &csv::StringRecord, name: &str| -> f64 {
        let i = head.iter().position(|h| h == name).unwrap();
        r[i].parse().unwrap()
    };
    let rows: Vec<_> = rows.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 2, "{text}");
    for (r, context) in rows.iter().zip([16.0, 64.0]) {
        assert_eq!(col(r, "context"), context);
        assert!(
            col(r, "decode_tps") > 0.0 && col(r, "decode_tps_first") > 0.0,
            "{text}"
        );
    }
    assert_eq!(col(&rows[0], "state_mib"), col(&rows[1], "state_mib"));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("same moment"), "{table}");
}
