//! `supra train` on a tiny model: exact resume, learning, and bad input.

mod common;

use candle_core::Tensor;
use common::testing::write_tiny_gguf;
use std::path::{Path, PathBuf};
use supra::convert::{convert, ConvertOptions};
use supra::io::LoadedModel;
use supra::train::recipe::Recipe;
use supra::train::run::{train, TrainConfig, TrainInputs};

const PROSE: &str = "the cat sat on the mat and the dog ran to the door. \
a bird sang in the tree while the sun rose over the hill. \
then the farmer walked the long road to town with his cart of apples. ";

fn tiny_linear(dir: &Path) -> LoadedModel {
    let p = dir.join("teacher.gguf");
    write_tiny_gguf(&p, 21).unwrap();
    let teacher = supra::io::load(&p).unwrap();
    convert(
        &teacher,
        &ConvertOptions {
            softmax_layers: vec![0],
            ..Default::default()
        },
    )
    .unwrap()
}

fn corpus(dir: &Path) -> Vec<PathBuf> {
    let d = dir.join("corpus");
    std::fs::create_dir_all(&d).unwrap();
    for i in 0..3 {
        std::fs::write(d.join(format!("doc{i}.txt")), PROSE.repeat(8 + i)).unwrap();
    }
    let jsonl: String = (0..5)
        .map(|i| format!("{{\"text\": \"{} number {i}\"}}\n", PROSE.trim()))
        .collect();
    std::fs::write(d.join("more.jsonl"), jsonl).unwrap();
    std::fs::write(d.join("notes.md"), "not training data").unwrap();
    vec![d]
}

/// A temporary directory with the corpus and a token cache in it.
fn workspace() -> (tempfile::TempDir, Vec<PathBuf>, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let cache = dir.path().join("cache");
    (dir, data, cache)
}

fn config(recipe: Recipe) -> TrainConfig {
    TrainConfig {
        recipe,
        preset: "test".into(),
        seq_len: 32,
        batch_tokens: 64,
        micro_batch: 1,
        steps: 20,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 2,
        beta1: 0.9,
        beta2: 0.95,
        adam_eps: 1e-8,
        weight_decay: 0.1,
        clip: 1.0,
        z_loss: 0.0,
        eval_every: 5,
        eval_windows: 2,
        checkpoint_every: 4,
        keep: 2,
        seed: 7,
        freeze: vec![],
        max_bad_steps: 3,
        transfer_steps: if recipe.has_transfer_phase() { 12 } else { 0 },
        transfer_lr: 1e-2,
        transfer_min_lr: 1e-3,
        transfer_warmup_steps: 0,
        transfer_target: Default::default(),
        lora_rank: 4,
        lora_alpha: 8.0,
        temperature: 1.0,
        ce_weight: 0.0,
        min_window: None,
        gap_weight: 0.0,
        mix_lr_scale: 1.0,
        beta_lr_scale: 1.0,
    }
}

fn run(
    model: LoadedModel,
    cfg: &TrainConfig,
    data: &[PathBuf],
    out: &Path,
    cache: &Path,
    resume: bool,
    stop_after: Option<u64>,
) -> supra::train::run::Summary {
    let inputs = TrainInputs {
        data,
        valid: Some(data),
        out,
        resume,
        stop_after,
        token_cache: cache,
        teacher: None,
    };
    train(model, cfg, &inputs).unwrap()
}

/// The tiny relu window cell trained with `cfg` into `dir/name`.
fn window_run(
    dir: &Path,
    name: &str,
    cfg: &TrainConfig,
    (data, cache): (&[PathBuf], &Path),
    resume: bool,
    stop_after: Option<u64>,
) -> PathBuf {
    let out = dir.join(name);
    let model = tiny_cell(dir, Cell::WindowRelu);
    run(model, cfg, data, &out, cache, resume, stop_after);
    out
}

/// [`window_run`] straight (`dir/straight`) and stopped after `stop` updates then resumed
/// (`dir/split`): the two runs' directories, their losses checked equal.
fn straight_and_resumed(
    dir: &Path,
    cfg: &TrainConfig,
    files: (&[PathBuf], &Path),
    stop: u64,
) -> (PathBuf, PathBuf) {
    let straight = window_run(dir, "straight", cfg, files, false, None);
    window_run(dir, "split", cfg, files, false, Some(stop));
    let split = window_run(dir, "split", cfg, files, true, None);
    for ((s, x), (_, y)) in losses(&straight).iter().zip(&losses(&split)) {
        assert!((x - y).abs() <= 1e-6, "step {s}: {x} vs {y}");
    }
    (straight, split)
}

/// The settings a run's last checkpoint recorded (its run.json).
fn recorded_run(out: &Path) -> serde_json::Value {
    let last = supra::train::checkpoint::list(out).unwrap().pop().unwrap();
    serde_json::from_str(&std::fs::read_to_string(last.join("run.json")).unwrap()).unwrap()
}

/// The error (with its causes) of a fresh run that must be refused.
fn refusal(
    model: LoadedModel,
    cfg: &TrainConfig,
    data: &[PathBuf],
    out: &Path,
    cache: &Path,
) -> String {
    let inputs = TrainInputs {
        data,
        valid: None,
        out,
        resume: false,
        stop_after: None,
        token_cache: cache,
        teacher: None,
    };
    format!(
        "{:#}",
        train(model, cfg, &inputs).err().expect("must refuse")
    )
}

fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

