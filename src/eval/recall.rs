//! In-context learning: multi-query associative recall (Arora et al. 2023, "Zoology"), in words.
//! A prompt lists key-value pairs ("apple 42"), then asks for the values of some keys again,
//! each query after the ones before it with their answers. Recalling a value means reading it
//! back from the context: exactly what a fixed-size state can hold only so much of, so accuracy
//! against the number of pairs shows where a linear model's memory runs out.

use crate::eval::harness::{Engine, Request};
use crate::eval::tasks::{mean_with_stderr, Metric};
use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};

/// Common one-syllable words: the keys.
const KEYS: [&str; 128] = [
    "apple", "bread", "chair", "dog", "egg", "fish", "glass", "hat", "ink", "jam", "kite", "lamp",
    "milk", "nest", "oak", "pen", "queen", "rain", "salt", "tree", "car", "box", "wolf", "yard",
    "zoo", "bell", "cake", "door", "fan", "gold", "hill", "iron", "jar", "key", "leaf", "moon",
    "nail", "owl", "pig", "ring", "ship", "tent", "van", "wall", "bag", "bird", "boat", "book",
    "cat", "coat", "corn", "cow", "cup", "desk", "duck", "fire", "flag", "fork", "frog", "goat",
    "gate", "horse", "house", "lake", "lock", "map", "mouse", "nut", "park", "pear", "pot", "rock",
    "road", "rope", "sand", "seed", "sheep", "shoe", "sock", "star", "stone", "sun", "table",
    "train", "wheel", "wind", "bear", "bike", "bone", "bowl", "brick", "bus", "cloud", "coin",
    "crab", "drum", "farm", "foot", "fox", "grass", "hand", "hen", "hook", "horn", "king", "knife",
    "lion", "mask", "mill", "mud", "net", "pan", "pipe", "plum", "pond", "rat", "roof", "rose",
    "shell", "sky", "snow", "spoon", "tail", "toy", "wing", "wire", "worm", "yarn",
];

/// The most pairs a prompt can hold (one per distinct key).
pub const MAX_PAIRS: usize = KEYS.len();

const INTRO: &str = "Here is a list of words, each with its number. Remember them.\n\n";

/// `prompts` prompts of `pairs` pairs with `queries` queries each, as log-likelihood requests
/// (greedy match of the value after its key).
pub fn requests(pairs: usize, queries: usize, prompts: usize, seed: u64) -> Result<Vec<Request>> {
    if pairs == 0 || pairs > MAX_PAIRS {
        bail!("associative recall takes 1 to {MAX_PAIRS} pairs, not {pairs}");
    }
    let mut rng = StdRng::seed_from_u64(seed ^ (pairs as u64) << 32);
    let mut out = Vec::new();
    for _ in 0..prompts {
        let keys: Vec<&str> = KEYS.choose_multiple(&mut rng, pairs).copied().collect();
        let values: Vec<u32> = (0..pairs).map(|_| rng.random_range(10..100)).collect();
        let mut context = String::from(INTRO);
        for (k, v) in keys.iter().zip(&values) {
            context.push_str(&format!("{k} {v}\n"));
        }
        context.push_str("\nAgain:\n");
        let mut order: Vec<usize> = (0..pairs).collect();
        order.shuffle(&mut rng);
        for &q in order.iter().take(queries.min(pairs)) {
            out.push(Request {
                context: format!("{context}{}", keys[q]),
                continuation: format!(" {}", values[q]),
            });
            context.push_str(&format!("{} {}\n", keys[q], values[q]));
        }
    }
    Ok(out)
}

/// Accuracy (greedy recall of the whole value) with `pairs` pairs per prompt.
pub fn accuracy(
    engine: &Engine,
    pairs: usize,
    queries: usize,
    prompts: usize,
    seed: u64,
    mut progress: impl FnMut(usize),
) -> Result<Metric> {
    let reqs = requests(pairs, queries, prompts, seed)?;
    let answers = engine.run(&reqs, &[], |a| {
        progress(a.len());
        Ok(())
    })?;
    let hits: Vec<bool> = answers.iter().map(|a| a.greedy).collect();
    Ok(mean_with_stderr(&hits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_list_pairs_then_ask_them_again() {
        let r = requests(4, 3, 2, 7).unwrap();
        assert_eq!(r.len(), 6);
        assert_eq!(r, requests(4, 3, 2, 7).unwrap(), "seeded");
        // Each query's answer is the value listed for its key.
        for q in &r {
            let key = q.context.rsplit('\n').next().unwrap();
            let listed = format!("\n{key}{}\n", q.continuation);
            assert!(
                q.context.contains(&listed) || q.context.starts_with(&listed[1..]),
                "{q:?}"
            );
        }
        // Later queries of one prompt follow the earlier ones with their answers.
        assert!(r[1].context.starts_with(&r[0].context));
        assert!(r[1]
            .context
            .contains(&format!("{}{}\n", r[0].context, r[0].continuation)));
        assert!(!r[3].context.starts_with(&r[2].context), "a new prompt");
        assert_eq!(
            KEYS.iter().collect::<std::collections::HashSet<_>>().len(),
            MAX_PAIRS
        );
        assert!(requests(MAX_PAIRS + 1, 1, 1, 0).is_err());
    }
}
