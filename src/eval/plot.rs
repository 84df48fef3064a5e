//! PNG figures of the probes: accuracy heatmaps (length × depth, one panel per model) and line
//! plots (several models on one chart). Written to a temporary file and renamed into place.

use crate::eval::long_context::Cell;
use anyhow::{anyhow, Result};
use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
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

/// How an axis of a line plot maps values and where it puts its labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    /// Linear, labels every 1, 2 or 5 × 10^k.
    Linear,
    /// Linear for token positions: labels every power of two (0, 4k, 8k, …).
    Tokens,
    /// Logarithmic for lengths and counts: labels at powers of two (512, 1k, 2k, …).
    Log2,
    /// Logarithmic for perplexities and speeds: labels at powers of ten.
    Log10,
}

impl Scale {
    /// The position on the drawn axis, which is always linear: logarithmic scales are drawn
    /// in log units so one code path serves all four (and plotters' own log axis labels its
    /// key points as crowded raw floats).
    fn axis_pos(self, v: f64) -> f64 {
        match self {
            Scale::Linear | Scale::Tokens => v,
            Scale::Log2 => v.log2(),
            Scale::Log10 => v.log10(),
        }
    }

    fn value_at(self, a: f64) -> f64 {
        match self {
            Scale::Linear | Scale::Tokens => a,
            Scale::Log2 => a.exp2(),
            Scale::Log10 => 10f64.powf(a),
        }
    }

    /// Labelled values and fainter grid values between them, within `lo..=hi` (data units).
    fn ticks(self, lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>) {
        if !(hi - lo).is_finite() || hi <= lo {
            return (vec![], vec![]);
        }
        let inside = |v: &f64| *v >= lo - 1e-9 * lo.abs() && *v <= hi + 1e-9 * hi.abs();
        let multiples = |step: f64| -> Vec<f64> {
            let first = (lo / step).ceil() as i64;
            let last = (hi / step).floor() as i64;
            (first..=last).map(|i| i as f64 * step).collect()
        };
        let wanted = (hi - lo) / 8.0;
        match self {
            Scale::Linear => {
                let mag = 10f64.powf(wanted.log10().floor());
                let step = [1.0, 2.0, 5.0, 10.0]
                    .iter()
                    .map(|m| m * mag)
                    .find(|s| *s >= wanted)
                    .unwrap_or(10.0 * mag);
                (multiples(step), vec![])
            }
            Scale::Tokens => (multiples(wanted.log2().ceil().exp2().max(1.0)), vec![]),
            Scale::Log2 => {
                let powers: Vec<f64> = (lo.log2().ceil() as i32..=hi.log2().floor() as i32)
                    .map(|k| 2f64.powi(k))
                    .collect();
                // Every other power (keeping the largest) once there are too many to read.
                let every = powers.len().div_ceil(10).max(1);
                let last = powers.len().saturating_sub(1);
                let (mut bold, mut light) = (Vec::new(), Vec::new());
                for (i, p) in powers.into_iter().enumerate() {
                    if (last - i).is_multiple_of(every) {
                        bold.push(p)
                    } else {
                        light.push(p)
                    }
                }
                (bold, light)
            }
            Scale::Log10 => {
                let decades = lo.log10().floor() as i32..=hi.log10().ceil() as i32;
                let at = |ms: &[f64]| -> Vec<f64> {
                    decades
                        .clone()
                        .flat_map(|k| ms.iter().map(move |m| m * 10f64.powi(k)))
                        .filter(inside)
                        .collect()
                };
                let bold = at(&[1.0]);
                if bold.len() >= 3 {
                    (bold, at(&[2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]))
                } else {
                    (at(&[1.0, 2.0, 5.0]), at(&[3.0, 4.0, 6.0, 7.0, 8.0, 9.0]))
                }
            }
        }
    }

    /// "8k" for 8192 on the token scales, "10k" for 10,000 on the decimal ones.
    fn label(self, v: f64) -> String {
        // Log units come back with rounding noise: 10^3 as 999.9999999999999.
        let v = if (v - v.round()).abs() < 1e-6 * v.abs().max(1.0) {
            v.round()
        } else {
            v
        };
        let unit = match self {
            Scale::Tokens | Scale::Log2 => 1024.0,
            Scale::Linear | Scale::Log10 => 1000.0,
        };
        if v.abs() >= unit && v % unit == 0.0 {
            format!("{}k", v / unit)
        } else if v.fract() == 0.0 {
            format!("{v:.0}")
        } else {
            format!("{}", (v * 1e3).round() / 1e3)
        }
    }
}

/// A drawn (linear) axis in `scale`'s units, with its ticks and labels: plotters' own key
/// points combinator cannot take a label formatter for f64 ranges.
struct Axis {
    scale: Scale,
    range: RangedCoordf64,
    bold: Vec<f64>,
    light: Vec<f64>,
}

impl Ranged for Axis {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.range.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            self.light.clone()
        } else {
            self.bold.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.range.range()
    }
}

impl ValueFormatter<f64> for Axis {
    fn format_ext(&self, value: &f64) -> String {
        self.scale.label(self.scale.value_at(*value))
    }
}

/// Line plot of several named series, with an optional dashed vertical marker (the teacher's
/// trained context, say) labelled at its foot. Points that a log axis cannot show (≤ 0) and
/// non-finite ones are left out.
pub struct Lines<'a> {
    pub title: &'a str,
    pub x_desc: &'a str,
    pub y_desc: &'a str,
    pub x_scale: Scale,
    pub y_scale: Scale,
    pub marker: Option<(f64, &'a str)>,
    /// Fixed y range instead of the data's.
    pub y_range: Option<(f64, f64)>,
}