/// 20 updates straight equal 10 updates, a stop, and 10 more after --resume.
#[test]
fn resume_is_exact_for_every_recipe() {
    // The two-phase recipes stop at 10 and cross into their second phase (at 12) after the
    // resume.
    for recipe in Recipe::ALL {
        let dir = tempfile::tempdir().unwrap();
        let data = corpus(dir.path());
        let cache = dir.path().join("cache");
        let cfg = config(recipe);
        let straight = dir.path().join("straight");
        run(
            tiny_linear(dir.path()),
            &cfg,
            &data,
            &straight,
            &cache,
            false,
            None,
        );
        let split = dir.path().join("split");
        let first = run(
            tiny_linear(dir.path()),
            &cfg,
            &data,
            &split,
            &cache,
            false,
            Some(10),
        );
        assert_eq!(first.steps_done, 10);
        assert!(first.final_dir.is_none());
        // The model argument is ignored on resume: the checkpoint holds the model.
        let second = run(
            tiny_linear(dir.path()),
            &cfg,
            &data,
            &split,
            &cache,
            true,
            None,
        );
        assert_eq!(second.steps_done, 20);
        if recipe == Recipe::Supra {
            // Changed data cannot resume a run: its cursor would mean other windows.
            let other = dir.path().join("other");
            std::fs::create_dir_all(&other).unwrap();
            std::fs::write(other.join("x.txt"), PROSE.repeat(30)).unwrap();
            let inputs = TrainInputs {
                data: &[other],
                valid: None,
                out: &split,
                resume: true,
                stop_after: None,
                token_cache: &cache,
                teacher: None,
            };
            let err = train(tiny_linear(dir.path()), &cfg, &inputs)
                .err()
                .expect("must refuse");
            assert!(format!("{err:#}").contains("training data"), "{err:#}");
        }
        if recipe.distills() {
            // Nor can another teacher: the model argument is the teacher on resume.
            let inputs = TrainInputs {
                data: &data,
                valid: None,
                out: &split,
                resume: true,
                stop_after: None,
                token_cache: &cache,
                teacher: None,
            };
            let mut other = tiny_linear(dir.path());
            let w = &other.weights["model.norm.weight"];
            let w = (w * 1.5).unwrap();
            other.weights.insert("model.norm.weight".into(), w);
            let err = train(other, &cfg, &inputs).err().expect("must refuse");
            assert!(
                format!("{err:#}").contains("not the one this run started distilling from"),
                "{err:#}"
            );
        }
        let (a, b) = (losses(&straight), losses(&split));
        assert_eq!(a.len(), 20);
        assert_eq!(
            a.iter().map(|x| x.0).collect::<Vec<_>>(),
            b.iter().map(|x| x.0).collect::<Vec<_>>()
        );
        for ((s, x), (_, y)) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-6, "{recipe:?} step {s}: {x} vs {y}");
        }
        let png = std::fs::read(split.join("loss.png")).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        // Only the last `keep` checkpoints remain; the final model loads and matches.
        assert_eq!(supra::train::checkpoint::list(&split).unwrap().len(), 2);
        let f1 = supra::io::load(&straight.join("final")).unwrap();
        let f2 = supra::io::load(&split.join("final")).unwrap();
        for (name, t) in &f1.weights {
            let d = common::testing::max_abs_diff(t, &f2.weights[name]);
            assert!(d <= 1e-6, "{recipe:?} {name} differs by {d}");
        }
    }
}

#[test]
fn transfer_learns_phi_and_calibrates_wo() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let model = tiny_linear(dir.path());
    let before = model.weights.clone();
    let mut cfg = config(Recipe::Transfer);
    cfg.steps = 30;
    cfg.lr = 1e-2;
    let out = dir.path().join("run");
    let s = run(
        model,
        &cfg,
        &data,
        &out,
        &dir.path().join("cache"),
        false,
        None,
    );
    let first = s
        .history
        .first()
        .unwrap()
        .val_loss
        .unwrap_or(s.history[0].loss);
    let evals: Vec<f64> = s.history.iter().filter_map(|m| m.val_loss).collect();
    assert!(
        evals.last().unwrap() < &(0.9 * evals[0]),
        "validation loss did not fall: {evals:?} (first {first})"
    );
    let after = supra::io::load(&out.join("final")).unwrap();
    for (name, t) in &before {
        let d = common::testing::max_abs_diff(t, &after.weights[name]);
        // φ trains; the SUPRA layer's Wo is rescaled once (calibration); nothing else moves.
        let expected = name.contains(".phi_") || name == "model.layers.1.self_attn.o_proj.weight";
        assert_eq!(d > 0.0, expected, "{name} changed by {d}");
    }
}

/// `supra train MODEL --data DATA --out OUT --no-valid --steps 2` with a private token cache,
/// windows of 32 and updates of 64 tokens unless `extra` sets them.
fn train_cli(
    cache: &Path,
    model: &Path,
    data: &Path,
    out: &Path,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "train",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--no-valid",
        "--steps",
        "2",
    ];
    for (flag, default) in [("--seq-len", "32"), ("--batch-tokens", "64")] {
        if !extra.contains(&flag) {
            args.extend([flag, default]);
        }
    }
    args.extend_from_slice(extra);
    std::process::Command::new(env!("CARGO_BIN_EXE_supra"))
        .env("SUPRA_CACHE_DIR", cache)
        .args(&args)
        .output()
        .unwrap()
}

#[test]
fn bad_training_input_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let linear = dir.path().join("linear");
    supra::io::hf_dir::save(&tiny_linear(dir.path()), &linear).unwrap();
    let cache = dir.path().join("cache");
    let with_cache =
        |out: &Path, data: &Path, extra: &[&str]| train_cli(&cache, &linear, data, out, extra);
    // Empty corpus.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("a.txt"), "").unwrap();
    common::assert_clean_error(
        &with_cache(&dir.path().join("o1"), &empty, &[]),
        &["corpus is empty"],
    );
    // No usable files at all.
    let none = dir.path().join("none");
    std::fs::create_dir_all(&none).unwrap();
    std::fs::write(none.join("a.csv"), "x").unwrap();
    common::assert_clean_error(
        &with_cache(&dir.path().join("o2"), &none, &[]),
        &["no .txt, .txt.gz or .jsonl files"],
    );
    // A binary file, named.
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(bin.join("good.txt"), PROSE.repeat(10)).unwrap();
    std::fs::write(
        bin.join("image.txt"),
        [0x89u8, 0x50, 0x4e, 0x47, 0xff, 0x00, 0x01],
    )
    .unwrap();
    common::assert_clean_error(
        &with_cache(&dir.path().join("o3"), &bin, &[]),
        &["image.txt", "not UTF-8"],
    );
    // A JSONL line without "text", with its line number.
    let js = dir.path().join("js");
    std::fs::create_dir_all(&js).unwrap();
    std::fs::write(
        js.join("d.jsonl"),
        "{\"text\": \"ok\"}\n{\"body\": \"no\"}\n",
    )
    .unwrap();
    common::assert_clean_error(
        &with_cache(&dir.path().join("o4"), &js, &[]),
        &["d.jsonl:2", "\"text\""],
    );
    // Windows longer than the model's context.
    let good = corpus(dir.path());
    common::assert_clean_error(
        &with_cache(
            &dir.path().join("o5"),
            &good[0],
            &["--seq-len", "100000", "--batch-tokens", "100000"],
        ),
        &["--seq-len 100000", "context length 256"],
    );
    // Settings whose memory estimate exceeds this machine.
    common::assert_clean_error(
        &with_cache(
            &dir.path().join("o6"),
            &good[0],
            &[
                "--seq-len",
                "256",
                "--batch-tokens",
                "2560000000",
                "--micro-batch",
                "10000000",
            ],
        ),
        &["GiB of memory", "available"],
    );
    // A run directory with checkpoints is not overwritten without --resume.
    let out = dir.path().join("o7");
    let ok = with_cache(&out, &good[0], &[]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    common::assert_clean_error(
        &with_cache(&out, &good[0], &[]),
        &["already holds checkpoints", "--resume"],
    );
    // --min-window needs window layers (the flag reaches the run's settings).
    common::assert_clean_error(
        &with_cache(&dir.path().join("o9"), &good[0], &["--min-window", "4"]),
        &["--min-window applies to models with window layers"],
    );
    common::assert_clean_error(
        &with_cache(
            &dir.path().join("o10"),
            &good[0],
            &["--recipe", "distill", "--gap-weight", "0.5"],
        ),
        &["--gap-weight applies to models with window layers"],
    );
    // The transfer recipe needs SUPRA layers.
    let teacher = dir.path().join("teacher.gguf");
    common::assert_clean_error(
        &train_cli(&cache, &teacher, &good[0], &dir.path().join("o8"), &[]),
        &["convert it first"],
    );
}

