//! Every kind of bad model input fails with a readable error naming the file, exit code 1, and
//! no panic.

mod common;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::testing::{tiny_config, TinyGguf};
use common::{assert_clean_error, supra_path};
use std::path::{Path, PathBuf};

fn tiny() -> TinyGguf {
    TinyGguf::new(&tiny_config(), 1, GgmlDType::F32).unwrap()
}

fn write(dir: &Path, name: &str, g: &TinyGguf) -> PathBuf {
    let p = dir.join(name);
    g.write(&p).unwrap();
    p
}

/// `supra info PATH` fails cleanly (under the address-space cap of [`supra_capped`]), naming
/// the file and every one of `needles`.
fn info_fails(path: &Path, needles: &[&str]) {
    let out = supra_capped(&["info", path.to_str().unwrap()]);
    let name = path.file_name().unwrap().to_str().unwrap();
    let mut all = vec![name];
    all.extend_from_slice(needles);
    assert_clean_error(&out, &all);
}

#[test]
fn valid_tiny_model_loads() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "ok.gguf", &tiny());
    let out = supra_path("info", &p, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ChatML"));
}

#[test]
fn truncated_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "cut.gguf", &tiny());
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len / 2).unwrap();
    info_fails(&p, &["truncated"]);
    // Cut inside the header too.
    f.set_len(40).unwrap();
    info_fails(&p, &["truncated"]);
}

#[test]
fn wrong_magic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.gguf");
    std::fs::write(&p, b"GGML\x03\x00\x00\x00 not really a model").unwrap();
    info_fails(&p, &["not a GGUF file", "GGUF"]);
}

#[test]
fn unknown_tensor_type() {
    // A minimal GGUF v3 header: one metadata entry, one tensor of type 99.
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // metadata entries
    let key = b"general.architecture";
    b.extend_from_slice(&(key.len() as u64).to_le_bytes());
    b.extend_from_slice(key);
    b.extend_from_slice(&8u32.to_le_bytes()); // string
    b.extend_from_slice(&5u64.to_le_bytes());
    b.extend_from_slice(b"llama");
    let name = b"token_embd.weight";
    b.extend_from_slice(&(name.len() as u64).to_le_bytes());
    b.extend_from_slice(name);
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&4u64.to_le_bytes());
    b.extend_from_slice(&4u64.to_le_bytes());
    b.extend_from_slice(&99u32.to_le_bytes()); // tensor type
    b.extend_from_slice(&0u64.to_le_bytes());
    b.resize(b.len() + 256, 0);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("odd.gguf");
    std::fs::write(&p, &b).unwrap();
    info_fails(&p, &["unknown tensor type 99"]);
}

#[test]
fn missing_tensor() {
    let mut g = tiny();
    g.tensors.retain(|(n, _)| n != "blk.1.ffn_down.weight");
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "missing.gguf", &g);
    info_fails(&p, &["missing tensor 'blk.1.ffn_down.weight'"]);
}

