//! `supra probe`: the long-context and in-context-learning probes over several models, as a
//! markdown table, a JSON report and a PNG.

use crate::eval::harness::Engine;
use crate::eval::journal::Journal;
use crate::eval::long_context::{self, Cell, Grid, Haystack};
use crate::eval::plot::heatmaps;
use crate::eval::recall;
use crate::eval::tasks::Metric;
use crate::io::tokenizer::TextTokenizer;
use crate::model::llama::Llama;
use crate::plot::{self, Lines, Scale, Series};
use anyhow::{bail, Result};
use std::path::PathBuf;

/// A model under test and the name it goes by in tables and plots.
pub struct Subject<'a> {
    pub name: String,
    pub model: &'a Llama,
    pub tokenizer: &'a TextTokenizer,
}

#[derive(Debug, Clone)]
pub enum Probe {
    /// Key retrieval accuracy per (length, depth); `book: Some` is needle-in-a-haystack in it.
    Retrieval { book: Option<PathBuf>, grid: Grid },
    /// Perplexity by position bucket over `sequences` windows of `length` tokens of `texts`.
    Position {
        texts: Vec<PathBuf>,
        length: usize,
        sequences: usize,
        buckets: long_context::Buckets,
    },
    /// Associative-recall accuracy per number of pairs.
    Recall {
        pairs: Vec<usize>,
        queries: usize,
        prompts: usize,
        seed: u64,
    },
}

/// What a probe found: JSON for reports, a markdown table for people.
pub struct Outcome {
    pub json: serde_json::Value,
    pub markdown: String,
}

fn bar(len: usize, what: &str) -> indicatif::ProgressBar {
    let template =
        format!("{{prefix:>12}} {{bar:30}} {{pos}}/{{len}} {what} [{{elapsed}}<{{eta}}]");
    indicatif::ProgressBar::new(len as u64)
        .with_style(indicatif::ProgressStyle::with_template(&template).expect("valid template"))
}