/// Non-finite losses skip the update; after `max_bad_steps` in a row the run stops with a
/// clear error that names the last good checkpoint.
#[test]
fn non_finite_updates_are_skipped_then_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let mut model = tiny_linear(dir.path());
    // (φ's ReLU maps NaN to 0, so poison the values instead.)
    let name = "model.layers.1.self_attn.v_proj.weight";
    let poisoned = (&model.weights[name] + f64::NAN).unwrap();
    model.weights.insert(name.to_string(), poisoned);
    let out = dir.path().join("run");
    let inputs = TrainInputs {
        data: &data,
        valid: None,
        out: &out,
        resume: false,
        stop_after: None,
        token_cache: &dir.path().join("cache"),
        teacher: None,
    };
    let err = train(model, &config(Recipe::Transfer), &inputs)
        .err()
        .expect("the run must fail");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("3 updates in a row had a non-finite loss")
            && msg.contains("Last good checkpoint: none"),
        "{msg}"
    );
    let skipped = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(
        skipped
            .lines()
            .filter(|l| l.contains("\"skipped\":true"))
            .count(),
        2,
        "{skipped}"
    );
}

/// Wo calibration changes the student, never the teacher the transfer recipe follows: with the
/// scales declared, the teacher's per-head outputs in every layer are as before calibration.
#[test]
fn calibration_leaves_the_teacher_trajectory_alone() {
    use candle_core::{Device, Tensor};
    use supra::model::llama::Llama;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::testing::tiny_config();
    cfg.num_hidden_layers = 3;
    cfg.layer_kinds = vec![supra::config::AttentionKind::Softmax; 3];
    let p = dir.path().join("t3.gguf");
    common::testing::TinyGguf::new(&cfg, 5, candle_core::quantized::GgmlDType::F32)
        .unwrap()
        .write(&p)
        .unwrap();
    let mut model = convert(&supra::io::load(&p).unwrap(), &ConvertOptions::default()).unwrap();
    let tokens = Tensor::new(&[[3u32, 9, 27, 81, 243, 5, 15, 45, 135, 100]], &Device::Cpu).unwrap();
    use supra::train::transfer::{calibrate_output_scale, Teacher};
    let plain = Teacher::new(&model, &[], Default::default()).unwrap();
    let before = plain
        .head_rms(&Llama::new(&model.config, &model.weights).unwrap(), &tokens)
        .unwrap();
    let scales = calibrate_output_scale(&mut model, std::slice::from_ref(&tokens)).unwrap();
    assert!(scales.iter().all(Option::is_some));
    let calibrated = Llama::new(&model.config, &model.weights).unwrap();
    let naive = plain.head_rms(&calibrated, &tokens).unwrap();
    let declared = Teacher::new(&model, &scales, Default::default()).unwrap();
    let after = declared.head_rms(&calibrated, &tokens).unwrap();
    let diff = |a: &[Option<Vec<f64>>], b: &[Option<Vec<f64>>]| -> f64 {
        a.iter()
            .zip(b)
            .flat_map(|(x, y)| {
                x.as_ref()
                    .unwrap()
                    .iter()
                    .zip(y.as_ref().unwrap())
                    .map(|(p, q)| (p - q).abs())
            })
            .fold(0.0, f64::max)
    };
    assert!(
        diff(&before, &after) < 1e-5,
        "teacher moved by {}",
        diff(&before, &after)
    );
    assert!(
        diff(&before, &naive) > 1e-3,
        "without the declared scales the later layers must differ"
    );
    // The calibrated Wo makes each head's scale the teacher's mean RMS in the first layer.
    for (s, r) in scales[0]
        .as_ref()
        .unwrap()
        .iter()
        .zip(before[0].as_ref().unwrap())
    {
        assert!((*s as f64 - r).abs() < 1e-6);
    }
}

/// The raw transfer target compares the teacher's per-head output as it is with the layer's
/// output times its head's calibration factor s: in a one-layer model the loss is then
/// mean((s·o − y)²), a quadratic in s with curvature 2·mean(o²) > 0, where the normalized
/// target does not depend on s at all.
#[test]
fn the_raw_transfer_target_scales_the_student_by_its_calibration() {
    use candle_core::{Device, Tensor};
    use supra::model::llama::Llama;
    use supra::train::transfer::{Target, Teacher};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::testing::tiny_config();
    cfg.num_hidden_layers = 1;
    cfg.layer_kinds = vec![supra::config::AttentionKind::Softmax];
    let p = dir.path().join("t1.gguf");
    common::testing::TinyGguf::new(&cfg, 5, candle_core::quantized::GgmlDType::F32)
        .unwrap()
        .write(&p)
        .unwrap();
    let model = convert(&supra::io::load(&p).unwrap(), &ConvertOptions::default()).unwrap();
    let llama = Llama::new(&model.config, &model.weights).unwrap();
    let tokens = Tensor::new(&[[3u32, 9, 27, 81, 243, 5, 15, 45, 135, 100]], &Device::Cpu).unwrap();
    let heads = model.config.num_attention_heads;
    let loss = |target, s: f32| -> f64 {
        let teacher = Teacher::new(&model, &[Some(vec![s; heads])], target).unwrap();
        let l = teacher.loss(&llama, &tokens).unwrap();
        l.to_scalar::<f32>().unwrap() as f64
    };
    let raw: Vec<f64> = (1..=4).map(|s| loss(Target::Raw, s as f32)).collect();
    let second = |i: usize| raw[i + 2] - 2.0 * raw[i + 1] + raw[i];
    assert!(second(0) > 1e-6, "raw loss not quadratic in s: {raw:?}");
    assert!(
        (second(0) - second(1)).abs() < 1e-4 * second(0),
        "raw loss not quadratic in s: {raw:?}"
    );
    let normalized: Vec<f64> = (1..=2)
        .map(|s| loss(Target::Normalized, s as f32))
        .collect();
    assert!((normalized[0] - normalized[1]).abs() < 1e-9 * normalized[0]);
    assert!((normalized[0] - raw[0]).abs() > 1e-3 * normalized[0]);
}

