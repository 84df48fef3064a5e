//! Results of a long run, one JSON line per piece as it is done, so that an interrupted run (a
//! full MMLU takes hours here, a 32k-token probe minutes per prompt) continues where it
//! stopped. Lines are keyed; eval answers carry a hash of their request, so answers to requests
//! that changed since (other data, another limit) are not reused.

use crate::eval::harness::{LogLikelihood, Request};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One eval answer as journaled.
#[derive(serde::Serialize, serde::Deserialize)]
struct Answer {
    hash: u64,
    logprob: f64,
    greedy: bool,
    tokens: usize,
    /// Seconds of compute this answer took (its share of its forward pass).
    s: f64,
}

pub struct Journal {
    path: PathBuf,
    file: std::fs::File,
    entries: HashMap<String, serde_json::Value>,
}

/// FNV-1a over the request's text: stable across runs and builds.
pub fn request_hash(r: &Request) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in r
        .context
        .bytes()
        .chain([0xff])
        .chain(r.continuation.bytes())
    {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

impl Journal {
    /// The journal kept beside a report written to `report`.
    pub fn path_for(report: &Path) -> PathBuf {
        let mut name = report.file_name().unwrap_or_default().to_os_string();
        name.push(".partial.jsonl");
        report.with_file_name(name)
    }

    /// Opens `path` for appending. `header` names what the answers are answers of (the model);
    /// with `resume`, the answers already there are kept, provided the header matches.
    /// Without it, an existing journal is an error rather than hours of work thrown away.
    pub fn open(path: &Path, header: &str, resume: bool) -> Result<Self> {
        let mut entries = HashMap::new();
        let exists = path.exists();
        if exists && !resume {
            bail!(
                "{} holds the answers of an interrupted run: pass --resume to continue it, or delete the file",
                path.display()
            );
        }
        // Whether the last line was cut short by an interruption.
        let mut cut = false;
        if exists {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            cut = !text.ends_with('\n');
            let mut lines = text.lines();
            let first = lines.next().unwrap_or_default();
            if first != header {
                bail!(
                    "{}: written for {first}, not {header}; delete it to start afresh",
                    path.display()
                );
            }
            for (n, line) in lines.enumerate() {
                // A line cut short by an interruption is simply done again.
                let parsed = serde_json::from_str::<serde_json::Value>(line).ok();
                let Some((key, value)) = parsed.and_then(|v| {
                    Some((v.get("key")?.as_str()?.to_string(), v.get("value")?.clone()))
                }) else {
                    eprintln!("{}:{}: incomplete line, ignored", path.display(), n + 2);
                    continue;
                };
                entries.insert(key, value);
            }
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        if !exists {
            writeln!(file, "{header}")?;
        } else if cut {
            // End the cut line, so the next one starts clean.
            writeln!(file)?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            entries,
        })
    }

    /// The value journaled under `key`, if any (and if it reads as a `T`).
    pub fn get<T: serde::de::DeserializeOwned>(&self, key: &str) -> Option<T> {
        serde_json::from_value(self.entries.get(key)?.clone()).ok()
    }

    /// Journals `value` under `key`, on disk at once.
    pub fn put<T: serde::Serialize>(&mut self, key: &str, value: &T) -> Result<()> {
        self.put_all(&[(key.to_string(), serde_json::to_value(value)?)])
    }

    fn put_all(&mut self, items: &[(String, serde_json::Value)]) -> Result<()> {
        let mut buf = String::new();
        for (key, value) in items {
            buf.push_str(&serde_json::to_string(
                &serde_json::json!({"key": key, "value": value}),
            )?);
            buf.push('\n');
            self.entries.insert(key.clone(), value.clone());
        }
        self.file
            .write_all(buf.as_bytes())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// The journal's answers to `task`'s `requests` (None where it has none or the request
    /// changed), and the seconds they took.
    pub fn known(&self, task: &str, requests: &[Request]) -> (Vec<Option<LogLikelihood>>, f64) {
        let mut seconds = 0.0;
        let known = requests
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let a: Answer = self.get(&format!("{task}#{i}"))?;
                (a.hash == request_hash(r)).then(|| {
                    seconds += a.s;
                    LogLikelihood {
                        logprob: a.logprob,
                        greedy: a.greedy,
                        tokens: a.tokens,
                    }
                })
            })
            .collect();
        (known, seconds)
    }

    /// Appends answers (request index, answer) of `task`, which took `seconds` together.
    pub fn record(
        &mut self,
        task: &str,
        requests: &[Request],
        answers: &[(usize, LogLikelihood)],
        seconds: f64,
    ) -> Result<()> {
        let items = answers
            .iter()
            .map(|(i, ll)| {
                let a = Answer {
                    hash: request_hash(&requests[*i]),
                    logprob: ll.logprob,
                    greedy: ll.greedy,
                    tokens: ll.tokens,
                    s: seconds / answers.len() as f64,
                };
                Ok((format!("{task}#{i}"), serde_json::to_value(a)?))
            })
            .collect::<Result<Vec<_>>>()?;
        self.put_all(&items)
    }

    /// The run finished and its report is written: the journal has served.
    pub fn remove(self) -> Result<()> {
        drop(self.file);
        std::fs::remove_file(&self.path)
            .with_context(|| format!("cannot remove {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumes_only_matching_answers_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = Journal::path_for(&dir.path().join("out.json"));
        assert!(path.ends_with("out.json.partial.jsonl"));
        let r = |c: &str| Request {
            context: c.into(),
            continuation: " x".into(),
        };
        let requests = vec![r("a"), r("b"), r("c")];
        let ll = |logprob| LogLikelihood {
            logprob,
            greedy: false,
            tokens: 2,
        };
        let mut j = Journal::open(&path, "model-1", false).unwrap();
        j.record("t", &requests, &[(0, ll(-1.0)), (2, ll(-3.0))], 4.0)
            .unwrap();
        drop(j);
        // An interruption mid-line.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"key\": \"t#1\", \"val").unwrap();
        drop(f);

        let err = Journal::open(&path, "model-1", false).err().unwrap();
        assert!(format!("{err:#}").contains("--resume"));
        let err = Journal::open(&path, "model-2", true).err().unwrap();
        assert!(format!("{err:#}").contains("written for model-1"));

        let j = Journal::open(&path, "model-1", true).unwrap();
        let (known, seconds) = j.known("t", &requests);
        assert_eq!(known, vec![Some(ll(-1.0)), None, Some(ll(-3.0))]);
        assert_eq!(seconds, 4.0);
        assert_eq!(j.known("other", &requests).0, vec![None; 3]);
        // A request that changed since is answered again.
        let changed = vec![r("a"), r("b"), r("C")];
        assert_eq!(j.known("t", &changed).0, vec![Some(ll(-1.0)), None, None]);
        let mut j = Journal::open(&path, "model-1", true).unwrap();
        j.record("t", &requests, &[(1, ll(-2.0))], 1.0).unwrap();
        drop(j);
        let j = Journal::open(&path, "model-1", true).unwrap();
        assert_eq!(j.known("t", &requests).0[1], Some(ll(-2.0)));
        j.remove().unwrap();
        assert!(!path.exists());
    }
}
