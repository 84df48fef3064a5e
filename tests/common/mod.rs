#![allow(dead_code)]
//! Shared helpers for integration tests.

pub mod testing;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The default model, which tests on the real model need. `scripts/test` (the README's test
/// command, run by CI) fetches it first; a bare `cargo test` without it fails here, saying how.
pub fn real_model() -> PathBuf {
    let p = supra::io::fetch::default_model_path();
    assert!(
        p.exists(),
        "this test needs the default model at {}; fetch it with `cargo run --release -- fetch` \
         (scripts/test does this before running the tests)",
        p.display()
    );
    p
}

pub fn supra(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_supra"))
        .args(args)
        .output()
        .expect("cannot run the supra binary")
}

pub fn supra_path(cmd: &str, path: &Path, rest: &[&str]) -> Output {
    let p = path.to_str().unwrap();
    let mut args = vec![cmd, p];
    args.extend_from_slice(rest);
    supra(&args)
}

/// Asserts that a command failed cleanly: non-zero exit, no panic, and an error message
/// containing every one of `needles`.
pub fn assert_clean_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit code 1; stderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "the command panicked: {stderr}"
    );
    for n in needles {
        assert!(stderr.contains(n), "error message lacks {n:?}: {stderr}");
    }
}

/// The shared data directory: `$SUPRA_DATA_DIR`, else `../shared/data` beside the checkout.
pub fn data_dir() -> PathBuf {
    let d = std::env::var_os("SUPRA_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    assert!(
        d.join("README.md").exists(),
        "this test needs the shared data directory at {} (set SUPRA_DATA_DIR to where it is)",
        d.display()
    );
    d
}

/// ‖a − b‖ / ‖b‖ (Frobenius norms).
pub fn rel_err(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    let norm = |t: &candle_core::Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt()
    };
    norm(&(a - b).unwrap()) / norm(b)
}

/// `supra convert TEACHER --out OUT EXTRA...`, which must succeed; the converted model.
pub fn cli_convert(teacher: &Path, out: &Path, extra: &[&str]) -> supra::io::LoadedModel {
    let mut args = vec![
        "convert",
        teacher.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let run = supra(&args);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    supra::io::load(out).unwrap()
}