/// LoRA adapters: a model with adapters equals its merged form, and survives save and load.
#[test]
fn lora_adapters_merge_exactly() {
    use candle_core::{Device, Tensor};
    use supra::model::llama::Llama;
    let dir = tempfile::tempdir().unwrap();
    let mut model = tiny_linear(dir.path());
    supra::train::lora::add(&mut model, 4, 8.0, 1).unwrap();
    // B starts at zero; give it values so the adapters matter.
    for (name, t) in model.weights.iter_mut() {
        if name.ends_with("lora_B") {
            *t = Tensor::randn(0f32, 0.1, t.dims(), &Device::Cpu).unwrap();
        }
    }
    let ids = Tensor::new(&[[3u32, 14, 15, 92, 65, 35, 89, 79]], &Device::Cpu).unwrap();
    let logits = |m: &LoadedModel| -> Vec<f32> {
        let l = Llama::new(&m.config, &m.weights).unwrap();
        l.logits(&l.forward_hidden(&ids, None).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let with_adapters = logits(&model);
    let merged = supra::train::lora::merge(&model).unwrap();
    assert!(merged.config.lora.is_none() && !merged.weights.keys().any(|k| k.contains("lora")));
    let d = with_adapters
        .iter()
        .zip(logits(&merged))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-4, "merged model differs by {d}");
    let saved = dir.path().join("with-lora");
    supra::io::hf_dir::save(&model, &saved).unwrap();
    let reloaded = supra::io::load(&saved).unwrap();
    assert_eq!(reloaded.config.lora, model.config.lora);
    assert_eq!(logits(&reloaded), with_adapters);
}

#[test]
fn transfer_then_lora_finetune_changes_what_it_should() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let model = tiny_linear(dir.path());
    let before = model.weights.clone();
    let mut cfg = config(Recipe::TransferFinetune);
    cfg.steps = 16;
    cfg.transfer_steps = 8;
    let out = dir.path().join("run");
    let s = run(
        model,
        &cfg,
        &data,
        &out,
        &dir.path().join("cache"),
        false,
        None,
    );
    let objectives: Vec<String> = s
        .history
        .iter()
        .map(|m| format!("{:?}", m.objective))
        .collect();
    assert_eq!(
        objectives.iter().filter(|o| *o == "Transfer").count(),
        8,
        "{objectives:?}"
    );
    assert_eq!(
        objectives.iter().filter(|o| *o == "Ce").count(),
        8,
        "{objectives:?}"
    );
    let after = supra::io::load(&out.join("final")).unwrap();
    assert!(
        after.config.lora.is_none(),
        "the final model has its adapters merged"
    );
    assert_eq!(after.weights.len(), before.len());
    for (name, t) in &before {
        let d = common::testing::max_abs_diff(t, &after.weights[name]);
        let attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
            .iter()
            .any(|p| name.contains(p));
        let expected = name.contains(".phi_") || attn;
        assert_eq!(d > 0.0, expected, "{name} changed by {d}");
    }
}

/// A whole run of a fresh tiny model in `dir/name`; returns the run directory.
fn fresh_run(dir: &Path, cfg: &TrainConfig, data: &[PathBuf], cache: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    run(tiny_linear(dir), cfg, data, &out, cache, false, None);
    out
}

fn metric(out: &Path, key: &str) -> Vec<Option<f64>> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()[key].as_f64())
        .collect()
}

fn final_weights(out: &Path) -> LoadedModel {
    supra::io::load(&out.join("final")).unwrap()
}

/// Two windows per update read one at a time (micro-batch 1, gradients accumulated) or both in
/// one pass (micro-batch 2): the same losses and gradient norms, and so the same updates
/// (to float noise, which AdamW's normalization lifts for elements whose gradient is near 0).
#[test]
fn gradient_accumulation_equals_one_pass() {
    let (dir, data, cache) = workspace();
    let mut cfg = config(Recipe::Supra);
    cfg.steps = 4;
    let mut outs = Vec::new();
    for micro in [1, 2] {
        cfg.micro_batch = micro;
        let out = fresh_run(dir.path(), &cfg, &data, &cache, &format!("micro{micro}"));
        outs.push(out);
    }
    for key in ["loss", "grad_norm"] {
        let (a, b) = (metric(&outs[0], key), metric(&outs[1], key));
        for (step, (x, y)) in a.iter().zip(&b).enumerate() {
            let (x, y) = (x.unwrap(), y.unwrap());
            assert!(
                (x - y).abs() <= 1e-5 * x.abs(),
                "{key} at update {step}: {x} vs {y}"
            );
        }
    }
    let (a, b) = (final_weights(&outs[0]), final_weights(&outs[1]));
    for (name, t) in &a.weights {
        let d = common::testing::max_abs_diff(t, &b.weights[name]);
        assert!(d as f64 <= 0.05 * cfg.lr, "{name} differs by {d}");
    }
}

/// Clipping scales the gradient before AdamW: at a threshold of 1e-12 every element is far
/// below AdamW's ε, so the weights hardly move; the metrics keep the norm before clipping.
#[test]
fn clipping_bounds_the_update() {
    let (dir, data, cache) = workspace();
    let start = tiny_linear(dir.path());
    let mut cfg = config(Recipe::Supra);
    (cfg.steps, cfg.weight_decay, cfg.warmup_steps) = (2, 0.0, 0);
    let mut moved = Vec::new();
    for clip in [1e-12, 1e9] {
        cfg.clip = clip;
        let out = fresh_run(dir.path(), &cfg, &data, &cache, &format!("clip{clip}"));
        let w = "model.layers.1.mlp.up_proj.weight";
        moved.push(common::testing::max_abs_diff(
            &start.weights[w],
            &final_weights(&out).weights[w],
        ));
        let norms = metric(&out, "grad_norm");
        assert!(norms.iter().all(|n| n.unwrap() > 1e-3), "{norms:?}");
    }
    assert!(
        moved[0] < 1e-5,
        "clipped to 1e-12, the weights moved by {}",
        moved[0]
    );
    assert!(
        moved[1] > 1e-3,
        "unclipped, the weights moved by only {}",
        moved[1]
    );
}

/// The learning rate of every update follows the schedules: warmup then cosine for the
/// cross-entropy recipes; transfer+finetune runs its own schedule over the transfer updates,
/// then starts the fine-tuning one from its warmup.
#[test]
fn learning_rates_follow_the_schedules() {
    use supra::train::schedule::Schedule;
    let (dir, data, cache) = workspace();
    for recipe in [Recipe::Supra, Recipe::TransferFinetune] {
        let cfg = config(recipe);
        let out = fresh_run(dir.path(), &cfg, &data, &cache, recipe.name());
        let lrs: Vec<f64> = metric(&out, "lr").into_iter().map(Option::unwrap).collect();
        let offset = cfg.transfer_steps;
        let ce = Schedule {
            max_lr: cfg.lr,
            min_lr: cfg.min_lr,
            warmup_steps: cfg.warmup_steps,
            total_steps: cfg.steps - offset,
        };
        let transfer = Schedule {
            max_lr: cfg.transfer_lr,
            min_lr: cfg.transfer_min_lr,
            warmup_steps: cfg.transfer_warmup_steps,
            total_steps: cfg.transfer_steps,
        };
        for (step, lr) in lrs.iter().enumerate() {
            let step = step as u64;
            let want = if step < offset {
                transfer.lr(step)
            } else {
                ce.lr(step - offset)
            };
            assert!(
                (lr - want).abs() < 1e-12,
                "{recipe:?} update {step}: {lr} vs {want}"
            );
        }
        // Warmup from lr/2 at the first cross-entropy update, then down toward the floor.
        assert!((lrs[offset as usize] - cfg.lr / 2.0).abs() < 1e-12);
        let decay = &lrs[offset as usize + 2..];
        assert!(decay.windows(2).all(|w| w[1] < w[0]) && decay[decay.len() - 1] > cfg.min_lr);
    }
}

