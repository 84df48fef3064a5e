//! Long-context probes: retrieving a key hidden in a haystack (passkey in repeated filler,
//! needle in a book) at given lengths and depths, and perplexity by position in long books.
//!
//! Sequences are read in chunks through the generation state, so a 32k-token prompt never
//! holds a 32k × 32k attention matrix; softmax models are run past their trained context on
//! purpose (that is what these probes measure).

use crate::eval::journal::Journal;
use crate::io::tokenizer::TextTokenizer;
use crate::model::llama::{Cache, Llama};
use anyhow::{bail, Result};
use candle_core::{IndexOp, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Tokens per forward pass when reading long sequences.
pub const CHUNK: usize = 1024;

/// Reads `ids` through a fresh cache in chunks of `chunk` tokens, calling `visit(start,
/// hidden)` with each chunk's final hidden states (chunk length, hidden). Returns the cache
/// after the last token.
pub fn read_chunked(
    model: &Llama,
    ids: &[u32],
    chunk: usize,
    mut visit: impl FnMut(usize, &Tensor) -> Result<()>,
) -> Result<Cache> {
    let mut cache = model.new_cache();
    for start in (0..ids.len()).step_by(chunk.max(1)) {
        let end = (start + chunk.max(1)).min(ids.len());
        let input = Tensor::new(&ids[start..end], model.device())?.unsqueeze(0)?;
        let hidden = model.forward_hidden(&input, Some(&mut cache))?.squeeze(0)?;
        visit(start, &hidden)?;
    }
    Ok(cache)
}

/// Greedy continuation of `prompt`, `max_new` tokens.
pub fn greedy(model: &Llama, prompt: &[u32], max_new: usize) -> Result<Vec<u32>> {
    let mut last = None;
    let mut cache = read_chunked(model, prompt, CHUNK, |_, h| {
        last = Some(h.i(h.dim(0)? - 1)?);
        Ok(())
    })?;
    let Some(mut h) = last else {
        bail!("greedy decoding needs a prompt");
    };
    let mut out = Vec::with_capacity(max_new);
    for _ in 0..max_new {
        let next = model
            .logits(&h.unsqueeze(0)?)?
            .argmax(1)?
            .to_vec1::<u32>()?[0];
        out.push(next);
        let input = Tensor::new(&[next], model.device())?.unsqueeze(0)?;
        h = model
            .forward_hidden(&input, Some(&mut cache))?
            .squeeze(0)?
            .squeeze(0)?;
    }
    Ok(out)
}

/// What the key hides in.
#[derive(Debug, Clone)]
pub enum Haystack {
    /// The passkey test (Mohtashami & Jaggi 2023): one filler paragraph repeated.
    Passkey,
    /// Needle in a haystack: a sentence with the key inside a book's text (token ids), a
    /// window of it starting at a random place per trial.
    Book(Vec<u32>),
}

const PASSKEY_INTRO: &str = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information there.\n\n";
const FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
const NEEDLE_INTRO: &str =
    "Read the following text and remember the special magic number in it.\n\n";

/// The prompt of one trial: `length` tokens in all (up to a filler unit), the key at `depth`
/// (0 = the start of the haystack, 1 = its end).
pub fn retrieval_prompt(
    tokenizer: &TextTokenizer,
    haystack: &Haystack,
    length: usize,
    depth: f64,
    key: u32,
    rng: &mut StdRng,
) -> Result<Vec<u32>> {
    let enc = |s: &str| tokenizer.encode(s);
    let (intro, needle, question) = match haystack {
        Haystack::Passkey => (
            enc(PASSKEY_INTRO)?,
            enc(&format!("The pass key is {key}. Remember it. {key} is the pass key. "))?,
            enc("\n\nWhat is the pass key? The pass key is")?,
        ),
        Haystack::Book(_) => (
            enc(NEEDLE_INTRO)?,
            enc(&format!(" The special magic number is {key}."))?,
            enc("\n\nWhat is the special magic number mentioned in the text above? The special magic number is")?,
        ),
    };
    let Some(room) = length.checked_sub(intro.len() + needle.len() + question.len()) else {
        bail!("{length} tokens cannot hold the prompt's fixed parts");
    };
    let hay: Vec<u32> = match haystack {
        Haystack::Passkey => {
            let unit = enc(FILLER)?;
            unit.iter()
                .copied()
                .cycle()
                .take(room / unit.len() * unit.len())
                .collect()
        }
        Haystack::Book(ids) => {
            if ids.len() < room {
                bail!(
                    "the haystack book has {} tokens, fewer than the {room} a {length}-token prompt needs",
                    ids.len()
                );
            }
            let start = rng.random_range(0..=ids.len() - room);
            ids[start..start + room].to_vec()
        }
    };
    let mut at = ((depth.clamp(0.0, 1.0) * hay.len() as f64).round() as usize).min(hay.len());
    if let Haystack::Book(_) = haystack {
        // After the end of a sentence, so the needle reads as one.
        let ends_sentence = |i: usize| {
            i == 0
                || tokenizer
                    .decode(&hay[i - 1..i])
                    .is_ok_and(|s| s.trim_end().ends_with(['.', '!', '?']))
        };
        while at < hay.len() && !ends_sentence(at) {
            at += 1;
        }
    } else {
        let unit = enc(FILLER)?.len();
        at = at / unit * unit;
    }
    Ok([&intro[..], &hay[..at], &needle, &hay[at..], &question].concat())
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Cell {
    pub length: usize,
    pub depth: f64,
    pub correct: usize,
    pub trials: usize,
}

/// Where keys go and how often: every (length, depth) cell, `trials` random keys each.
#[derive(Debug, Clone)]
pub struct Grid {
    pub lengths: Vec<usize>,
    /// Fractions of the haystack, 0 to 1.
    pub depths: Vec<f64>,
    pub trials: usize,
    pub seed: u64,
}

/// Accuracy at every cell of `grid`: greedy decoding must produce the 5-digit key as the
/// first number it writes. Trials already in `journal` (under `name`) are not run again;
/// new ones are added to it.
pub fn retrieval(
    model: &Llama,
    tokenizer: &TextTokenizer,
    haystack: &Haystack,
    grid: &Grid,
    (name, mut journal): (&str, Option<&mut Journal>),
    mut progress: impl FnMut(),
) -> Result<Vec<Cell>> {
    let mut rng = StdRng::seed_from_u64(grid.seed);
    let mut cells = Vec::new();
    for &length in &grid.lengths {
        for &depth in &grid.depths {
            let mut correct = 0;
            for trial in 0..grid.trials {
                // Drawn whether or not the trial is journaled: later trials see the same keys.
                let key = rng.random_range(10_000..100_000u32);
                let prompt = retrieval_prompt(tokenizer, haystack, length, depth, key, &mut rng)?;
                let id = format!("{name}/{length}/{depth}/{trial}/{key}");
                let hit = match journal.as_ref().and_then(|j| j.get::<bool>(&id)) {
                    Some(hit) => hit,
                    None => {
                        let answer = tokenizer.decode(&greedy(model, &prompt, 8)?)?;
                        let hit = first_number(&answer) == Some(key);
                        if let Some(j) = journal.as_deref_mut() {
                            j.put(&id, &hit)?;
                        }
                        hit
                    }
                };
                correct += usize::from(hit);
                progress();
            }
            cells.push(Cell {
                length,
                depth,
                correct,
                trials: grid.trials,
            });
        }
    }
    Ok(cells)
}

/// The first run of digits in `s`.
pub fn first_number(s: &str) -> Option<u32> {
    let start = s.find(|c: char| c.is_ascii_digit())?;
    let digits: String = s[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// −log p of every token of `ids` after the first, read in chunks of `chunk` tokens through
/// the cache.
pub fn nll_by_position(model: &Llama, ids: &[u32], chunk: usize) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(ids.len().saturating_sub(1));
    read_chunked(model, ids, chunk, |start, hidden| {
        let end = (start + hidden.dim(0)? + 1).min(ids.len());
        let lps = model.next_token_logprobs(hidden, &ids[start..end])?;
        out.extend(lps.iter().map(|x| -x));
        Ok(())
    })?;
    Ok(out)
}

/// Perplexity per bucket of positions, averaged over sequences: (first position of the bucket,
/// perplexity). Bucket i holds positions starts[i] .. starts[i + 1] (the last, to the end).
pub fn bucketed_perplexity(nlls: &[Vec<f32>], starts: &[usize]) -> Vec<(usize, f64)> {
    let longest = nlls.iter().map(Vec::len).max().unwrap_or(0);
    starts
        .iter()
        .enumerate()
        .take_while(|&(_, &start)| start < longest)
        .map(|(i, &start)| {
            let end = starts.get(i + 1).copied().unwrap_or(usize::MAX);
            let (sum, n) = nlls
                .iter()
                .flat_map(|s| s.iter().skip(start).take(end - start))
                .fold((0.0f64, 0usize), |(s, n), &x| (s + x as f64, n + 1));
            (start, (sum / n as f64).exp())
        })
        .collect()
}

/// How positions are grouped: every `n` tokens, or at given edges.
#[derive(Debug, Clone, PartialEq)]
pub enum Buckets {
    Every(usize),
    /// Bucket boundaries after 0, increasing: 128,512 gives 0–128, 128–512, 512–end.
    Edges(Vec<usize>),
}

impl Buckets {
    /// First position of each bucket, for sequences of `len` positions.
    pub fn starts(&self, len: usize) -> Vec<usize> {
        match self {
            Buckets::Every(n) => (0..len).step_by((*n).max(1)).collect(),
            Buckets::Edges(e) => std::iter::once(0)
                .chain(e.iter().copied().filter(|&x| x > 0 && x < len))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_number_and_buckets_by_hand() {
        assert_eq!(first_number(" 12345. Remember"), Some(12345));
        assert_eq!(first_number("no digits"), None);
        let nlls = [vec![1.0, 1.0, 3.0], vec![1.0, 1.0, 1.0]];
        let b = bucketed_perplexity(&nlls, &Buckets::Every(2).starts(3));
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].0, 0);
        assert!((b[0].1 - 1f64.exp()).abs() < 1e-9);
        assert!((b[1].1 - 2f64.exp()).abs() < 1e-9);
        // Edges: 0–1, 1–end.
        let b = bucketed_perplexity(&nlls, &Buckets::Edges(vec![1, 9]).starts(3));
        assert_eq!(b.iter().map(|x| x.0).collect::<Vec<_>>(), [0, 1]);
        assert!((b[1].1 - (6.0f64 / 4.0).exp()).abs() < 1e-9);
    }
}