#[test]
fn tensor_shape_mismatch() {
    let mut g = tiny();
    let bad = Tensor::zeros((64, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    for (n, t) in g.tensors.iter_mut() {
        if n == "blk.0.ffn_up.weight" {
            *t = QTensor::quantize(&bad, GgmlDType::F32).unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "shape.gguf", &g);
    info_fails(
        &p,
        &["'blk.0.ffn_up.weight'", "[64, 32]", "expected [96, 64]"],
    );
}

#[test]
fn unsupported_architecture() {
    let mut g = tiny();
    g.set_metadata("general.architecture", Value::String("mamba".into()));
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "arch.gguf", &g);
    info_fails(&p, &["unsupported architecture 'mamba'", "llama"]);
}

#[test]
fn missing_metadata_key() {
    let mut g = tiny();
    g.metadata.retain(|(k, _)| k != "llama.block_count");
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "meta.gguf", &g);
    info_fails(&p, &["missing metadata key 'llama.block_count'"]);
}

/// An HF directory written from the tiny model, for the config.json cases.
fn hf_dir(dir: &Path) -> PathBuf {
    let g = write(dir, "t.gguf", &tiny());
    let out_dir = dir.join("hf");
    let out = common::supra(&[
        "export",
        g.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out_dir
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn config_json_missing_field() {
    let tmp = tempfile::tempdir().unwrap();
    let d = hf_dir(tmp.path());
    edit_config(&d, |m| {
        m.remove("hidden_size");
    });
    let out = supra_path("info", &d, &[]);
    assert_clean_error(&out, &["config.json", "missing field `hidden_size`"]);
}

#[test]
fn config_json_unsupported_model_type() {
    let tmp = tempfile::tempdir().unwrap();
    let d = hf_dir(tmp.path());
    edit_config(&d, |m| {
        m.insert("model_type".into(), "gpt_neox".into());
    });
    let out = supra_path("info", &d, &[]);
    assert_clean_error(&out, &["config.json", "unsupported model_type 'gpt_neox'"]);
}

#[test]
fn hf_dir_missing_files() {
    let tmp = tempfile::tempdir().unwrap();
    let d = hf_dir(tmp.path());
    std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    assert_clean_error(&supra_path("info", &d, &[]), &["tokenizer.json", "missing"]);
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    assert_clean_error(&supra_path("info", &d, &[]), &["no model.safetensors"]);
    std::fs::write(d.join("model.safetensors"), b"garbage").unwrap();
    assert_clean_error(
        &supra_path("info", &d, &[]),
        &["model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn missing_path() {
    let out = common::supra(&["info", "/nonexistent/model.gguf"]);
    assert_clean_error(&out, &["/nonexistent/model.gguf", "does not exist"]);
    let out = common::supra(&[
        "score",
        "/nonexistent/model.gguf",
        "--text",
        "/nonexistent/text.txt",
    ]);
    assert_clean_error(&out, &["/nonexistent/text.txt"]);
}

/// Runs `supra ARGS` with its address space capped at 3 GiB, so that a size read from a file
/// that allocates before it is checked fails the test at once instead of exhausting the machine.
fn supra_capped(args: &[&str]) -> std::process::Output {
    let mut cmd = vec![env!("CARGO_BIN_EXE_supra").to_string()];
    cmd.extend(args.iter().map(|a| a.to_string()));
    let quoted: Vec<String> = cmd.iter().map(|a| format!("'{a}'")).collect();
    std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("ulimit -v 3145728; exec {}", quoted.join(" ")))
        .output()
        .unwrap()
}

#[test]
fn gguf_alignment_that_is_not_a_power_of_two() {
    let dir = tempfile::tempdir().unwrap();
    for (a, name) in [(0u32, "zero.gguf"), (24, "odd.gguf")] {
        let mut g = tiny();
        g.set_metadata("general.alignment", Value::U32(a));
        let p = write(dir.path(), name, &g);
        info_fails(
            &p,
            &[&format!("general.alignment {a} is not a power of two")],
        );
    }
}

#[test]
fn gguf_tensor_at_an_unaligned_offset() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "unaligned.gguf", &tiny());
    let mut bytes = std::fs::read(&p).unwrap();
    // The tensor table entry: name (u64 length, bytes), n_dims u32, dims u64 each, type u32,
    // data offset u64.
    let name = b"token_embd.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("the tensor table names token_embd.weight")
        + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let offset_at = at + 4 + 8 * n_dims + 4;
    bytes[offset_at..offset_at + 8].copy_from_slice(&1u64.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    info_fails(
        &p,
        &[
            "'token_embd.weight'",
            "not a multiple of the file's alignment 32",
        ],
    );
}

/// Declared sizes that nothing in the file backs fail by name before anything is sized by
/// them: the layer count (2^32 − 1 climbed past 7 GB before), and a context of 10^9 positions
/// (its RoPE tables once asked for 128 GB) loads and runs in bounded memory.
#[test]
fn huge_declared_sizes_fail_or_run_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = tiny();
    g.set_metadata("llama.block_count", Value::U32(u32::MAX));
    let p = write(dir.path(), "layers.gguf", &g);
    info_fails(
        &p,
        &["llama.block_count", "4294967295 layers is beyond the 4096"],
    );

    let mut g = tiny();
    g.set_metadata("llama.context_length", Value::U32(1_000_000_000));
    let p = write(dir.path(), "context.gguf", &g);
    let out = supra_capped(&["score", p.to_str().unwrap(), "--prompt", "the the the"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let hf = hf_dir(dir.path());
    for layers in [4_000_000_000u64, 1_000_000_000_000] {
        edit_config(&hf, |m| {
            m.insert("num_hidden_layers".into(), layers.into());
        });
        let out = supra_capped(&["info", hf.to_str().unwrap()]);
        assert_clean_error(
            &out,
            &["config.json", "num_hidden_layers", "beyond the 4096"],
        );
    }
    edit_config(&hf, |m| {
        m.insert("num_hidden_layers".into(), 2.into());
        m.insert("max_position_embeddings".into(), 1_000_000_000.into());
    });
    let out = supra_capped(&["score", hf.to_str().unwrap(), "--prompt", "the the the"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Floats that cannot be valid are refused at load: they ran and printed NaN.
#[test]
fn invalid_floats_in_the_config_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("llama.rope.freq_base", f32::NAN, "RoPE base"),
        ("llama.rope.freq_base", 0.0, "RoPE base"),
        (
            "llama.attention.layer_norm_rms_epsilon",
            -1.0,
            "RMSNorm epsilon",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            f32::NAN,
            "RMSNorm epsilon",
        ),
    ];
    for (i, (key, value, what)) in cases.into_iter().enumerate() {
        let mut g = tiny();
        g.set_metadata(key, Value::F32(value));
        let p = write(dir.path(), &format!("float{i}.gguf"), &g);
        info_fails(&p, &[what, "must be"]);
    }
    let hf = hf_dir(dir.path());
    for (key, value, what) in [
        ("rope_theta", 0.0, "RoPE base"),
        ("rope_theta", -10.0, "RoPE base"),
        ("rms_norm_eps", -1e-5, "RMSNorm epsilon"),
    ] {
        let original = std::fs::read_to_string(hf.join("config.json")).unwrap();
        edit_config(&hf, |m| {
            m.insert(key.into(), value.into());
        });
        assert_clean_error(
            &supra_path("info", &hf, &[]),
            &["config.json", what, "must be"],
        );
        std::fs::write(hf.join("config.json"), original).unwrap();
    }
}

/// Integer tensors where the model needs floats: they converted silently (nll 1e12).
#[test]
fn integer_safetensors_weights_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let hf = hf_dir(dir.path());
    let file = hf.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let t = tensors["model.norm.weight"]
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    tensors.insert("model.norm.weight".into(), t);
    candle_core::safetensors::save(&tensors, &file).unwrap();
    assert_clean_error(
        &supra_path("info", &hf, &[]),
        &[
            "model.safetensors",
            "'model.norm.weight'",
            "U32",
            "floating point",
        ],
    );
}

/// A tokenizer with more ids than the embedding has rows failed deep in the forward pass.
#[test]
fn a_tokenizer_larger_than_the_vocabulary_is_refused() {
    let mut cfg = tiny_config();
    let tokens = cfg.vocab_size;
    cfg.vocab_size = tokens - 1;
    let mut g = TinyGguf::new(&cfg, 1, GgmlDType::F32).unwrap();
    g.set_metadata("llama.vocab_size", Value::U32(tokens as u32 - 1));
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "vocab.gguf", &g);
    info_fails(
        &p,
        &[
            &format!("ids up to {}", tokens - 1),
            &format!("vocabulary (its embedding) has {} rows", tokens - 1),
        ],
    );
}

/// A task line far longer than the context fails before it is tokenized (a 50 MB line once
/// took 7 GB of memory and minutes).
#[test]
fn a_task_item_longer_than_the_context_fails_before_tokenizing() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "m.gguf", &tiny());
    let task = dir.path().join("big.jsonl");
    let query = "the ".repeat(50_000);
    let line = serde_json::json!({"query": query, "choices": [" the", " he"], "gold": 0});
    std::fs::write(&task, format!("{line}\n")).unwrap();
    let out = supra_capped(&[
        "eval",
        p.to_str().unwrap(),
        "--tasks",
        task.to_str().unwrap(),
    ]);
    assert_clean_error(
        &out,
        &["big.jsonl", "bytes of text", "context of 256 tokens"],
    );
}

/// Saving a model directory over an existing one: the user's other files stay, the model is
/// the new one, and the temporaries a killed writer left beside it are swept.
#[test]
fn saving_a_model_directory_is_whole_and_keeps_other_files() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::testing::tiny_loaded(tmp.path(), 3, None).unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), "stale").unwrap();
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    // A writer killed mid-write left a half-written model and, moved aside, the directory it
    // was replacing, with a file of the user's in it.
    let stale = tmp.path().join(".m.tmp-4242");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), b"").unwrap();
    let aside = tmp.path().join(".m.old-4242");
    std::fs::create_dir_all(&aside).unwrap();
    std::fs::write(aside.join("README.md"), "also mine").unwrap();
    supra::io::hf_dir::save(&model, &dir).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("README.md")).unwrap(),
        "also mine"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("notes.txt")).unwrap(),
        "mine"
    );
    let back = supra::io::load(&dir).unwrap();
    assert_eq!(back.config.to_hf_json(), model.config.to_hf_json());
    let mut left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["m", "tiny-3.gguf"]);
}

/// Every input `supra fuzz` once found panicking (tests/fixtures/fuzz/READER/) now fails with a
/// clean error. tokenizer_json: JSON syntax errors inside the decoder section, on which the
/// tokenizers crate panics (`expect("Helper")`) rather than returning an error.
#[test]
fn inputs_that_once_panicked_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = hf_dir(tmp.path());
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz/tokenizer_json");
    let mut n = 0;
    for f in std::fs::read_dir(fixtures).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, d.join("tokenizer.json")).unwrap();
        let out = supra_path("info", &d, &[]);
        assert_clean_error(&out, &["tokenizer.json", "not valid JSON"]);
        n += 1;
    }
    assert!(n >= 3);
}

#[test]
fn linearize_refuses_an_empty_perplexity_window_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    for (flag, value) in [("--eval-window", "1"), ("--eval-tokens", "0")] {
        let out = common::supra(&[
            "linearize",
            "/nonexistent/model.gguf",
            "--out",
            out_dir.to_str().unwrap(),
            flag,
            value,
        ]);
        assert_clean_error(&out, &[flag, "at least 2"]);
        assert!(!out_dir.exists(), "{flag} {value}: nothing written");
    }
}
