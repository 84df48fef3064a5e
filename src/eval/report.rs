//! Running tasks on a model and reporting them: a markdown table for people, JSON for `supra
//! compare` and the docs.

use crate::eval::harness::{Engine, LogLikelihood, Request};
use crate::eval::journal::Journal;
use crate::eval::tasks::{mean_with_stderr, predict, score_item, Items, Metric, RollingDoc, Task};
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskResult {
    pub task: String,
    pub items: usize,
    /// acc, acc_norm, acc_macro (mean over subgroups), perplexity: whichever the task reports.
    pub metrics: BTreeMap<String, Metric>,
    /// The accuracy of guessing: the mean over items of 1 / their number of choices (0 for
    /// LAMBADA's open answer); none for perplexity tasks. Where a model is near it, a plain
    /// ratio of accuracies says little: `supra compare` shows the share above it too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chance: Option<f64>,
    pub seconds: f64,
    pub items_per_s: f64,
    /// Per item, the choice picked by log-likelihood (multiple choice) or 1 where greedy
    /// decoding reproduced the target (LAMBADA): what the reference cross-check compares.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub predictions: Vec<usize>,
}

/// The first `limit` items; for grouped tasks (MMLU) the first `limit` of each group, as
/// lm-eval's `--limit` does per subtask.
fn limited(items: Items, limit: Option<usize>) -> Items {
    let Some(limit) = limit else { return items };
    match items {
        Items::Greedy(mut r) => {
            r.truncate(limit);
            Items::Greedy(r)
        }
        Items::Rolling(mut d) => {
            d.truncate(limit);
            Items::Rolling(d)
        }
        Items::Choice(items) => {
            let mut seen: BTreeMap<Option<String>, usize> = BTreeMap::new();
            Items::Choice(
                items
                    .into_iter()
                    .filter(|i| {
                        let n = seen.entry(i.group.clone()).or_default();
                        *n += 1;
                        *n <= limit
                    })
                    .collect(),
            )
        }
    }
}

/// Scores `task` (its first `limit` items), continuing from and adding to `journal`.
pub fn run_task(
    engine: &Engine,
    task: &Task,
    data_dir: &Path,
    limit: Option<usize>,
    mut journal: Option<&mut Journal>,
) -> Result<TaskResult> {
    let items = limited(task.load(data_dir)?, limit);
    let name = task.name();
    // Requests per item, to turn answered requests into items done.
    let (requests, sizes): (Vec<Request>, Vec<usize>) = match &items {
        Items::Choice(items) => (
            items.iter().flat_map(|i| i.requests.clone()).collect(),
            items.iter().map(|i| i.requests.len()).collect(),
        ),
        Items::Greedy(r) => (r.clone(), vec![1; r.len()]),
        Items::Rolling(docs) => return rolling(engine, task, docs, journal),
    };
    let item_of: Vec<usize> = sizes
        .iter()
        .enumerate()
        .flat_map(|(item, &n)| std::iter::repeat_n(item, n))
        .collect();
    let (known, mut seconds) = journal
        .as_ref()
        .map_or((Vec::new(), 0.0), |j| j.known(&name, &requests));
    let mut left = sizes.clone();
    let mut done = 0;
    let mut count = |answered: &mut dyn Iterator<Item = usize>| {
        for i in answered {
            left[item_of[i]] -= 1;
            done += usize::from(left[item_of[i]] == 0);
        }
        done as u64
    };
    let bar = progress_bar(task, sizes.len(), "items");
    bar.set_position(count(
        &mut known.iter().enumerate().filter_map(|(i, k)| k.map(|_| i)),
    ));
    let mut last = Instant::now();
    let answers = engine.run(&requests, &known, |answered| {
        let dt = last.elapsed().as_secs_f64();
        last = Instant::now();
        seconds += dt;
        if let Some(j) = journal.as_deref_mut() {
            j.record(&name, &requests, answered, dt)?;
        }
        bar.set_position(count(&mut answered.iter().map(|(i, _)| *i)));
        Ok(())
    })?;
    bar.finish_and_clear();
    let mut metrics = BTreeMap::new();
    let mut predictions = Vec::new();
    // The metrics, and the accuracy of guessing.
    let chance = match &items {
        Items::Choice(items) => {
            let mut start = 0;
            let (mut acc, mut norm) = (Vec::new(), Vec::new());
            let mut groups: BTreeMap<&str, Vec<bool>> = BTreeMap::new();
            for item in items {
                let n = item.requests.len();
                let (a, b) = score_item(item, &answers[start..start + n]);
                predictions.push(predict(item, &answers[start..start + n]).0);
                acc.push(a);
                norm.push(b);
                if let Some(g) = &item.group {
                    groups.entry(g).or_default().push(a);
                }
                start += n;
            }
            metrics.insert("acc".into(), mean_with_stderr(&acc));
            if task.has_acc_norm() {
                metrics.insert("acc_norm".into(), mean_with_stderr(&norm));
            }
            if !groups.is_empty() {
                let means: Vec<f64> = groups.values().map(|g| mean_with_stderr(g).value).collect();
                metrics.insert(
                    "acc_macro".into(),
                    Metric {
                        value: means.iter().sum::<f64>() / means.len() as f64,
                        stderr: None,
                    },
                );
            }
            sizes.iter().map(|&n| 1.0 / n as f64).sum::<f64>() / sizes.len() as f64
        }
        // Greedy (Rolling returned above).
        _ => {
            let greedy: Vec<bool> = answers.iter().map(|a| a.greedy).collect();
            predictions = greedy.iter().map(|&g| usize::from(g)).collect();
            metrics.insert("acc".into(), mean_with_stderr(&greedy));
            let lls: Vec<f64> = answers.iter().map(|a| a.logprob).collect();
            metrics.insert("perplexity".into(), perplexity(&lls));
            0.0
        }
    };
    Ok(TaskResult {
        task: task.name(),
        items: sizes.len(),
        metrics,
        chance: Some(chance),
        seconds,
        items_per_s: sizes.len() as f64 / seconds.max(1e-9),
        predictions,
    })
}

