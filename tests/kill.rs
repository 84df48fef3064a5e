//! `kill -9` at random points of a training run: whatever it leaves is complete or clearly
//! temporary, and the run resumed from it ends bit-identical to one never interrupted.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const PROSE: &str = "the cat sat on the mat and the dog ran to the door. \
a bird sang in the tree while the sun rose over the hill. ";

/// `supra train` of the tiny SUPRA model, 12 updates, a checkpoint after every one.
fn train(model: &Path, data: &Path, cache: &Path, out: &Path, resume: bool) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_supra"));
    c.env("SUPRA_CACHE_DIR", cache)
        .args(["train", model.to_str().unwrap(), "--recipe", "supra"])
        .args([
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .args([
            "--no-valid",
            "--steps",
            "12",
            "--seq-len",
            "32",
            "--batch-tokens",
            "64",
        ])
        .args(["--checkpoint-every", "1", "--keep", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if resume {
        c.arg("--resume");
    }
    c
}

fn losses(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{} {}", v["step"], v["loss"])
        })
        .collect()
}

/// Every name without a leading dot under `out` is whole: the final model and each
/// checkpoint load, metrics lines parse (but a last one cut short), the plot is a PNG.
fn check_complete(out: &Path, trial: usize) {
    let Ok(entries) = std::fs::read_dir(out) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        match name.as_str() {
            n if n.starts_with('.') => {}
            "final" => {
                supra::io::load(&path)
                    .unwrap_or_else(|err| panic!("trial {trial}: final: {err:#}"));
            }
            "checkpoints" => {
                for c in std::fs::read_dir(&path).unwrap().flatten() {
                    let n = c.file_name().to_string_lossy().into_owned();
                    if n.starts_with('.') {
                        continue;
                    }
                    assert!(
                        c.path().join("progress.json").exists(),
                        "trial {trial}: {n} is incomplete"
                    );
                    supra::io::load(&c.path().join("model"))
                        .unwrap_or_else(|err| panic!("trial {trial}: {n}: {err:#}"));
                }
            }
            "metrics.jsonl" => {
                let text = std::fs::read_to_string(&path).unwrap();
                let lines: Vec<&str> = text.lines().collect();
                let whole = if text.ends_with('\n') {
                    &lines[..]
                } else {
                    &lines[..lines.len().saturating_sub(1)]
                };
                for l in whole {
                    serde_json::from_str::<serde_json::Value>(l)
                        .unwrap_or_else(|err| panic!("trial {trial}: metrics line {l:?}: {err}"));
                }
            }
            "loss.png" => {
                let png = std::fs::read(&path).unwrap();
                assert_eq!(&png[1..4], b"PNG", "trial {trial}: loss.png");
            }
            other => panic!("trial {trial}: unexpected {other} in the run directory"),
        }
    }
}

fn weights(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let m = supra::io::load(dir).unwrap();
    let mut w: Vec<(String, Vec<u8>)> = m
        .weights
        .iter()
        .map(|(k, t)| {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            (k.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect();
    w.sort();
    w
}

#[test]
fn kill_9_at_random_points_leaves_whole_outputs_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = common::testing::tiny_loaded(dir.path(), 21, Some(&[0])).unwrap();
    let model = dir.path().join("model");
    supra::io::hf_dir::save(&teacher, &model).unwrap();
    let data = dir.path().join("data.txt");
    std::fs::write(&data, PROSE.repeat(40)).unwrap();
    let cache = dir.path().join("cache");

    let straight = dir.path().join("straight");
    let t0 = Instant::now();
    let ok = train(&model, &data, &cache, &straight, false)
        .status()
        .unwrap();
    assert!(ok.success());
    let span = t0.elapsed();
    let (want_losses, want_weights) = (losses(&straight), weights(&straight.join("final")));
    assert_eq!(want_losses.len(), 12);

    // Kill points spread over the whole run, startup and the final write included.
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let trials = 50;
    let mut killed_with_checkpoints = 0;
    for trial in 0..trials {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let at = span.mul_f64((rng % 1000) as f64 / 1000.0 * 1.05);
        let out = dir.path().join(format!("trial-{trial}"));
        let mut child = train(&model, &data, &cache, &out, false).spawn().unwrap();
        std::thread::sleep(at);
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        check_complete(&out, trial);
        let resume = supra::train::checkpoint::list(&out).is_ok_and(|l| !l.is_empty());
        killed_with_checkpoints += usize::from(resume);
        let status = train(&model, &data, &cache, &out, resume).status().unwrap();
        assert!(
            status.success(),
            "trial {trial}: the run after the kill at {at:?} failed"
        );
        assert_eq!(
            losses(&out),
            want_losses,
            "trial {trial} (killed at {at:?})"
        );
        assert!(
            weights(&out.join("final")) == want_weights,
            "trial {trial}: final weights differ (killed at {at:?})"
        );
        // The rerun swept what the kill left.
        for sub in [out.clone(), out.join("checkpoints")] {
            let left: Vec<PathBuf> = std::fs::read_dir(&sub)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
                .collect();
            assert!(left.is_empty(), "trial {trial}: left behind {left:?}");
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
    // The kill points reached the checkpoints, not only the start-up.
    assert!(
        killed_with_checkpoints >= trials / 4,
        "only {killed_with_checkpoints} of {trials} kills came after a checkpoint"
    );
}
