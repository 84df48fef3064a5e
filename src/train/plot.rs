//! The loss curves of a run as a PNG: train loss per update and validation loss when measured,
//! one panel per objective (transfer+finetune has two, on different scales).

use crate::train::recipe::Objective;
use crate::train::run::Metrics;
use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

fn panel(
    area: &DrawingArea<BitMapBackend, Shift>,
    history: &[&Metrics],
    title: &str,
) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("plot: {e}");
    let train: Vec<(f64, f64)> = history
        .iter()
        .filter(|m| !m.skipped && m.loss.is_finite())
        .map(|m| (m.tokens as f64, m.loss))
        .collect();
    let valid: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|m| {
            m.val_loss
                .filter(|v| v.is_finite())
                .map(|v| (m.tokens as f64, v))
        })
        .collect();
    if train.is_empty() {
        return Ok(());
    }
    let ys = train.iter().chain(&valid).map(|p| p.1);
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let x0 = history.first().map_or(0.0, |m| m.tokens as f64);
    let x1 = train.last().map_or(1.0, |p| p.0).max(x0 + 1.0);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, (lo - pad)..(hi + pad))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("training tokens")
        .y_desc("loss")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(train, &BLUE))
        .map_err(|e| err(&e))?
        .label("train")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    if !valid.is_empty() {
        chart
            .draw_series(LineSeries::new(valid.clone(), RED.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label("validation")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart
            .draw_series(valid.iter().map(|&p| Circle::new(p, 3, RED.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| err(&e))?;
    Ok(())
}

pub fn loss_plot(history: &[Metrics], title: &str, path: &Path) -> Result<()> {
    let groups: Vec<(Objective, Vec<&Metrics>)> = [Objective::Transfer, Objective::Ce]
        .into_iter()
        .map(|o| {
            (
                o,
                history
                    .iter()
                    .filter(|m| m.objective == o)
                    .collect::<Vec<_>>(),
            )
        })
        .filter(|(_, g)| !g.is_empty())
        .collect();
    if groups.is_empty() {
        return Ok(());
    }
    // Render to a temporary file, then rename: readers never see half a PNG.
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("plot.png");
    let tmp = path.with_file_name(format!(".{name}.tmp.png"));
    {
        let root = BitMapBackend::new(&tmp, (900, 420 * groups.len() as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
        for (area, (objective, group)) in root.split_evenly((groups.len(), 1)).iter().zip(&groups) {
            let what = match objective {
                Objective::Transfer => "attention transfer (per-layer MSE)",
                Objective::Ce => "cross-entropy (nats/token)",
            };
            panel(area, group, &format!("{title}: {what}"))?;
        }
        root.present().map_err(|e| anyhow!("plot: {e}"))?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}