fn progress_bar(task: &Task, len: usize, unit: &str) -> indicatif::ProgressBar {
    let template =
        format!("{{prefix:>14}} {{bar:30}} {{pos}}/{{len}} {unit} [{{elapsed}}<{{eta}}]");
    let bar = indicatif::ProgressBar::new(len as u64)
        .with_style(indicatif::ProgressStyle::with_template(&template).expect("valid template"));
    bar.set_prefix(task.name());
    bar
}

/// Word and byte perplexity of whole documents (lm-eval's wikitext metrics).
fn rolling(
    engine: &Engine,
    task: &Task,
    docs: &[RollingDoc],
    mut journal: Option<&mut Journal>,
) -> Result<TaskResult> {
    let name = task.name();
    // Journaled as requests whose continuation is the whole document.
    let requests: Vec<Request> = docs
        .iter()
        .map(|d| Request {
            context: String::new(),
            continuation: d.text.clone(),
        })
        .collect();
    let (known, mut seconds) = journal
        .as_ref()
        .map_or((Vec::new(), 0.0), |j| j.known(&name, &requests));
    let bar = progress_bar(task, docs.len(), "documents");
    let (mut ll, mut words, mut bytes) = (0.0, 0usize, 0usize);
    for (i, d) in docs.iter().enumerate() {
        let logprob = match known.get(i).copied().flatten() {
            Some(k) => k.logprob,
            None => {
                let t0 = Instant::now();
                let (logprob, tokens) = engine.rolling(&d.text)?;
                let dt = t0.elapsed().as_secs_f64();
                seconds += dt;
                if let Some(j) = journal.as_deref_mut() {
                    let answer = LogLikelihood {
                        logprob,
                        greedy: false,
                        tokens,
                    };
                    j.record(&name, &requests, &[(i, answer)], dt)?;
                }
                logprob
            }
        };
        ll += logprob;
        words += d.words;
        bytes += d.bytes;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let plain = |value: f64| Metric {
        value,
        stderr: None,
    };
    let metrics = BTreeMap::from([
        (
            "word_perplexity".to_string(),
            plain((-ll / words as f64).exp()),
        ),
        (
            "byte_perplexity".to_string(),
            plain((-ll / bytes as f64).exp()),
        ),
        (
            "bits_per_byte".to_string(),
            plain(-ll / bytes as f64 / std::f64::consts::LN_2),
        ),
    ]);
    Ok(TaskResult {
        task: task.name(),
        items: docs.len(),
        metrics,
        chance: None,
        seconds,
        items_per_s: docs.len() as f64 / seconds.max(1e-9),
        predictions: Vec::new(),
    })
}

/// lm-eval's `perplexity` aggregate: exp(−mean per-item log-likelihood), its standard error by
/// the delta method (ppl × stderr of the mean).
fn perplexity(lls: &[f64]) -> Metric {
    let n = lls.len() as f64;
    let mean = lls.iter().sum::<f64>() / n.max(1.0);
    let var = lls.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    let ppl = (-mean).exp();
    Metric {
        value: ppl,
        stderr: Some(ppl * (var / n.max(1.0)).sqrt()),
    }
}

/// The results as a markdown table: accuracies in % ± standard error.
pub fn markdown(results: &[TaskResult]) -> String {
    let cell = |r: &TaskResult, name: &str| {
        r.metrics.get(name).map_or("—".to_string(), |m| {
            let scale = if name.starts_with("acc") { 100.0 } else { 1.0 };
            match m.stderr {
                Some(se) => format!("{:.2} ± {:.2}", scale * m.value, scale * se),
                None => format!("{:.2}", scale * m.value),
            }
        })
    };
    let mut s = String::from(
        "| task | items | acc (%) | acc_norm (%) | acc macro (%) | perplexity | word ppl | bits/byte | items/s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} |\n",
            r.task,
            r.items,
            cell(r, "acc"),
            cell(r, "acc_norm"),
            cell(r, "acc_macro"),
            cell(r, "perplexity"),
            cell(r, "word_perplexity"),
            cell(r, "bits_per_byte"),
            r.items_per_s
        ));
    }
    s
}