/// The token ids of every text file under `paths`, one list per file.
fn book_ids(paths: &[PathBuf], tokenizer: &TextTokenizer) -> Result<Vec<(String, Vec<u32>)>> {
    // Files named in capitals (SOURCE.txt, README.txt) describe the data; they are not books.
    let is_note = |f: &PathBuf| {
        f.file_stem()
            .and_then(|s| s.to_str())
            .is_some_and(|s| s.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
    };
    let files: Vec<PathBuf> = crate::train::data::list_files(paths)?
        .0
        .into_iter()
        .filter(|f| !is_note(f))
        .collect();
    if files.is_empty() {
        bail!("no text files under {paths:?}");
    }
    files
        .iter()
        .map(|f| {
            let text = crate::train::data::read_text(f)?;
            Ok((f.display().to_string(), tokenizer.encode(&text)?))
        })
        .collect()
}

/// Runs `probe` on every subject, skipping the pieces `journal` holds and adding the new ones
/// to it; writes the plot to `png`.
pub fn run(
    probe: &Probe,
    subjects: &[Subject],
    png: &std::path::Path,
    mut journal: Option<&mut Journal>,
) -> Result<Outcome> {
    match probe {
        Probe::Retrieval { book, grid } => {
            let mut panels = Vec::new();
            for s in subjects {
                let haystack = match book {
                    Some(p) => Haystack::Book(
                        book_ids(std::slice::from_ref(p), s.tokenizer)?
                            .into_iter()
                            .flat_map(|(_, ids)| ids)
                            .collect(),
                    ),
                    None => Haystack::Passkey,
                };
                let pb = bar(
                    grid.lengths.len() * grid.depths.len() * grid.trials,
                    "prompts",
                );
                pb.set_prefix(s.name.clone());
                let cells = long_context::retrieval(
                    s.model,
                    s.tokenizer,
                    &haystack,
                    grid,
                    (&s.name, journal.as_deref_mut()),
                    || pb.inc(1),
                )?;
                pb.finish_and_clear();
                panels.push((s.name.clone(), cells));
            }
            let what = if book.is_some() {
                "needle in a haystack"
            } else {
                "passkey retrieval"
            };
            heatmaps(&format!("{what}: accuracy (%)"), &panels, png)?;
            Ok(Outcome {
                markdown: retrieval_table(&panels),
                json: serde_json::json!(panels
                    .iter()
                    .map(|(n, c)| serde_json::json!({"model": n, "cells": c}))
                    .collect::<Vec<_>>()),
            })
        }
        Probe::Position {
            texts,
            length,
            sequences,
            buckets,
        } => {
            let mut series = Vec::new();
            let mut rows = Vec::new();
            let mut n_windows = 0;
            for s in subjects {
                let books = book_ids(texts, s.tokenizer)?;
                let eot = s.tokenizer.eos_id;
                let windows = windows(&books, *length, *sequences)?;
                n_windows = windows.len();
                let pb = bar(windows.len(), "sequences");
                pb.set_prefix(s.name.clone());
                let mut nlls = Vec::new();
                for (k, w) in windows.iter().enumerate() {
                    let id = format!("{}/{length}/{k}/{}", s.name, w.len());
                    let nll = match journal.as_ref().and_then(|j| j.get::<Vec<f32>>(&id)) {
                        Some(nll) => nll,
                        None => {
                            // Like a document's start: after an end-of-text token when there
                            // is one.
                            let ids: Vec<u32> = eot.into_iter().chain(w.iter().copied()).collect();
                            let nll =
                                long_context::nll_by_position(s.model, &ids, long_context::CHUNK)?;
                            if let Some(j) = journal.as_deref_mut() {
                                j.put(&id, &nll)?;
                            }
                            nll
                        }
                    };
                    nlls.push(nll);
                    pb.inc(1);
                }
                pb.finish_and_clear();
                let starts = buckets.starts(nlls.iter().map(Vec::len).max().unwrap_or(0));
                let by_bucket = long_context::bucketed_perplexity(&nlls, &starts);
                rows.push((s.name.clone(), by_bucket.clone()));
                let longest = nlls.iter().map(Vec::len).max().unwrap_or(0);
                series.push(Series::points(
                    s.name.clone(),
                    by_bucket
                        .iter()
                        .enumerate()
                        .map(|(i, &(p, ppl))| {
                            let end = starts.get(i + 1).copied().unwrap_or(longest);
                            ((p + end) as f64 / 2.0, ppl)
                        })
                        .collect(),
                ));
            }
            let trained = subjects
                .iter()
                .filter(|s| s.model.has_softmax_layers())
                .map(|s| s.model.config.max_position_embeddings)
                .min();
            let marker = trained.map(|n| (n as f64, "softmax trained context"));
            plot::lines(
                &Lines {
                    title: &format!(
                        "perplexity by position ({n_windows} windows of {length} tokens)"
                    ),
                    x_desc: "position (tokens, bucket centre)",
                    y_desc: "perplexity",
                    x_scale: Scale::Tokens,
                    y_scale: Scale::Log10,
                    marker,
                    y_range: None,
                },
                &series,
                png,
            )?;
            Ok(Outcome {
                markdown: position_table(&rows, *length),
                json: serde_json::json!(rows
                    .iter()
                    .map(|(n, b)| serde_json::json!({"model": n, "buckets": format!("{buckets:?}"),
                        "rows": b.iter().map(|(p, ppl)| serde_json::json!({"start": p, "perplexity": ppl})).collect::<Vec<_>>()}))
                    .collect::<Vec<_>>()),
            })
        }
        Probe::Recall {
            pairs,
            queries,
            prompts,
            seed,
        } => {
            let mut rows: Vec<(String, Vec<(usize, Metric)>)> = Vec::new();
            for s in subjects {
                let engine = Engine {
                    model: s.model,
                    tokenizer: s.tokenizer,
                    share_prefix: true,
                    batch_tokens: 2048,
                    max_length: s.model.config.max_position_embeddings,
                };
                let total: usize = pairs.iter().map(|&p| prompts * queries.min(&p)).sum();
                let pb = bar(total, "queries");
                pb.set_prefix(s.name.clone());
                let mut acc = Vec::new();
                for &n in pairs {
                    let id = format!("{}/{n}/{queries}/{prompts}/{seed}", s.name);
                    let m = match journal.as_ref().and_then(|j| j.get::<Metric>(&id)) {
                        Some(m) => m,
                        None => {
                            let m = recall::accuracy(&engine, n, *queries, *prompts, *seed, |k| {
                                pb.inc(k as u64)
                            })?;
                            if let Some(j) = journal.as_deref_mut() {
                                j.put(&id, &m)?;
                            }
                            m
                        }
                    };
                    acc.push((n, m));
                }
                pb.finish_and_clear();
                rows.push((s.name.clone(), acc));
            }
            let series: Vec<Series> = rows
                .iter()
                .map(|(n, a)| {
                    Series::points(
                        n.clone(),
                        a.iter()
                            .map(|(p, m)| (*p as f64, 100.0 * m.value))
                            .collect(),
                    )
                })
                .collect();
            plot::lines(
                &Lines {
                    title: &format!(
                        "associative recall ({prompts} prompts × {queries} queries per point)"
                    ),
                    x_desc: "key-value pairs in context",
                    y_desc: "accuracy (%)",
                    x_scale: Scale::Log2,
                    y_scale: Scale::Linear,
                    marker: None,
                    y_range: Some((0.0, 102.0)),
                },
                &series,
                png,
            )?;
            let mut md = String::from("| model | pairs | accuracy (%) |\n|---|---:|---:|\n");
            for (n, a) in &rows {
                for (p, m) in a {
                    md.push_str(&format!(
                        "| {n} | {p} | {:.1} ± {:.1} |\n",
                        100.0 * m.value,
                        100.0 * m.stderr.unwrap_or(0.0)
                    ));
                }
            }
            Ok(Outcome {
                markdown: md,
                json: serde_json::json!(rows
                    .iter()
                    .map(|(n, a)| serde_json::json!({"model": n, "points": a.iter().map(|(p, m)| serde_json::json!({"pairs": p, "accuracy": m})).collect::<Vec<_>>()}))
                    .collect::<Vec<_>>()),
            })
        }
    }
}

/// `sequences` windows of `length` tokens, spread evenly over the books (each book gives its
/// share, from evenly spaced starts).
fn windows(books: &[(String, Vec<u32>)], length: usize, sequences: usize) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::new();
    for (k, (name, ids)) in books.iter().enumerate() {
        let share = sequences / books.len() + usize::from(k < sequences % books.len());
        if share == 0 {
            continue;
        }
        if ids.len() < length {
            bail!(
                "{name} has {} tokens, fewer than --length {length}",
                ids.len()
            );
        }
        let room = ids.len() - length;
        for j in 0..share {
            let start = room * j / share;
            out.push(ids[start..start + length].to_vec());
        }
    }
    Ok(out)
}

