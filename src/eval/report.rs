//! Running tasks on a model and reporting them: a markdown table for people, JSON for `supra
//! compare` and the docs.

use crate::eval::harness::Engine;
use crate::eval::tasks::{mean_with_stderr, score_item, Metric, Task};
use anyhow::Result;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskResult {
    pub task: String,
    pub items: usize,
    pub acc: Metric,
    pub acc_norm: Option<Metric>,
    pub seconds: f64,
    pub items_per_s: f64,
}

/// Scores the first `limit` items of `task` (all of them without a limit).
pub fn run_task(
    engine: &Engine,
    task: &Task,
    data_dir: &Path,
    limit: Option<usize>,
) -> Result<TaskResult> {
    let mut items = task.load(data_dir)?;
    items.truncate(limit.unwrap_or(usize::MAX));
    let requests: Vec<_> = items.iter().flat_map(|i| i.requests.clone()).collect();
    let bar = indicatif::ProgressBar::new(items.len() as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>14} {bar:30} {pos}/{len} items [{elapsed}<{eta}]",
        )
        .expect("valid template"),
    );
    bar.set_prefix(task.name());
    // Requests per item, to turn "requests answered" into "items done".
    let ends: Vec<usize> = items
        .iter()
        .scan(0, |n, i| {
            *n += i.requests.len();
            Some(*n)
        })
        .collect();
    let t0 = Instant::now();
    let answers = engine.run(&requests, |done| {
        bar.set_position(ends.partition_point(|&e| e <= done) as u64)
    })?;
    bar.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    let mut start = 0;
    let (mut acc, mut norm) = (Vec::new(), Vec::new());
    for item in &items {
        let n = item.requests.len();
        let (a, b) = score_item(item, &answers[start..start + n]);
        acc.push(a);
        norm.push(b);
        start += n;
    }
    Ok(TaskResult {
        task: task.name(),
        items: items.len(),
        acc: mean_with_stderr(&acc),
        acc_norm: task.has_acc_norm().then(|| mean_with_stderr(&norm)),
        seconds,
        items_per_s: items.len() as f64 / seconds.max(1e-9),
    })
}

/// The results as a markdown table (percentages ± standard error).
pub fn markdown(results: &[TaskResult]) -> String {
    let pct = |m: &Metric| format!("{:.2} ± {:.2}", 100.0 * m.value, 100.0 * m.stderr);
    let mut s = String::from(
        "| task | items | acc (%) | acc_norm (%) | items/s |\n|---|---:|---:|---:|---:|\n",
    );
    for r in results {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} |\n",
            r.task,
            r.items,
            pct(&r.acc),
            r.acc_norm.as_ref().map_or("—".to_string(), pct),
            r.items_per_s
        ));
    }
    s
}
