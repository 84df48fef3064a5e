//! The fuzz campaign CI runs: 10,000 mutated inputs over every reader of user files, in a
//! child process with its address space capped, so that a panic, an abort or an allocation a
//! corrupt size asks for fails the test.

mod common;

/// The child's address-space cap (virtual memory: thread stacks and allocator arenas count).
const CAP_MIB: u64 = 4096;
/// The peak resident memory the campaign may reach.
const PEAK_MIB: f64 = 1024.0;

#[test]
fn ten_thousand_mutated_inputs_neither_panic_nor_abort_nor_exhaust_memory() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    common::testing::write_fuzz_corpus(&corpus).unwrap();
    let report = dir.path().join("report.json");
    let scratch = dir.path().join("scratch");
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -v {}; exec '{}' fuzz '{}' --iterations 10000 --seed 7 --scratch '{}' --json '{}'",
            CAP_MIB * 1024,
            env!("CARGO_BIN_EXE_supra"),
            corpus.display(),
            scratch.display(),
            report.display()
        ))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let targets = r["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 8);
    let mut tried = 0;
    for t in targets {
        let (name, c) = (&t[0], &t[1]);
        // Every reader saw inputs, and the mutations did break some of them; a damaged token
        // cache is never refused but rebuilt (tests/train.rs checks what it rebuilds).
        assert!(c["tried"].as_u64().unwrap() >= 1000, "{name}: {c}");
        if name == "token_cache" {
            assert_eq!(c["accepted"], c["tried"], "{name}: {c}");
        } else {
            assert!(c["refused"].as_u64().unwrap() > 0, "{name}: {c}");
        }
        assert_eq!(c["panicked"], 0, "{name}: {c}");
        tried += c["tried"].as_u64().unwrap();
    }
    assert_eq!(tried, 10_000);
    let peak = r["peak_rss_mib"].as_f64().unwrap();
    assert!(peak < PEAK_MIB, "peak memory {peak} MiB");
}
