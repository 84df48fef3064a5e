//! The loss curves of a run as a PNG (train loss per update, validation loss when measured).

use crate::train::run::Metrics;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

pub fn loss_plot(history: &[Metrics], title: &str, path: &Path) -> Result<()> {
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
    let all = train.iter().chain(&valid);
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for &(_, y) in all {
        lo = lo.min(y);
        hi = hi.max(y);
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let x_max = train.last().map_or(1.0, |p| p.0).max(1.0);
    // Render to a temporary file, then rename: readers never see half a PNG.
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("plot.png");
    let tmp = path.with_file_name(format!(".{name}.tmp.png"));
    {
        let root = BitMapBackend::new(&tmp, (900, 540)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, (lo - pad)..(hi + pad))
            .map_err(|e| anyhow!("plot: {e}"))?;
        chart
            .configure_mesh()
            .x_desc("training tokens")
            .y_desc("loss")
            .draw()
            .map_err(|e| anyhow!("plot: {e}"))?;
        chart
            .draw_series(LineSeries::new(train, &BLUE))
            .map_err(|e| anyhow!("plot: {e}"))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        if !valid.is_empty() {
            chart
                .draw_series(LineSeries::new(valid.clone(), RED.stroke_width(2)))
                .map_err(|e| anyhow!("plot: {e}"))?
                .label("validation")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
            chart
                .draw_series(valid.iter().map(|&p| Circle::new(p, 3, RED.filled())))
                .map_err(|e| anyhow!("plot: {e}"))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| anyhow!("plot: {e}"))?;
        root.present().map_err(|e| anyhow!("plot: {e}"))?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}
