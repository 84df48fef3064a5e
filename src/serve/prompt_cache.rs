//! States kept after earlier requests, so that a request whose prompt starts with what an
//! earlier one read (a system prompt, the turns of a conversation so far) reads only the rest.
//! A recurrent state exists only at the end of what it read, so an entry serves a prompt only
//! when all of its tokens are a prefix of that prompt.

use crate::infer::state::State;
use anyhow::Result;

/// At most `capacity` states and `max_bytes` of them: a softmax model's state is its KV cache,
/// which grows with the prompt (two 8k-token prompts of SmolLM2 once took the server to 2 GB),
/// while a SUPRA state is a few MiB whatever the prompt.
pub struct PromptCache {
    capacity: usize,
    max_bytes: usize,
    /// Least recently used first, each with its bytes.
    entries: Vec<(State, usize)>,
    bytes: usize,
}

impl PromptCache {
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        Self {
            capacity,
            max_bytes,
            entries: Vec::new(),
            bytes: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes the entries hold.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// A copy of the longest entry whose tokens start `prompt` (possibly all of it: the entry's
    /// logits then continue it), or `None`.
    pub fn lookup(&mut self, prompt: &[u32]) -> Result<Option<State>> {
        let best = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, (e, _))| e.logits.is_some() && prompt.starts_with(&e.tokens))
            .max_by_key(|(_, (e, _))| e.tokens.len())
            .map(|(i, _)| i);
        let Some(i) = best else { return Ok(None) };
        let entry = self.entries.remove(i);
        let copy = entry.0.fork()?;
        self.entries.push(entry);
        Ok(Some(copy))
    }

    /// Keeps a copy of `state` (replacing an entry with the same tokens), dropping the least
    /// recently used entries until it fits; a state larger than the whole budget is not kept.
    pub fn insert(&mut self, state: &State) -> Result<()> {
        if self.capacity == 0 || state.tokens.is_empty() || state.logits.is_none() {
            return Ok(());
        }
        let copy = state.fork()?;
        let size = copy.bytes();
        if size > self.max_bytes {
            return Ok(());
        }
        self.remove_where(|e| e.tokens == state.tokens);
        while !self.entries.is_empty()
            && (self.entries.len() == self.capacity || self.bytes + size > self.max_bytes)
        {
            self.bytes -= self.entries.remove(0).1;
        }
        self.entries.push((copy, size));
        self.bytes += size;
        Ok(())
    }

    fn remove_where(&mut self, f: impl Fn(&State) -> bool) {
        let bytes = &mut self.bytes;
        self.entries.retain(|(e, size)| {
            let drop = f(e);
            if drop {
                *bytes -= size;
            }
            !drop
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::Llama;

    #[test]
    fn longest_prefix_wins_and_the_least_recently_used_goes() {
        let dir = tempfile::tempdir().unwrap();
        let m = crate::testing::tiny_loaded(dir.path(), 1, Some(&[])).unwrap();
        let model = Llama::new(&m.config, &m.weights).unwrap();
        let state = |ids: &[u32]| {
            let mut s = State::new(&model);
            s.feed(&model, ids).unwrap();
            s
        };
        let mut cache = PromptCache::new(2, usize::MAX);
        cache.insert(&state(&[5, 6])).unwrap();
        cache.insert(&state(&[5, 6, 7])).unwrap();
        let hit = cache.lookup(&[5, 6, 7, 8]).unwrap().unwrap();
        assert_eq!(hit.tokens, [5, 6, 7]);
        assert!(cache.lookup(&[5, 9]).unwrap().is_none());
        // [5, 6, 7] was used last, so [5, 6] makes room for [9].
        cache.insert(&state(&[9])).unwrap();
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.lookup(&[5, 6, 1]).unwrap().map(|s| s.tokens), None);
        assert_eq!(cache.lookup(&[5, 6, 7]).unwrap().unwrap().tokens, [5, 6, 7]);
        PromptCache::new(0, usize::MAX)
            .insert(&state(&[1]))
            .unwrap();
    }

    /// The byte budget holds whatever the entry count allows: the oldest entries go until a
    /// new one fits, and one larger than the budget is not kept. The tiny teacher's state is its
    /// KV cache, which grows with the tokens read.
    #[test]
    fn the_byte_budget_evicts_the_oldest_and_refuses_what_cannot_fit() {
        let dir = tempfile::tempdir().unwrap();
        let m = crate::testing::tiny_loaded(dir.path(), 1, None).unwrap();
        let model = Llama::new(&m.config, &m.weights).unwrap();
        let state = |ids: &[u32]| {
            let mut s = State::new(&model);
            s.feed(&model, ids).unwrap();
            s
        };
        let (short, long) = (state(&[5; 8]), state(&[6; 64]));
        let (a, b) = (short.fork().unwrap().bytes(), long.fork().unwrap().bytes());
        assert!(
            b > a,
            "a KV cache grows with the context ({a} vs {b} bytes)"
        );
        let mut cache = PromptCache::new(8, b + a);
        cache.insert(&short).unwrap();
        cache.insert(&state(&[7; 8])).unwrap();
        assert_eq!((cache.len(), cache.bytes()), (2, 2 * a));
        // The long state needs both short ones' room minus one: the oldest goes.
        cache.insert(&long).unwrap();
        assert_eq!((cache.len(), cache.bytes()), (2, a + b));
        assert!(cache.lookup(&[5; 9]).unwrap().is_none());
        assert!(cache.lookup(&[7; 9]).unwrap().is_some());
        let mut small = PromptCache::new(8, b - 1);
        small.insert(&long).unwrap();
        assert!(small.is_empty());
    }
}
