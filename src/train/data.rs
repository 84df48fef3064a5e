//! Training data: text files → one cached, memory-mapped token stream → shuffled windows.
//!
//! Inputs are files or directories (searched recursively) of `.txt`, `.txt.gz` and `.jsonl`
//! (one JSON object per line with a `text` field). Each text file and each JSONL line is a
//! document; documents are joined with EOS. The token stream is cached under a key made of the
//! tokenizer and every file's path and content hash, so a second run starts at once; the
//! cache file carries its token count and checksum, and one that does not verify (cut short,
//! edited, an older format) is tokenized again rather than trained on.

use crate::io::tokenizer::TextTokenizer;
use anyhow::{anyhow, bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    GzText,
    Jsonl,
}

fn format_of(path: &Path) -> Option<Format> {
    let name = path.file_name()?.to_str()?;
    if name.ends_with(".txt.gz") {
        Some(Format::GzText)
    } else if name.ends_with(".txt") {
        Some(Format::Text)
    } else if name.ends_with(".jsonl") {
        Some(Format::Jsonl)
    } else {
        None
    }
}

/// Every input file under `paths`, sorted, with its format. Explicitly named files must have a
/// known extension; files of other kinds inside directories are skipped and counted.
pub fn list_files(paths: &[PathBuf]) -> Result<(Vec<PathBuf>, usize)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>, skipped: &mut usize) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read directory {}", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out, skipped)?;
            } else if format_of(&p).is_some() {
                out.push(p);
            } else {
                *skipped += 1;
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    let mut skipped = 0;
    for p in paths {
        if !p.exists() {
            bail!("data path {} does not exist", p.display());
        }
        if p.is_dir() {
            walk(p, &mut files, &mut skipped)?;
        } else if format_of(p).is_some() {
            files.push(p.clone());
        } else {
            bail!(
                "{}: unsupported data file (expected .txt, .txt.gz or .jsonl)",
                p.display()
            );
        }
    }
    if files.is_empty() {
        let list: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        bail!("no .txt, .txt.gz or .jsonl files in {}", list.join(", "));
    }
    Ok((files, skipped))
}

/// The text of a file, gunzipped when its name ends in .gz; binary files are errors.
pub fn read_text(path: &Path) -> Result<String> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let bytes = if path.to_string_lossy().ends_with(".gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| anyhow!("{}: not a valid gzip file: {e}", path.display()))?;
        out
    } else {
        raw
    };
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "{}: not UTF-8 text (binary file?): invalid byte at offset {}",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    if text.contains('\0') {
        bail!("{}: contains NUL bytes (binary file?)", path.display());
    }
    Ok(text)
}

/// The documents of one file: the whole text of a .txt or .txt.gz, each line's "text" of a .jsonl.
pub fn read_documents(path: &Path) -> Result<Vec<String>> {
    let text = read_text(path)?;
    match format_of(path) {
        Some(Format::Jsonl) => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, line)| {
                let v: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| anyhow!("{}:{}: invalid JSON: {e}", path.display(), i + 1))?;
                v.get("text")
                    .and_then(|t| t.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| {
                        anyhow!("{}:{}: no string field \"text\"", path.display(), i + 1)
                    })
            })
            .collect(),
        _ => Ok(vec![text]),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A token stream on disk, memory-mapped: a [`HEADER`] then the tokens (u32 little-endian).
pub struct TokenStream {
    map: memmap2::Mmap,
    pub path: PathBuf,
}

/// Magic (format version in its last byte), token count (u64 little-endian), SHA-256 of the
/// token bytes. A cache cut to 40 tokens once trained silently on those 40.
const MAGIC: &[u8; 8] = b"SUPRATK1";
const HEADER: usize = 8 + 8 + 32;

fn with_header(tokens: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER + tokens.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(tokens.len() as u64 / 4).to_le_bytes());
    bytes.extend_from_slice(&Sha256::digest(tokens));
    bytes.extend_from_slice(tokens);
    bytes
}

/// The cache at `path` mapped, if it exists and its header verifies against its contents.
fn open_verified(path: &Path) -> Option<memmap2::Mmap> {
    let file = std::fs::File::open(path).ok()?;
    // SAFETY: cache files are written once, atomically (rename), and never modified in place.
    let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    let (header, tokens) = map.split_at_checked(HEADER)?;
    let count = u64::from_le_bytes(header[8..16].try_into().ok()?);
    let ok = &header[..8] == MAGIC
        && count.checked_mul(4) == Some(tokens.len() as u64)
        && Sha256::digest(tokens).as_slice() == &header[16..];
    ok.then_some(map)
}