fn retrieval_table(panels: &[(String, Vec<Cell>)]) -> String {
    let mut md =
        String::from("| model | length | depth (%) | accuracy (%) |\n|---|---:|---:|---:|\n");
    for (n, cells) in panels {
        for c in cells {
            md.push_str(&format!(
                "| {n} | {} | {:.0} | {:.0} ({}/{}) |\n",
                c.length,
                100.0 * c.depth,
                100.0 * c.correct as f64 / c.trials.max(1) as f64,
                c.correct,
                c.trials
            ));
        }
    }
    md
}

fn position_table(rows: &[(String, Vec<(usize, f64)>)], length: usize) -> String {
    let mut md = String::from("| positions |");
    for (n, _) in rows {
        md.push_str(&format!(" {n} |"));
    }
    md.push_str("\n|---|");
    md.push_str(&"---:|".repeat(rows.len()));
    md.push('\n');
    let starts: Vec<usize> = rows
        .iter()
        .max_by_key(|(_, b)| b.len())
        .map(|(_, b)| b.iter().map(|x| x.0).collect())
        .unwrap_or_default();
    for (i, start) in starts.iter().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(length);
        md.push_str(&format!("| {start}–{end} |"));
        for (_, b) in rows {
            md.push_str(
                &b.get(i)
                    .map_or(" — |".into(), |(_, p)| format!(" {p:.2} |")),
            );
        }
        md.push('\n');
    }
    md
}
