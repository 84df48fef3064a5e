//! Mutation fuzzing of every reader of files a user hands supra, on stable Rust: seeded
//! mutations of real inputs (bit flips, truncations, huge integers written over length and
//! count fields, JSON values swapped for values of another type), each read in-process. A
//! panic is caught, counted and its input kept; an abort (an allocation a declared size asked
//! for, under the memory limit the caller sets with `ulimit -v`) ends the process, which the
//! caller sees. The test runs a bounded campaign in CI; `scripts/fuzz.sh` runs long ones.
//!
//! The corpus is a directory of real inputs (`tests/common/testing.rs` writes one from the
//! tiny model): `model.gguf`, `hf/` (config.json, model.safetensors, tokenizer.json),
//! `state.safetensors` (a state of the `hf/` model), `task.jsonl`, `journal.jsonl` (an eval
//! journal whose header is [`JOURNAL_HEADER`]) and `data/` (training text, whose token cache
//! is built here).

use crate::eval::journal::Journal;
use crate::eval::tasks::Task;
use crate::infer::state::State;
use crate::model::llama::Llama;
use crate::train::data::TokenStream;
use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

/// The header line of the corpus's eval journal.
pub const JOURNAL_HEADER: &str = r#"{"model":"fuzz"}"#;

/// A reader and the corpus file it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Gguf,
    Safetensors,
    ConfigJson,
    TokenizerJson,
    State,
    Task,
    Journal,
    TokenCache,
}

impl Target {
    pub const ALL: [Target; 8] = [
        Target::Gguf,
        Target::Safetensors,
        Target::ConfigJson,
        Target::TokenizerJson,
        Target::State,
        Target::Task,
        Target::Journal,
        Target::TokenCache,
    ];

    fn json(self) -> bool {
        matches!(
            self,
            Target::ConfigJson | Target::TokenizerJson | Target::Task | Target::Journal
        )
    }
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Counts {
    /// Inputs read.
    pub tried: usize,
    /// Read without error (the mutation left them valid).
    pub accepted: usize,
    /// Refused with an error.
    pub refused: usize,
    /// Panicked: a bug.
    pub panicked: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub seed: u64,
    pub seconds: f64,
    pub targets: Vec<(Target, Counts)>,
    /// Each panic: its target, message and the input, kept under the scratch directory.
    pub panics: Vec<(Target, String, PathBuf)>,
    /// Peak resident memory of this process, MiB.
    pub peak_rss_mib: f64,
}

/// Where each target's file lives inside a copy of the corpus.
struct Scratch {
    dir: PathBuf,
    model: Llama,
    tokenizer: crate::io::tokenizer::TextTokenizer,
    cache_file: PathBuf,
}

impl Scratch {
    fn path(&self, t: Target) -> PathBuf {
        let d = &self.dir;
        match t {
            Target::Gguf => d.join("model.gguf"),
            Target::Safetensors => d.join("hf/model.safetensors"),
            Target::ConfigJson => d.join("hf/config.json"),
            Target::TokenizerJson => d.join("hf/tokenizer.json"),
            Target::State => d.join("state.safetensors"),
            Target::Task => d.join("task.jsonl"),
            Target::Journal => d.join("journal.jsonl"),
            Target::TokenCache => self.cache_file.clone(),
        }
    }

    /// Reads the target's file as the commands do.
    fn read(&self, t: Target) -> Result<()> {
        let p = self.path(t);
        match t {
            Target::Gguf => crate::io::load(&p).map(drop),
            Target::Safetensors | Target::ConfigJson | Target::TokenizerJson => {
                crate::io::load(&self.dir.join("hf")).map(drop)
            }
            Target::State => State::load(&self.model, &p).map(drop),
            Target::Task => Task::Custom(p).load(&self.dir).map(drop),
            Target::Journal => Journal::open(&p, JOURNAL_HEADER, true).map(drop),
            Target::TokenCache => {
                let s = TokenStream::build(
                    &[self.dir.join("data")],
                    &self.tokenizer,
                    &cache(&self.dir),
                )?;
                s.get(0, s.len());
                Ok(())
            }
        }
    }
}

fn cache(dir: &Path) -> PathBuf {
    dir.join("cache")
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dest = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dest)?;
        } else {
            std::fs::copy(e.path(), &dest)?;
        }
    }
    Ok(())
}