/// Validation reads the validation data, not the training data.
#[test]
fn validation_reads_its_own_data() {
    let (dir, data, cache) = workspace();
    let other = dir.path().join("valid");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(
        other.join("v.txt"),
        "zebras quietly juggle violet umbrellas beneath xylophones. ".repeat(12),
    )
    .unwrap();
    let mut cfg = config(Recipe::Supra);
    cfg.steps = 5;
    let mut finals = Vec::new();
    for (name, valid) in [("same", &data), ("other", &vec![other.clone()])] {
        let out = dir.path().join(name);
        let inputs = TrainInputs {
            data: &data,
            valid: Some(valid),
            out: &out,
            resume: false,
            stop_after: None,
            token_cache: &cache,
            teacher: None,
        };
        train(tiny_linear(dir.path()), &cfg, &inputs).unwrap();
        finals.push(
            metric(&out, "val_loss")
                .into_iter()
                .flatten()
                .last()
                .unwrap(),
        );
    }
    // Same training, so the same model: only the text it is validated on differs.
    assert!(
        (finals[0] - finals[1]).abs() > 1e-3,
        "validation loss {} on the training text and {} on other text",
        finals[0],
        finals[1]
    );
}

/// `--freeze` holds whole parameter groups (by the parameter table) fixed in the supra recipe.
#[test]
fn frozen_groups_do_not_move() {
    use supra::model::params::{self, ParamGroup};
    let (dir, data, cache) = workspace();
    let start = tiny_linear(dir.path());
    let mut cfg = config(Recipe::Supra);
    cfg.steps = 3;
    cfg.freeze = ParamGroup::parse_list("embeddings,mlp,norms").unwrap();
    let out = dir.path().join("frozen");
    run(
        tiny_linear(dir.path()),
        &cfg,
        &data,
        &out,
        &cache,
        false,
        None,
    );
    let end = final_weights(&out);
    for p in params::table(&start.config) {
        let d = common::testing::max_abs_diff(&start.weights[&p.name], &end.weights[&p.name]);
        match p.group {
            ParamGroup::Embedding | ParamGroup::Head | ParamGroup::Mlp | ParamGroup::Norm => {
                assert_eq!(d, 0.0, "{} ({:?}) moved", p.name, p.group)
            }
            ParamGroup::Attention | ParamGroup::Phi if !p.name.ends_with("bias") => {
                assert!(d > 0.0, "{} ({:?}) did not move", p.name, p.group)
            }
            _ => {}
        }
    }
}

/// `supra bench train --against-pytorch PYTHON` runs the PyTorch side right after each recipe on
/// the same model directory, sequence length, steps and threads, and prints both with their
/// ratio; a failing PyTorch side is a clear error. The side here is a stand-in script that
/// checks what it is given (the real one needs torch; its figures are in docs/results/train.md).
#[test]
fn bench_train_runs_the_pytorch_side_after_each_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    supra::io::hf_dir::save(&tiny_linear(dir.path()), &model).unwrap();
    let script = dir.path().join("side.py");
    std::fs::write(
        &script,
        r#"import json, os, sys
a = sys.argv[1:]
opt = {a[i]: a[i + 1] for i in range(1, len(a) - 1) if a[i].startswith("--") and not a[i + 1].startswith("--")}
assert os.path.exists(os.path.join(a[0], "model.safetensors")), a
assert opt["--seq-len"] == "16" and opt["--steps"] == "1" and int(opt["--threads"]) >= 1 and "--json" in a, a
if opt["--recipes"] == "transfer":
    sys.exit("no torch here")
print("| table |")
print(json.dumps({"recipe": opt["--recipes"], "tokens_per_s": 1e-3, "forward_s": 1.0, "backward_s": 2.0, "optimizer_s": 3.0}))
"#,
    )
    .unwrap();
    let run = |recipes: &str| {
        common::supra(&[
            "bench",
            "train",
            model.to_str().unwrap(),
            "--seq-len",
            "16",
            "--steps",
            "1",
            "--recipes",
            recipes,
            "--against-pytorch",
            "python3",
            "--pytorch-script",
            script.to_str().unwrap(),
        ])
    };
    let out = run("supra,transfer+finetune");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for recipe in ["| supra |", "| transfer+finetune"] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(recipe))
            .expect(&stdout);
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        // ... | PyTorch tokens/s | PyTorch split | supra / PyTorch |
        let n = cells.len();
        assert_eq!(cells[n - 4], "0.0", "{row}");
        assert_eq!(cells[n - 3], "1.00 / 2.00 / 3.00", "{row}");
        let ours: f64 = cells[3].parse().unwrap();
        let ratio: f64 = cells[n - 2].parse().unwrap();
        assert!((ratio / (ours / 1e-3) - 1.0).abs() < 0.01, "{row}");
    }
    common::assert_clean_error(&run("transfer"), &["side.py", "no torch here"]);
    let missing = common::supra(&[
        "bench",
        "train",
        model.to_str().unwrap(),
        "--against-pytorch",
        "python3",
        "--pytorch-script",
        dir.path().join("nope.py").to_str().unwrap(),
    ]);
    common::assert_clean_error(&missing, &["nope.py", "does not exist"]);
}

