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

fn info_fails(path: &Path, needles: &[&str]) {
    let out = supra_path("info", path, &[]);
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