/// Runs `iterations` mutated inputs, spread evenly over `targets`, from `corpus` (copied into
/// `scratch`, where the inputs that panicked are kept too).
pub fn run(
    corpus: &Path,
    scratch: &Path,
    targets: &[Target],
    iterations: usize,
    seed: u64,
) -> Result<Report> {
    if targets.is_empty() {
        bail!("no fuzz targets");
    }
    let t0 = std::time::Instant::now();
    let work = scratch.join("work");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    copy_dir(corpus, &work)
        .with_context(|| format!("cannot copy the corpus {}", corpus.display()))?;
    let hf = crate::io::load(&work.join("hf")).context("the corpus's hf/ model does not load")?;
    let model = Llama::new(&hf.config, &hf.weights)?;
    let stream = TokenStream::build(&[work.join("data")], &hf.tokenizer, &cache(&work))
        .context("the corpus's data/ does not tokenize")?;
    let scratch_state = Scratch {
        cache_file: stream.path.clone(),
        dir: work.clone(),
        model,
        tokenizer: hf.tokenizer,
    };
    drop(stream);
    let originals: Vec<Vec<u8>> = targets
        .iter()
        .map(|&t| {
            let p = scratch_state.path(t);
            std::fs::read(&p).with_context(|| format!("the corpus lacks {}", p.display()))
        })
        .collect::<Result<_>>()?;
    for (&t, bytes) in targets.iter().zip(&originals) {
        scratch_state
            .read(t)
            .with_context(|| format!("the corpus's own {t:?} input does not read"))?;
        std::fs::write(scratch_state.path(t), bytes)?;
    }

    let failures = scratch.join("failures");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut counts = vec![Counts::default(); targets.len()];
    let mut panics = Vec::new();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for i in 0..iterations {
        let k = i % targets.len();
        let t = targets[k];
        let input = mutate(&originals[k], t.json(), &mut rng);
        let path = scratch_state.path(t);
        std::fs::write(&path, &input)?;
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scratch_state.read(t)));
        let c = &mut counts[k];
        c.tried += 1;
        match outcome {
            Ok(Ok(())) => c.accepted += 1,
            Ok(Err(_)) => c.refused += 1,
            Err(payload) => {
                c.panicked += 1;
                let msg = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                std::fs::create_dir_all(&failures)?;
                let kept = failures.join(format!("{t:?}-{i}.bin").to_lowercase());
                std::fs::write(&kept, &input)?;
                panics.push((t, msg, kept));
            }
        }
        // Readers that write (the journal appends, the token cache rebuilds) start from the
        // original again.
        std::fs::write(&path, &originals[k])?;
    }
    std::panic::set_hook(hook);
    Ok(Report {
        seed,
        seconds: t0.elapsed().as_secs_f64(),
        targets: targets.iter().copied().zip(counts).collect(),
        panics,
        peak_rss_mib: peak_rss_mib(),
    })
}

fn peak_rss_mib() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return f64::NAN;
    }
    u.ru_maxrss as f64 / 1024.0
}

/// Integers that sizes and counts are made of when files lie.
const HUGE: [u64; 9] = [
    0,
    1,
    0x7f,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 40,
    u64::MAX / 2,
    u64::MAX,
];

/// One mutation (sometimes two or three) of `input`.
pub fn mutate(input: &[u8], json: bool, rng: &mut StdRng) -> Vec<u8> {
    if json && rng.random_bool(0.5) {
        if let Some(out) = mutate_json(input, rng) {
            return out;
        }
    }
    let mut out = input.to_vec();
    for _ in 0..rng.random_range(1..=3) {
        if out.is_empty() {
            break;
        }
        // Headers hold the sizes: half the mutations land in the first 4 KiB.
        let span = if rng.random_bool(0.5) {
            out.len().min(4096)
        } else {
            out.len()
        };
        let at = rng.random_range(0..span);
        match rng.random_range(0..4) {
            0 => out[at] ^= 1 << rng.random_range(0..8),
            1 => out.truncate(at),
            2 => {
                let v = HUGE[rng.random_range(0..HUGE.len())];
                let width = if rng.random_bool(0.5) { 4 } else { 8 };
                let at = at - at % width;
                let bytes = v.to_le_bytes();
                for (j, b) in bytes[..width].iter().enumerate() {
                    if let Some(x) = out.get_mut(at + j) {
                        *x = *b;
                    }
                }
            }
            _ => out[at] = rng.random(),
        }
    }
    out
}

/// A JSON document (or JSON lines) with one value replaced by one of another type or an
/// extreme number; `None` when the input does not parse.
fn mutate_json(input: &[u8], rng: &mut StdRng) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(input).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    // JSON lines: one line mutated; a document: the whole.
    let (pick, whole) = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) => (None, v),
        Err(_) => {
            let i = rng.random_range(0..lines.len().max(1));
            (Some(i), serde_json::from_str(lines.get(i)?).ok()?)
        }
    };
    let mut v = whole;
    let mut nodes = 0;
    count(&v, &mut nodes);
    let target = rng.random_range(0..nodes.max(1));
    let mut seen = 0;
    replace(&mut v, target, &mut seen, rng);
    let s = serde_json::to_string(&v).ok()?;
    Some(match pick {
        None => s.into_bytes(),
        Some(i) => {
            let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
            out[i] = s;
            (out.join("\n") + "\n").into_bytes()
        }
    })
}

fn count(v: &serde_json::Value, n: &mut usize) {
    *n += 1;
    match v {
        serde_json::Value::Array(a) => a.iter().for_each(|x| count(x, n)),
        serde_json::Value::Object(o) => o.values().for_each(|x| count(x, n)),
        _ => {}
    }
}

fn replace(v: &mut serde_json::Value, target: usize, seen: &mut usize, rng: &mut StdRng) {
    use serde_json::{json, Value};
    if *seen == target {
        *v = match rng.random_range(0..10) {
            0 => json!(0),
            1 => json!(-1),
            2 => json!(4_294_967_296u64),
            3 => json!(u64::MAX),
            4 => json!(1e300),
            5 => json!("x"),
            6 => json!([]),
            7 => json!({}),
            8 => Value::Null,
            _ => json!(true),
        };
        *seen += 1;
        return;
    }
    *seen += 1;
    match v {
        Value::Array(a) => a.iter_mut().for_each(|x| replace(x, target, seen, rng)),
        Value::Object(o) => o.values_mut().for_each(|x| replace(x, target, seen, rng)),
        _ => {}
    }
}
