//! The loss curves of a run as a PNG: train loss per update and validation loss when measured,
//! one panel per objective (transfer+finetune has two, on different scales).

use crate::plot::{self, Lines, Scale, Series};
use crate::train::recipe::Objective;
use crate::train::run::Metrics;
use anyhow::Result;
use std::path::Path;

/// The train and validation series of one objective's updates; `None` without a finite
/// train loss.
fn curves(history: &[&Metrics]) -> Option<Vec<Series>> {
    let train: Vec<(f64, f64)> = history
        .iter()
        .filter(|m| !m.skipped && m.loss.is_finite())
        .map(|m| (m.tokens as f64, m.loss))
        .collect();
    if train.is_empty() {
        return None;
    }
    let valid: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|m| {
            m.val_loss
                .filter(|v| v.is_finite())
                .map(|v| (m.tokens as f64, v))
        })
        .collect();
    let mut series = vec![Series::trace("train", train)];
    if !valid.is_empty() {
        series.push(Series::points("validation", valid));
    }
    Some(series)
}

pub fn loss_plot(history: &[Metrics], title: &str, path: &Path) -> Result<()> {
    let panels: Vec<(String, Vec<Series>)> =
        [Objective::Transfer, Objective::Ce, Objective::Distill]
            .into_iter()
            .filter_map(|o| {
                let group: Vec<&Metrics> = history.iter().filter(|m| m.objective == o).collect();
                let what = match o {
                    Objective::Transfer => "attention transfer (per-layer MSE)",
                    Objective::Ce => "cross-entropy (nats/token)",
                    Objective::Distill => "distillation (KL to the teacher, nats/token)",
                };
                curves(&group).map(|c| (format!("{title}: {what}"), c))
            })
            .collect();
    if panels.is_empty() {
        return Ok(());
    }
    let specs: Vec<Lines> = panels
        .iter()
        .map(|(t, _)| Lines {
            title: t,
            x_desc: "training tokens",
            y_desc: "loss",
            x_scale: Scale::Linear,
            y_scale: Scale::Linear,
            marker: None,
            y_range: None,
        })
        .collect();
    let charts: Vec<(&Lines, &[Series])> = specs
        .iter()
        .zip(&panels)
        .map(|(s, (_, c))| (s, c.as_slice()))
        .collect();
    plot::panels(&charts, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(step: u64, objective: Objective, loss: f64, val_loss: Option<f64>) -> Metrics {
        Metrics {
            step,
            tokens: step * 4096,
            objective,
            loss,
            val_loss,
            lr: 1e-3,
            grad_norm: 1.0,
            tokens_per_s: 100.0,
            skipped: false,
            window: None,
        }
    }

    #[test]
    fn one_panel_per_objective_and_none_without_a_finite_loss() {
        let dir = std::env::temp_dir().join(format!("supra-loss-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let png = dir.join("loss.png");
        let mut history: Vec<Metrics> = (1..=30)
            .map(|s| update(s, Objective::Transfer, 1.0 / s as f64, None))
            .collect();
        history.extend((31..=40).map(|s| update(s, Objective::Ce, 5.0, Some(4.8))));
        loss_plot(&history, "t", &png).unwrap();
        let two = std::fs::metadata(&png).unwrap().len();
        loss_plot(&history[..30], "t", &png).unwrap();
        let one = std::fs::metadata(&png).unwrap().len();
        assert!(one > 1000 && two > one, "{one} {two}");
        std::fs::remove_file(&png).unwrap();
        let diverged = [update(1, Objective::Ce, f64::NAN, None)];
        loss_plot(&diverged, "t", &png).unwrap();
        assert!(!png.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