/// `supra compare`: the reports of several models (the JSON `supra eval --json` writes) side by
/// side, each after the first with its difference and its retention of the first's score
/// (for perplexities, lower is better: retention is first / value), and for accuracies its
/// retention above chance, (value − chance) / (first − chance), with chance from whichever
/// report records it (reports written before it was recorded do not).
pub fn compare(reports: &[(String, serde_json::Value)]) -> Result<String> {
    use anyhow::{bail, Context};
    if reports.len() < 2 {
        bail!("compare needs at least two reports");
    }
    // (task, metric) → value per report, in the order they first appear.
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut values: BTreeMap<(String, String), Vec<Option<f64>>> = BTreeMap::new();
    let mut chance: BTreeMap<String, f64> = BTreeMap::new();
    for (i, (name, report)) in reports.iter().enumerate() {
        let results = report["results"].as_array().with_context(|| {
            format!("{name}: no \"results\" array (not a `supra eval --json` file?)")
        })?;
        for r in results {
            let task = r["task"]
                .as_str()
                .with_context(|| format!("{name}: a result without \"task\""))?;
            let metrics = r["metrics"]
                .as_object()
                .with_context(|| format!("{name}: task {task} has no \"metrics\""))?;
            if let Some(c) = r["chance"].as_f64() {
                chance.entry(task.to_string()).or_insert(c);
            }
            for (metric, m) in metrics {
                let key = (task.to_string(), metric.clone());
                if !values.contains_key(&key) {
                    rows.push(key.clone());
                }
                values
                    .entry(key)
                    .or_insert_with(|| vec![None; reports.len()])[i] = m["value"].as_f64();
            }
        }
    }
    let mut s = String::from("| task | metric |");
    for (i, (name, _)) in reports.iter().enumerate() {
        s.push_str(&format!(" {name} |"));
        if i > 0 {
            s.push_str(" Δ | retention | above chance |");
        }
    }
    s.push_str("\n|---|---|");
    s.push_str(&"---:|".repeat(1 + 4 * (reports.len() - 1)));
    s.push('\n');
    for key in &rows {
        let v = &values[key];
        let lower_is_better = key.1.contains("perplexity") || key.1 == "bits_per_byte";
        let scale = if key.1.starts_with("acc") { 100.0 } else { 1.0 };
        let fmt = |x: Option<f64>| x.map_or("—".to_string(), |x| format!("{:.2}", scale * x));
        s.push_str(&format!("| {} | {} | {} |", key.0, key.1, fmt(v[0])));
        let c = chance.get(&key.0).filter(|_| key.1.starts_with("acc"));
        for x in &v[1..] {
            let (mut delta, mut retention, mut above) = ("—".into(), "—".into(), "—".into());
            if let (Some(a), Some(b)) = (v[0], *x) {
                let r = if lower_is_better { a / b } else { b / a };
                delta = format!("{:+.2}", scale * (b - a));
                retention = format!("{:.1} %", 100.0 * r);
                if let Some(&c) = c {
                    above = format!("{:.1} %", 100.0 * (b - c) / (a - c));
                }
            }
            s.push_str(&format!(" {} | {delta} | {retention} | {above} |", fmt(*x)));
        }
        s.push('\n');
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_by_hand() {
        let report = |acc: f64, ppl: f64| {
            serde_json::json!({"results": [{"task": "t", "metrics": {
                "acc": {"value": acc, "stderr": 0.01},
                "perplexity": {"value": ppl, "stderr": null}}}]})
        };
        let table = compare(&[
            ("teacher".into(), report(0.5, 10.0)),
            ("linear".into(), report(0.4, 20.0)),
        ])
        .unwrap();
        assert!(
            table.contains("| t | acc | 50.00 | 40.00 | -10.00 | 80.0 % | — |"),
            "{table}"
        );
        assert!(
            table.contains("| t | perplexity | 10.00 | 20.00 | +10.00 | 50.0 % | — |"),
            "{table}"
        );
        // Chance from the report that has it: (0.4 − 0.25) / (0.5 − 0.25).
        let mut second = report(0.4, 20.0);
        second["results"][0]["chance"] = serde_json::json!(0.25);
        let table = compare(&[
            ("teacher".into(), report(0.5, 10.0)),
            ("linear".into(), second),
        ])
        .unwrap();
        assert!(
            table.contains("| t | acc | 50.00 | 40.00 | -10.00 | 80.0 % | 60.0 % |"),
            "{table}"
        );
        assert!(
            table.contains("| t | perplexity | 10.00 | 20.00 | +10.00 | 50.0 % | — |"),
            "{table}"
        );
        assert!(compare(&[("a".into(), serde_json::json!({}))]).is_err());
        let err = compare(&[
            ("a".into(), serde_json::json!({})),
            ("b".into(), report(0.1, 1.0)),
        ]);
        assert!(format!("{:#}", err.unwrap_err()).contains("a: no \"results\""));
    }
}
