//! PNG figures of the probes: accuracy heatmaps (length × depth, one panel per model) and line
//! plots (several models on one chart). Written to a temporary file and renamed into place.

use crate::eval::long_context::Cell;
use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("plot: {e}")
}

/// Draws with `draw` on a `w` × `h` canvas, then renames the file to `path`.
fn render(
    path: &Path,
    (w, h): (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> Result<()>,
) -> Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("plot.png");
    let tmp = path.with_file_name(format!(".{name}.tmp.png"));
    {
        let root = BitMapBackend::new(&tmp, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        draw(&root)?;
        root.present().map_err(err)?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

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

fn length_label(n: usize) -> String {
    if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}k", n / 1024)
    } else {
        n.to_string()
    }
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
                    length_label(l),
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

/// Line plot of several named series; optional log x axis and a dashed vertical marker
/// (the teacher's trained context, say) with its label.
pub struct Lines<'a> {
    pub title: &'a str,
    pub x_desc: &'a str,
    pub y_desc: &'a str,
    pub log_x: bool,
    pub log_y: bool,
    pub marker: Option<(f64, &'a str)>,
    /// Fixed y range instead of the data's.
    pub y_range: Option<(f64, f64)>,
}

pub fn lines(spec: &Lines, series: &[(String, Vec<(f64, f64)>)], path: &Path) -> Result<()> {
    let points = || {
        series
            .iter()
            .flat_map(|(_, s)| s.iter())
            .filter(|p| p.1.is_finite())
    };
    let (x0, x1) = points().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
        (a.min(p.0), b.max(p.0))
    });
    let (y0, y1) = points().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
        (a.min(p.1), b.max(p.1))
    });
    if !x0.is_finite() || !y0.is_finite() {
        return Err(anyhow!("plot {}: no finite points", spec.title));
    }
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    let (y0, y1) = if let Some(r) = spec.y_range {
        r
    } else if spec.log_y {
        (y0 / 1.1, y1 * 1.1)
    } else {
        let pad = ((y1 - y0) * 0.05).max(1e-3);
        (y0 - pad, y1 + pad)
    };
    let palette = [&BLUE, &RED, &GREEN, &MAGENTA, &CYAN, &BLACK];
    render(path, (900, 520), |root| {
        macro_rules! draw {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc(spec.x_desc)
                    .y_desc(spec.y_desc)
                    .draw()
                    .map_err(err)?;
                for (i, (name, s)) in series.iter().enumerate() {
                    let color = palette[i % palette.len()];
                    let pts: Vec<(f64, f64)> =
                        s.iter().copied().filter(|p| p.1.is_finite()).collect();
                    chart
                        .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                        .map_err(err)?
                        .label(name.as_str())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                        });
                    chart
                        .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                        .map_err(err)?;
                }
                if let Some((x, label)) = spec.marker {
                    let line = PathElement::new(vec![(x, y0), (x, y1)], BLACK.mix(0.6));
                    chart.draw_series([line]).map_err(err)?;
                    chart
                        .draw_series([Text::new(label.to_string(), (x, y1), ("sans-serif", 14))])
                        .map_err(err)?;
                }
                chart
                    .configure_series_labels()
                    .border_style(BLACK)
                    .background_style(WHITE.mix(0.85))
                    .draw()
                    .map_err(err)?;
            }};
        }
        let builder = || {
            let mut b = ChartBuilder::on(root);
            b.caption(spec.title, ("sans-serif", 20))
                .margin(14)
                .x_label_area_size(45)
                .y_label_area_size(65);
            b
        };
        match (spec.log_x, spec.log_y) {
            (true, true) => draw!(builder()
                .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
                .map_err(err)?),
            (true, false) => draw!(builder()
                .build_cartesian_2d((x0..x1).log_scale(), y0..y1)
                .map_err(err)?),
            (false, true) => draw!(builder()
                .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
                .map_err(err)?),
            (false, false) => draw!(builder().build_cartesian_2d(x0..x1, y0..y1).map_err(err)?),
        }
        Ok(())
    })
}