impl TokenStream {
    pub fn len(&self) -> usize {
        (self.map.len() - HEADER) / 4
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cache key: a hash of the tokenizer and every input file's path and contents.
    pub fn key(&self) -> String {
        self.path
            .file_stem()
            .map_or(String::new(), |s| s.to_string_lossy().into_owned())
    }

    pub fn get(&self, start: usize, len: usize) -> Vec<u32> {
        self.map[HEADER + start * 4..HEADER + (start + len) * 4]
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    /// Tokenizes `paths` (or reuses the cached stream for the same files and tokenizer).
    pub fn build(paths: &[PathBuf], tokenizer: &TextTokenizer, cache_dir: &Path) -> Result<Self> {
        let (files, skipped) = list_files(paths)?;
        if skipped > 0 {
            eprintln!("data: skipped {skipped} files that are not .txt, .txt.gz or .jsonl");
        }
        let eos = tokenizer
            .eos_id
            .ok_or_else(|| anyhow!("the tokenizer has no EOS token to separate documents"))?;
        let mut key = Sha256::new();
        key.update(
            tokenizer
                .inner
                .to_string(false)
                .map_err(|e| anyhow!("{e}"))?
                .as_bytes(),
        );
        for f in &files {
            key.update(f.to_string_lossy().as_bytes());
            key.update(crate::io::fetch::sha256_file(f)?.as_bytes());
        }
        let path = cache_dir.join(format!("{}.tokens", &hex(&key.finalize())[..32]));
        if let Some(map) = open_verified(&path) {
            return Ok(Self { map, path });
        }
        if path.exists() {
            eprintln!(
                "data: the token cache {} does not verify (cut short or changed); tokenizing again",
                path.display()
            );
        }
        std::fs::create_dir_all(cache_dir)
            .with_context(|| format!("cannot create {}", cache_dir.display()))?;
        let bar = indicatif::ProgressBar::new(files.len() as u64).with_style(
            indicatif::ProgressStyle::with_template(
                "tokenizing {bar:30} {pos}/{len} files [{elapsed}<{eta}]",
            )
            .expect("valid template"),
        );
        // (token ids with an EOS after each document, number of text tokens)
        let per_file: Vec<(Vec<u32>, usize)> = files
            .par_iter()
            .map(|f| {
                let mut ids = Vec::new();
                let mut text_tokens = 0;
                for doc in read_documents(f)? {
                    let doc_ids = tokenizer
                        .encode(&doc)
                        .with_context(|| f.display().to_string())?;
                    text_tokens += doc_ids.len();
                    ids.extend(doc_ids);
                    ids.push(eos);
                }
                bar.inc(1);
                Ok((ids, text_tokens))
            })
            .collect::<Result<_>>()?;
        bar.finish_and_clear();
        if per_file.iter().all(|(_, n)| *n == 0) {
            bail!(
                "the corpus is empty: {} files and no text in them",
                files.len()
            );
        }
        let bytes: Vec<u8> = per_file
            .iter()
            .flat_map(|(ids, _)| ids)
            .flat_map(|t| t.to_le_bytes())
            .collect();
        crate::io::atomic_write(&path, &with_header(&bytes))?;
        let map = open_verified(&path).ok_or_else(|| {
            anyhow!(
                "{}: the token cache just written does not read back",
                path.display()
            )
        })?;
        Ok(Self { map, path })
    }
}

/// Non-overlapping windows of `seq_len + 1` tokens (inputs and shifted targets), visited in a
/// seeded random order that is reshuffled every epoch.
pub struct Windows {
    pub seq_len: usize,
    pub count: usize,
    seed: u64,
    /// The epoch whose order is in `order`.
    epoch: Option<u64>,
    order: Vec<usize>,
}

impl Windows {
    pub fn new(stream: &TokenStream, seq_len: usize, seed: u64) -> Result<Self> {
        let count = stream.len().saturating_sub(1) / seq_len;
        if count == 0 {
            bail!(
                "the corpus has {} tokens, fewer than one window of --seq-len {seq_len} + 1",
                stream.len()
            );
        }
        Ok(Self {
            seq_len,
            count,
            seed,
            epoch: None,
            order: Vec::new(),
        })
    }

    /// The first token of the `cursor`-th window drawn (the cursor counts across epochs, so
    /// a run resumed at the same cursor sees the same windows).
    pub fn start(&mut self, cursor: u64) -> usize {
        let epoch = cursor / self.count as u64;
        if self.epoch != Some(epoch) {
            self.order = (0..self.count).collect();
            let seed = self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            self.order.shuffle(&mut StdRng::seed_from_u64(seed));
            self.epoch = Some(epoch);
        }
        self.order[(cursor % self.count as u64) as usize] * self.seq_len
    }
}