/// `--rounds N` times each recipe N times as supra-then-PyTorch pairs: the row's PyTorch
/// figure is the median of its N runs and the ratio the median of the N pairs' own ratios,
/// each listed beside it. The stand-in side reports 1e-4, 1 and 1e4 tokens/s on a recipe's
/// successive calls, so a ratio taken against the wrong run is off by 10,000× or more.
#[test]
fn bench_train_rounds_are_pairs_and_the_ratio_is_their_median() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    supra::io::hf_dir::save(&tiny_linear(dir.path()), &model).unwrap();
    let calls = dir.path().join("calls");
    let script = dir.path().join("side.py");
    std::fs::write(
        &script,
        format!(
            r#"import json, os, sys
a = sys.argv[1:]
opt = {{a[i]: a[i + 1] for i in range(1, len(a) - 1) if a[i].startswith("--") and not a[i + 1].startswith("--")}}
with open({calls:?}, "a") as f:
    f.write(opt["--recipes"] + "\n")
k = sum(1 for _ in open({calls:?}))
print(json.dumps({{"recipe": opt["--recipes"], "tokens_per_s": [1e-4, 1.0, 1e4][(k - 1) % 3], "forward_s": k, "backward_s": 0.0, "optimizer_s": 0.0}}))
"#,
            calls = calls.to_str().unwrap()
        ),
    )
    .unwrap();
    let out = common::supra(&[
        "bench",
        "train",
        model.to_str().unwrap(),
        "--seq-len",
        "16",
        "--steps",
        "1",
        "--recipes",
        "supra,transfer",
        "--rounds",
        "3",
        "--against-pytorch",
        "python3",
        "--pytorch-script",
        script.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Rounds alternate within a recipe: all of supra's, then all of transfer's.
    assert_eq!(
        std::fs::read_to_string(&calls).unwrap(),
        "supra\nsupra\nsupra\ntransfer\ntransfer\ntransfer\n"
    );
    for (recipe, forward) in [("| supra |", 2.0), ("| transfer |", 5.0)] {
        let theirs = [1e-4, 1.0, 1e4];
        let row = stdout
            .lines()
            .find(|l| l.starts_with(recipe))
            .expect(&stdout);
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        // ... | PyTorch tokens/s | PyTorch split | supra / PyTorch | by round |
        let n = cells.len();
        assert_eq!(cells[n - 5], "1.0", "{row}");
        assert_eq!(cells[n - 4], format!("{forward:.2} / 0.00 / 0.00"), "{row}");
        let each: Vec<f64> = cells[n - 2]
            .split(", ")
            .map(|x| x.parse().unwrap())
            .collect();
        assert_eq!(each.len(), 3, "{row}");
        let mut sorted = each.clone();
        sorted.sort_by(f64::total_cmp);
        assert_eq!(cells[n - 3].parse::<f64>().unwrap(), sorted[1], "{row}");
        // Each round's ratio is against that round's PyTorch run: ratio × theirs is supra's
        // own figure in every round, equal to within the machine's spread between runs of
        // the tiny model (which reached 31× with tests running beside it; a mispairing would
        // show 10,000×).
        let ours: Vec<f64> = each.iter().zip(theirs).map(|(r, t)| r * t).collect();
        let lo = ours.iter().cloned().fold(f64::MAX, f64::min);
        let hi = ours.iter().cloned().fold(0.0, f64::max);
        assert!(
            hi / lo < 1000.0,
            "ratios not against their own round: {row}"
        );
    }
}

/// Distillation's teacher is the pretrained model the conversion started from: its logits on a
/// converted model equal the original's, whatever the converted layers are.
#[test]
fn the_distillation_teacher_is_the_model_before_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("teacher.gguf");
    write_tiny_gguf(&p, 21).unwrap();
    let original = supra::io::load(&p).unwrap();
    let llama = supra::model::llama::Llama::new(&original.config, &original.weights).unwrap();
    let ids = candle_core::Tensor::new(&[[3u32, 9, 4, 17, 2, 8, 11, 5]], &candle_core::Device::Cpu)
        .unwrap();
    let want = llama
        .logits(&llama.forward_hidden(&ids, None).unwrap())
        .unwrap();
    let want = want.reshape((8, ())).unwrap();
    for linear in [
        tiny_linear(dir.path()),
        tiny_cell(dir.path(), Cell::WindowHedgehog),
    ] {
        let got = supra::train::distill::Teacher::new(&linear)
            .unwrap()
            .logits(&ids)
            .unwrap();
        let d = common::testing::max_abs_diff(&got, &want);
        assert!(d == 0.0, "teacher logits differ by {d}");
    }
}

/// `--teacher`: distillation learns the teacher given, not the model trained. The model's own
/// teacher given explicitly changes nothing; another teacher changes the losses; a resume must
/// give the same teacher; a teacher with another vocabulary, or one for a recipe that does not
/// distil, is refused.
#[test]
fn a_given_teacher_is_the_one_distilled_from() {
    let (dir, data, cache) = workspace();
    let mut cfg = config(Recipe::Distill);
    cfg.steps = 4;
    let student = || tiny_linear(dir.path());
    let inputs = |out: &'static str, teacher, resume, stop_after| TrainInputs {
        data: &data,
        valid: None,
        out: Box::leak(dir.path().join(out).into_boxed_path()),
        resume,
        stop_after,
        token_cache: &cache,
        teacher,
    };
    let own = student();
    let other = common::testing::tiny_loaded(dir.path(), 33, None).unwrap();
    train(student(), &cfg, &inputs("default", None, false, None)).unwrap();
    train(student(), &cfg, &inputs("own", Some(&own), false, None)).unwrap();
    train(
        student(),
        &cfg,
        &inputs("other", Some(&other), false, Some(2)),
    )
    .unwrap();
    let (default, given) = (
        losses(&dir.path().join("default")),
        losses(&dir.path().join("own")),
    );
    assert_eq!(default, given, "the model's own teacher given explicitly");
    let o = losses(&dir.path().join("other"));
    assert_ne!(o[0].1, default[0].1, "another teacher, the same loss");

    let err = |r: anyhow::Result<supra::train::run::Summary>| format!("{:#}", r.err().unwrap());
    let e = err(train(student(), &cfg, &inputs("other", None, true, None)));
    assert!(
        e.contains("not the one this run started distilling from"),
        "{e}"
    );
    train(student(), &cfg, &inputs("other", Some(&other), true, None)).unwrap();

    let mut wider = common::testing::tiny_loaded(dir.path(), 33, None).unwrap();
    wider.config.vocab_size += 1;
    let e = err(train(
        student(),
        &cfg,
        &inputs("wider", Some(&wider), false, None),
    ));
    assert!(e.contains("vocabulary"), "{e}");
    let mut renamed = common::testing::tiny_loaded(dir.path(), 33, None).unwrap();
    renamed
        .tokenizer
        .inner
        .add_tokens(&[tokenizers::AddedToken::from("<extra>", true)]);
    let e = err(train(
        student(),
        &cfg,
        &inputs("renamed", Some(&renamed), false, None),
    ));
    assert!(e.contains("vocabulary"), "{e}");
    let e = err(train(
        student(),
        &config(Recipe::Transfer),
        &inputs("transfer", Some(&other), false, None),
    ));
    assert!(e.contains("does not distil"), "{e}");
}

