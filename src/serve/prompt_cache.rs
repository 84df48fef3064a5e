//! States kept after earlier requests, so that a request whose prompt starts with what an
//! earlier one read (a system prompt, the turns of a conversation so far) reads only the rest.
//! A recurrent state exists only at the end of what it read, so an entry serves a prompt only
//! when all of its tokens are a prefix of that prompt.

use crate::infer::state::State;
use anyhow::Result;

pub struct PromptCache {
    capacity: usize,
    /// Least recently used first.
    entries: Vec<State>,
}

impl PromptCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A copy of the longest entry whose tokens start `prompt` (possibly all of it: the entry's
    /// logits then continue it), or `None`.
    pub fn lookup(&mut self, prompt: &[u32]) -> Result<Option<State>> {
        let best = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.logits.is_some() && prompt.starts_with(&e.tokens))
            .max_by_key(|(_, e)| e.tokens.len())
            .map(|(i, _)| i);
        let Some(i) = best else { return Ok(None) };
        let entry = self.entries.remove(i);
        let copy = entry.fork()?;
        self.entries.push(entry);
        Ok(Some(copy))
    }

    /// Keeps a copy of `state` (replacing an entry with the same tokens), dropping the least
    /// recently used entry when full.
    pub fn insert(&mut self, state: &State) -> Result<()> {
        if self.capacity == 0 || state.tokens.is_empty() || state.logits.is_none() {
            return Ok(());
        }
        self.entries.retain(|e| e.tokens != state.tokens);
        if self.entries.len() == self.capacity {
            self.entries.remove(0);
        }
        self.entries.push(state.fork()?);
        Ok(())
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
        let mut cache = PromptCache::new(2);
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
        PromptCache::new(0).insert(&state(&[1])).unwrap();
    }
}