pub fn lines(spec: &Lines, series: &[(String, Vec<(f64, f64)>)], path: &Path) -> Result<()> {
    let (xs, ys) = (spec.x_scale, spec.y_scale);
    let series: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(name, pts)| {
            let pts = pts
                .iter()
                .map(|&(x, y)| (xs.axis_pos(x), ys.axis_pos(y)))
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .collect();
            (name.as_str(), pts)
        })
        .collect();
    let bounds = |f: fn(&(f64, f64)) -> f64| {
        let all = series.iter().flat_map(|(_, s)| s.iter().map(f));
        all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        })
    };
    let (x0, x1) = bounds(|p| p.0);
    let (y0, y1) = bounds(|p| p.1);
    if !x0.is_finite() || !y0.is_finite() {
        return Err(anyhow!("plot {}: no finite points", spec.title));
    }
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    let (y0, y1) = match spec.y_range {
        Some((a, b)) => (ys.axis_pos(a), ys.axis_pos(b)),
        None => {
            let pad = ((y1 - y0) * 0.05).max(1e-3);
            (y0 - pad, y1 + pad)
        }
    };
    let axis = |scale: Scale, lo: f64, hi: f64| {
        let (bold, light) = scale.ticks(scale.value_at(lo), scale.value_at(hi));
        let back = |v: Vec<f64>| v.into_iter().map(|t| scale.axis_pos(t)).collect();
        Axis {
            scale,
            range: (lo..hi).into(),
            bold: back(bold),
            light: back(light),
        }
    };
    let palette = [&BLUE, &RED, &GREEN, &MAGENTA, &CYAN, &BLACK];
    render(path, (900, 520), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(spec.title, ("sans-serif", 20))
            .margin(14)
            .x_label_area_size(45)
            .y_label_area_size(65)
            .build_cartesian_2d(axis(xs, x0, x1), axis(ys, y0, y1))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(spec.x_desc)
            .y_desc(spec.y_desc)
            .bold_line_style(BLACK.mix(0.2))
            .light_line_style(BLACK.mix(0.06))
            .draw()
            .map_err(err)?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = palette[i % palette.len()];
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(err)?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
        }
        if let Some((x, label)) = spec.marker {
            let x = xs.axis_pos(x);
            let dashes = (0..40).map(|i| {
                let at = |f: f64| (x, y0 + (y1 - y0) * f);
                PathElement::new(
                    vec![at(i as f64 / 40.0), at((i as f64 + 0.5) / 40.0)],
                    BLACK.mix(0.6),
                )
            });
            chart.draw_series(dashes).map_err(err)?;
            // At the foot, just right of the line: the curves rarely pass there.
            let text = EmptyElement::at((x, y0))
                + Text::new(label.to_string(), (6, -22), ("sans-serif", 14));
            chart.draw_series([text]).map_err(err)?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.85))
            .draw()
            .map_err(err)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labelled(scale: Scale, lo: f64, hi: f64) -> Vec<String> {
        scale
            .ticks(lo, hi)
            .0
            .into_iter()
            .map(|v| scale.label(v))
            .collect()
    }

    #[test]
    fn axes_are_labelled_at_round_compact_values() {
        assert_eq!(
            labelled(Scale::Tokens, 512.0, 32256.0),
            ["4k", "8k", "12k", "16k", "20k", "24k", "28k"]
        );
        assert_eq!(
            labelled(Scale::Log2, 4.0, 128.0),
            ["4", "8", "16", "32", "64", "128"]
        );
        assert_eq!(
            labelled(Scale::Log2, 512.0, 32768.0),
            ["512", "1k", "2k", "4k", "8k", "16k", "32k"]
        );
        assert_eq!(
            labelled(Scale::Log10, 8.4, 30000.0),
            ["10", "100", "1k", "10k"]
        );
        // Under three decades, 2 and 5 are labelled too.
        assert_eq!(labelled(Scale::Log10, 3.0, 60.0), ["5", "10", "20", "50"]);
        assert_eq!(
            labelled(Scale::Linear, 0.0, 102.0),
            ["0", "20", "40", "60", "80", "100"]
        );
        assert_eq!(
            labelled(Scale::Linear, 0.0, 0.5),
            ["0", "0.1", "0.2", "0.3", "0.4", "0.5"]
        );
        // Labels survive the trip through log units.
        for k in 0..6 {
            let v = 10f64.powi(k);
            assert_eq!(
                Scale::Log10.label(Scale::Log10.value_at(Scale::Log10.axis_pos(v))),
                Scale::Log10.label(v)
            );
        }
    }

    #[test]
    fn a_line_plot_on_log_axes_is_written() {
        let dir = std::env::temp_dir().join(format!("supra-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let png = dir.join("lines.png");
        let spec = Lines {
            title: "t",
            x_desc: "x",
            y_desc: "y",
            x_scale: Scale::Log2,
            y_scale: Scale::Log10,
            marker: Some((8192.0, "trained")),
            y_range: None,
        };
        // The zero cannot be drawn on a log axis and is left out rather than failing.
        let pts = vec![
            (1024.0, 9.0),
            (8192.0, 20.0),
            (32768.0, 7000.0),
            (65536.0, 0.0),
        ];
        lines(&spec, &[("a".into(), pts)], &png).unwrap();
        assert!(std::fs::metadata(&png).unwrap().len() > 1000);
        let none = lines(&spec, &[("a".into(), vec![(1.0, 0.0)])], &png);
        assert!(none.unwrap_err().to_string().contains("no finite points"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