/// `--beta-lr-scale K`: the delta rule's write strength β learns K times every other
/// parameter's rate (recorded in run.json, resumed exactly), and is refused where the model
/// has no delta rule.
#[test]
fn the_write_strength_learns_at_its_own_rate() {
    let (dir, data, cache) = workspace();
    let beta = |m: &LoadedModel| -> Vec<f32> {
        m.weights["model.layers.1.self_attn.window_beta"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let start = beta(&tiny_cell(dir.path(), Cell::WindowDelta));
    let mut cfg = config(Recipe::Distill);
    cfg.steps = 6;
    let train_into = |name: &str, cfg: &TrainConfig, resume, stop| -> PathBuf {
        let out = dir.path().join(name);
        let model = tiny_cell(dir.path(), Cell::WindowDelta);
        run(model, cfg, &data, &out, &cache, resume, stop);
        out
    };
    let moved = |out: &Path| -> f32 {
        let end = beta(&supra::io::load(&out.join("final")).unwrap());
        end.iter().zip(&start).map(|(a, b)| (a - b).abs()).sum()
    };
    let plain = moved(&train_into("plain", &cfg, false, None));
    cfg.beta_lr_scale = 100.0;
    let fast = train_into("fast", &cfg, false, None);
    train_into("split", &cfg, false, Some(4));
    let split = train_into("split", &cfg, true, None);
    for ((s, x), (_, y)) in losses(&fast).iter().zip(&losses(&split)) {
        assert!((x - y).abs() <= 1e-6, "step {s}: {x} vs {y}");
    }
    let (fast_moved, plain) = (moved(&fast), plain);
    assert!(
        fast_moved > 20.0 * plain && plain > 0.0,
        "{fast_moved} vs {plain}"
    );
    let recorded = recorded_run(&fast);
    assert_eq!(
        recorded["beta_lr_scale"].as_f64(),
        Some(100.0),
        "{recorded}"
    );

    let err = |model, cfg: &TrainConfig, name: &str| {
        refusal(model, cfg, &data, &dir.path().join(name), &cache)
    };
    let e = err(tiny_cell(dir.path(), Cell::WindowRelu), &cfg, "additive");
    assert!(
        e.contains("--beta-lr-scale applies to window layers with the delta rule"),
        "{e}"
    );
    for k in [0.0, -1.0, f64::INFINITY] {
        cfg.beta_lr_scale = k;
        let e = err(tiny_cell(dir.path(), Cell::WindowDelta), &cfg, "bad");
        assert!(
            e.contains(&format!("--beta-lr-scale {k} must be a positive number")),
            "{e}"
        );
    }
}

/// The cells a recipe can train, on the tiny model (layer 0 stays softmax).
#[derive(Debug, Clone, Copy)]
enum Cell {
    SupraRelu,
    SupraHedgehog,
    SupraTaylor,
    WindowRelu,
    WindowHedgehog,
    WindowTaylor,
    /// relu, the gated mix and the delta rule.
    WindowDelta,
    /// relu, the value mix and the delta rule.
    WindowValue,
}

fn tiny_cell(dir: &Path, cell: Cell) -> LoadedModel {
    use supra::config::{FeatureKind, LinearRule, Mix, SinkPositions, WindowConfig};
    let p = dir.join("teacher.gguf");
    write_tiny_gguf(&p, 21).unwrap();
    let teacher = supra::io::load(&p).unwrap();
    let feature_map = match cell {
        Cell::SupraRelu | Cell::WindowRelu | Cell::WindowDelta | Cell::WindowValue => {
            FeatureKind::Relu
        }
        Cell::SupraHedgehog | Cell::WindowHedgehog => FeatureKind::Hedgehog,
        Cell::SupraTaylor | Cell::WindowTaylor => FeatureKind::Taylor,
    };
    let delta = matches!(cell, Cell::WindowDelta | Cell::WindowValue);
    let window = matches!(
        cell,
        Cell::WindowRelu
            | Cell::WindowHedgehog
            | Cell::WindowTaylor
            | Cell::WindowDelta
            | Cell::WindowValue
    )
    .then_some(WindowConfig {
        window: 8,
        sinks: 2,
        mix: match cell {
            Cell::WindowDelta => Mix::Gated,
            Cell::WindowValue => Mix::Value,
            _ => Mix::Shared,
        },
        sink_positions: SinkPositions::Cache,
        rule: if delta {
            LinearRule::Delta
        } else {
            LinearRule::Add
        },
    });
    convert(
        &teacher,
        &ConvertOptions {
            softmax_layers: vec![0],
            feature_map,
            mix_share: window.map(|_| 0.1),
            window,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Every recipe trains every cell: 16 updates on the tiny model bring each objective's loss
/// down (the mean of its last three updates below the mean of its first three).
#[test]
fn every_recipe_trains_every_cell() {
    let (dir, data, cache) = workspace();
    for cell in [
        Cell::SupraRelu,
        Cell::SupraHedgehog,
        Cell::SupraTaylor,
        Cell::WindowRelu,
        Cell::WindowHedgehog,
        Cell::WindowTaylor,
        Cell::WindowDelta,
        Cell::WindowValue,
    ] {
        for recipe in Recipe::ALL {
            let mut cfg = config(recipe);
            cfg.steps = 16;
            cfg.transfer_steps = if recipe.has_transfer_phase() { 8 } else { 0 };
            cfg.eval_every = 100;
            let out = dir.path().join(format!("{cell:?}-{}", recipe.name()));
            run(
                tiny_cell(dir.path(), cell),
                &cfg,
                &data,
                &out,
                &cache,
                false,
                None,
            );
            let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
            let rows: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            let mut objectives: Vec<String> = rows
                .iter()
                .map(|r| r["objective"].as_str().unwrap().to_string())
                .collect();
            objectives.dedup();
            for o in objectives {
                let l: Vec<f64> = rows
                    .iter()
                    .filter(|r| r["objective"] == o.as_str())
                    .map(|r| r["loss"].as_f64().unwrap())
                    .collect();
                let (first, last) = (&l[..3], &l[l.len() - 3..]);
                let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
                assert!(
                    mean(last) < mean(first),
                    "{cell:?} {}: {o} loss did not fall: {l:?}",
                    recipe.name()
                );
            }
        }
    }
}

/// A token cache that no longer verifies (cut short, edited) is tokenized again, never read:
/// one cut to 40 tokens once trained silently on those 40.
#[test]
fn a_damaged_token_cache_is_rebuilt() {
    use supra::train::data::TokenStream;
    let (dir, data, cache) = workspace();
    let model = tiny_linear(dir.path());
    let tokens = |s: &TokenStream| s.get(0, s.len());
    let first = TokenStream::build(&data, &model.tokenizer, &cache).unwrap();
    let want = tokens(&first);
    let path = first.path.clone();
    drop(first);
    let whole = std::fs::read(&path).unwrap();
    let damages: [(&str, Vec<u8>); 3] = [
        ("cut to 40 tokens", whole[..48 + 160].to_vec()),
        ("a token changed", {
            let mut b = whole.clone();
            *b.last_mut().unwrap() ^= 1;
            b
        }),
        ("the older format (tokens alone)", whole[48..].to_vec()),
    ];
    for (what, bytes) in damages {
        std::fs::write(&path, bytes).unwrap();
        let again = TokenStream::build(&data, &model.tokenizer, &cache).unwrap();
        assert_eq!(tokens(&again), want, "{what}");
        assert_eq!(std::fs::read(&path).unwrap(), whole, "{what}");
    }
}

/// `--min-window`: each update trains the window layers at a window drawn from min..=w (the
/// metrics say which), the same draws after a resume; validation runs at the model's own
/// window; a model without window layers, or a minimum past its window, is refused.
#[test]
fn drawn_windows_train_shorter_and_validate_at_the_model_window() {
    let (dir, data, cache) = workspace();
    let windows = |out: &Path| -> Vec<u64> {
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["window"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    let mut cfg = config(Recipe::TransferDistill);
    (cfg.steps, cfg.transfer_steps, cfg.min_window) = (12, 6, Some(2));
    let (straight, split) = straight_and_resumed(dir.path(), &cfg, (&data, &cache), 5);
    let drawn = windows(&straight);
    assert_eq!(drawn, windows(&split));
    assert!(drawn.iter().all(|w| (2..=8).contains(w)), "{drawn:?}");
    let mut distinct = drawn.clone();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() >= 3, "{drawn:?}");
    assert_eq!(
        supra::io::load(&straight.join("final"))
            .unwrap()
            .config
            .supra
            .unwrap()
            .window
            .unwrap()
            .window,
        8
    );

    // With no learning the weights stay the model's: the update's loss is at its drawn window
    // (so not the full window's), the validation at the model's (so the full window's).
    let mut still = config(Recipe::Distill);
    (still.steps, still.eval_every, still.lr, still.min_lr) = (1, 1, 0.0, 0.0);
    let go =
        |name, cfg: &TrainConfig| window_run(dir.path(), name, cfg, (&data, &cache), false, None);
    let full = go("full", &still);
    still.min_window = Some(2);
    let short = go("short", &still);
    assert_ne!(
        windows(&short)[0],
        8,
        "the test needs a draw below the window"
    );
    let (loss, val) = (metric(&short, "loss")[0], metric(&short, "val_loss")[0]);
    assert_ne!(loss, metric(&full, "loss")[0]);
    assert_eq!(val, metric(&full, "val_loss")[0]);

    let err = |model, cfg: &TrainConfig, name: &str| {
        refusal(model, cfg, &data, &dir.path().join(name), &cache)
    };
    let e = err(tiny_linear(dir.path()), &still, "linear");
    assert!(
        e.contains("--min-window applies to models with window layers"),
        "{e}"
    );
    still.min_window = Some(9);
    let e = err(tiny_cell(dir.path(), Cell::WindowRelu), &still, "wide");
    assert!(
        e.contains("--min-window 9 must be between 1 and the model's window, 8"),
        "{e}"
    );
}

/// `--gap-weight`: distillation's token weights average 1 and sit at their floor (1 − share)
/// where the window still sees the whole history; a run with them resumes exactly, weighs its
/// updates (not its validation, which stays even), and a model without window layers, a
/// recipe that does not distil or a share outside 0..=1 is refused.
#[test]
fn gap_weights_follow_the_window_and_weigh_updates_only() {
    use supra::train::distill::{GapWeights, Teacher};
    let (dir, data, cache) = workspace();
    let model = tiny_cell(dir.path(), Cell::WindowRelu);
    let inputs = Tensor::new(
        &[[
            3u32, 9, 14, 2, 7, 7, 1, 30, 3, 9, 14, 2, 11, 5, 3, 9, 14, 2, 8, 6, 3, 9, 14, 2, 19, 4,
            3, 9, 14, 2, 0, 12,
        ]],
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let teacher = Teacher::new(&model).unwrap().logits(&inputs).unwrap();
    let w = GapWeights::new(&model, 0.75)
        .unwrap()
        .weights(&inputs, &teacher)
        .unwrap();
    assert_eq!(w.len(), 32);
    let mean = w.iter().sum::<f32>() / 32.0;
    assert!((mean - 1.0).abs() < 1e-5, "mean {mean}");
    assert!(w[..8].iter().all(|&x| (x - 0.25).abs() < 1e-3), "{w:?}");
    // The linear branch is off in the reference: a louder one changes no weight.
    let mut louder = model.clone();
    for (name, t) in louder.weights.iter_mut() {
        if name.ends_with("window_mix") {
            *t = (&*t + 2.0).unwrap();
        }
    }
    let again = GapWeights::new(&louder, 0.75)
        .unwrap()
        .weights(&inputs, &teacher)
        .unwrap();
    assert_eq!(w, again);
    assert!(w.iter().any(|&x| x > 1.5), "{w:?}");

    let mut cfg = config(Recipe::TransferDistill);
    (cfg.steps, cfg.transfer_steps, cfg.gap_weight) = (12, 6, 0.5);
    let (straight, _) = straight_and_resumed(dir.path(), &cfg, (&data, &cache), 8);
    let recorded = recorded_run(&straight);
    assert_eq!(recorded["gap_weight"].as_f64(), Some(0.5), "{recorded}");

    // With no learning: the update's loss is weighted (so not the even one), the validation
    // loss even (so the same).
    let mut still = config(Recipe::Distill);
    (still.steps, still.eval_every, still.lr, still.min_lr) = (1, 1, 0.0, 0.0);
    let go =
        |name, cfg: &TrainConfig| window_run(dir.path(), name, cfg, (&data, &cache), false, None);
    let even = go("even", &still);
    still.gap_weight = 0.9;
    let weighted = go("weighted", &still);
    assert_ne!(metric(&weighted, "loss")[0], metric(&even, "loss")[0]);
    assert_eq!(
        metric(&weighted, "val_loss")[0],
        metric(&even, "val_loss")[0]
    );

    let err = |model, cfg: &TrainConfig, name: &str| {
        refusal(model, cfg, &data, &dir.path().join(name), &cache)
    };
    let e = err(tiny_linear(dir.path()), &still, "linear");
    assert!(
        e.contains("--gap-weight applies to models with window layers"),
        "{e}"
    );
    for share in [1.5, -0.5] {
        still.gap_weight = share;
        let e = err(tiny_cell(dir.path(), Cell::WindowRelu), &still, "outside");
        assert!(
            e.contains(&format!("--gap-weight {share} must be between 0 and 1")),
            "{e}"
        );
    }
    let mut ce = config(Recipe::TransferFinetune);
    ce.gap_weight = 0.5;
    let e = err(tiny_cell(dir.path(), Cell::WindowRelu), &ce, "ce");
    assert!(
        e.contains("--gap-weight: the transfer+finetune recipe does not distil"),
        "{e}"
    );
}

/// `--mix-lr-scale K`: the window layers' mix θ learns K times every other parameter's rate
/// (recorded in run.json, resumed exactly), and is refused where it means nothing.
#[test]
fn the_mix_learns_at_its_own_rate() {
    let (dir, data, cache) = workspace();
    let theta = |m: &LoadedModel| -> Vec<f32> {
        m.weights["model.layers.1.self_attn.window_mix"]
            .to_vec1()
            .unwrap()
    };
    let start = theta(&tiny_cell(dir.path(), Cell::WindowRelu));
    let mut cfg = config(Recipe::Distill);
    cfg.steps = 6;
    let moved = |out: &Path| -> f32 {
        let end = theta(&supra::io::load(&out.join("final")).unwrap());
        end.iter().zip(&start).map(|(a, b)| (a - b).abs()).sum()
    };
    let plain = moved(&window_run(
        dir.path(),
        "plain",
        &cfg,
        (&data, &cache),
        false,
        None,
    ));
    cfg.mix_lr_scale = 100.0;
    let (straight, _) = straight_and_resumed(dir.path(), &cfg, (&data, &cache), 4);
    let fast = moved(&straight);
    assert!(fast > 20.0 * plain && plain > 0.0, "{fast} vs {plain}");
    let recorded = recorded_run(&straight);
    assert_eq!(recorded["mix_lr_scale"].as_f64(), Some(100.0), "{recorded}");

    let err = |model, cfg: &TrainConfig, name: &str| {
        refusal(model, cfg, &data, &dir.path().join(name), &cache)
    };
    let e = err(tiny_linear(dir.path()), &cfg, "linear");
    assert!(
        e.contains("--mix-lr-scale applies to models with window layers"),
        "{e}"
    );
    for k in [0.0, -1.0, f64::NAN] {
        cfg.mix_lr_scale = k;
        let e = err(tiny_cell(dir.path(), Cell::WindowRelu), &cfg, "bad");
        assert!(
            e.contains(&format!("--mix-lr-scale {k} must be a positive number")),
            "{e}"
        );
    }
}
