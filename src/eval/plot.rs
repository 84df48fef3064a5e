//! Accuracy heatmaps of the long-context probes: length × depth, one panel per model. Line
//! plots are in [`crate::plot`].

use crate::eval::long_context::Cell;
use crate::plot::{err, render, Scale};
use anyhow::Result;
use plotters::prelude::*;
use std::path::Path;

/// Red (0 %) through yellow to green (100 %).
fn accuracy_color(a: f64) -> RGBColor {
    let a = a.clamp(0.0, 1.0);
    let (r, g) = if a < 0.5 {
        (220.0, 60.0 + 2.0 * a * 160.0)
    } else {
        (220.0 - (a - 0.5) * 2.0 * 180.0, 220.0)
    };
    RGBColor(r as u8, g as u8, 60)
}

/// One heatmap per model: context length across, key depth down, accuracy in each cell.
pub fn heatmaps(title: &str, panels: &[(String, Vec<Cell>)], path: &Path) -> Result<()> {
    let n = panels.len().max(1) as u32;
    render(path, (520 * n, 460), |root| {
        let (top, body) = root.split_vertically(40);
        top.titled(title, ("sans-serif", 22)).map_err(err)?;
        for (area, (name, cells)) in body.split_evenly((1, panels.len())).iter().zip(panels) {
            let mut lengths: Vec<usize> = cells.iter().map(|c| c.length).collect();
            lengths.dedup();
            let mut depths: Vec<f64> = cells.iter().map(|c| c.depth).collect();
            depths.sort_by(f64::total_cmp);
            depths.dedup();
            let mut chart = ChartBuilder::on(area)
                .caption(name, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(0..lengths.len(), 0..depths.len())
                .map_err(err)?;
            chart
                .configure_mesh()
                .disable_mesh()
                .x_desc("context length (tokens)")
                .y_desc("key depth (%)")
                // Labelled by hand below (plotters loops forever on zero labels).
                .x_labels(1)
                .y_labels(1)
                .x_label_formatter(&|_| String::new())
                .y_label_formatter(&|_| String::new())
                .draw()
                .map_err(err)?;
            // Labels at cell centres (the mesh would put them on cell edges), in the canvas's
            // pixels, which `backend_coord` gives.
            let font = ("sans-serif", 14);
            for (i, &l) in lengths.iter().enumerate() {
                let (px, py) = chart.backend_coord(&(i, 0));
                let (qx, _) = chart.backend_coord(&(i + 1, 0));
                root.draw(&Text::new(
                    Scale::Tokens.label(l as f64),
                    ((px + qx) / 2 - 10, py + 6),
                    font,
                ))
                .map_err(err)?;
            }
            for (j, d) in depths.iter().enumerate() {
                let (px, py) = chart.backend_coord(&(0, j));
                let (_, qy) = chart.backend_coord(&(0, j + 1));
                let label = format!("{:.0}", 100.0 * d);
                root.draw(&Text::new(label, (px - 30, (py + qy) / 2 - 7), font))
                    .map_err(err)?;
            }
            for c in cells {
                let x = lengths.iter().position(|&l| l == c.length).unwrap_or(0);
                let y = depths.iter().position(|&d| d == c.depth).unwrap_or(0);
                let acc = c.correct as f64 / c.trials.max(1) as f64;
                chart
                    .draw_series([Rectangle::new(
                        [(x, y), (x + 1, y + 1)],
                        accuracy_color(acc).filled(),
                    )])
                    .map_err(err)?;
                let (px, py) = chart.backend_coord(&(x, y + 1));
                let (qx, qy) = chart.backend_coord(&(x + 1, y));
                let label = format!("{:.0}", 100.0 * acc);
                root.draw(&Text::new(
                    label,
                    ((px + qx) / 2 - 10, (py + qy) / 2 - 8),
                    ("sans-serif", 16),
                ))
                .map_err(err)?;
            }
        }
        Ok(())
    })
}
