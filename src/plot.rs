//! Line plots as PNG: several named series on axes in their own units (tokens, log scales),
//! one or more panels per figure. The probes, benchmarks and training runs draw with it; every
//! figure is written to a temporary file and renamed into place.

use anyhow::{anyhow, Result};
use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

pub(crate) fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("plot: {e}")
}

/// Draws with `draw` on a `w` × `h` canvas, then renames the file to `path`.
pub(crate) fn render(
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

    /// "8k" for 8192 on the token scales, "10k" for 10,000 and "1.2M" for 1,200,000 on the
    /// decimal ones.
    pub(crate) fn label(self, v: f64) -> String {
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
        // The largest unit in which the value has at most one decimal: 1.2M, 250k, 1.5k.
        for (u, suffix) in [(unit * unit, "M"), (unit, "k")] {
            if v.abs() >= u && (v * 10.0) % u == 0.0 {
                return format!("{}{suffix}", v / u);
            }
        }
        if v.fract() == 0.0 {
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

/// How a series is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// Bold with a dot at each point: measurements at a few chosen settings.
    Points,
    /// Thin, no dots: a dense, noisy trace such as a loss per update.
    Trace,
}

/// One named line.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub style: Style,
}

impl Series {
    pub fn points(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.into(),
            points,
            style: Style::Points,
        }
    }

    pub fn trace(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.into(),
            points,
            style: Style::Trace,
        }
    }
}

/// One chart, `spec` drawn with `series`, as a 900 × 520 PNG.
pub fn lines(spec: &Lines, series: &[Series], path: &Path) -> Result<()> {
    panels(&[(spec, series)], path)
}

/// Charts stacked top to bottom in one PNG, 900 wide and 420 high each (520 for a lone
/// chart).
pub fn panels(charts: &[(&Lines, &[Series])], path: &Path) -> Result<()> {
    let height = match charts.len() {
        1 => 520,
        n => 420 * n as u32,
    };
    // Checked before anything is drawn, so a bad chart leaves no file behind.
    let prepared = charts
        .iter()
        .map(|(spec, series)| prepare(spec, series))
        .collect::<Result<Vec<_>>>()?;
    render(path, (900, height), |root| {
        for (area, (spec, chart)) in root
            .split_evenly((charts.len(), 1))
            .iter()
            .zip(charts.iter().map(|c| c.0).zip(&prepared))
        {
            draw(area, spec, chart)?;
        }
        Ok(())
    })
}

/// A chart's series in axis units (points an axis cannot show left out) and its bounds.
struct Prepared {
    series: Vec<Series>,
    x: (f64, f64),
    y: (f64, f64),
}

fn prepare(spec: &Lines, series: &[Series]) -> Result<Prepared> {
    let (xs, ys) = (spec.x_scale, spec.y_scale);
    let series: Vec<Series> = series
        .iter()
        .map(|s| {
            let points = s
                .points
                .iter()
                .map(|&(x, y)| (xs.axis_pos(x), ys.axis_pos(y)))
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .collect();
            Series {
                name: s.name.clone(),
                points,
                style: s.style,
            }
        })
        .collect();
    let bounds = |f: fn(&(f64, f64)) -> f64| {
        let all = series.iter().flat_map(|s| s.points.iter().map(f));
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
    let y = match spec.y_range {
        Some((a, b)) => (ys.axis_pos(a), ys.axis_pos(b)),
        None => {
            let pad = ((y1 - y0) * 0.05).max(1e-3);
            (y0 - pad, y1 + pad)
        }
    };
    Ok(Prepared {
        series,
        x: (x0, x1),
        y,
    })
}

fn draw(area: &DrawingArea<BitMapBackend, Shift>, spec: &Lines, data: &Prepared) -> Result<()> {
    let (xs, ys) = (spec.x_scale, spec.y_scale);
    let ((x0, x1), (y0, y1)) = (data.x, data.y);
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
    let mut chart = ChartBuilder::on(area)
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
    for (i, s) in data.series.iter().enumerate() {
        let color = palette[i % palette.len()];
        let width = match s.style {
            Style::Points => 2,
            Style::Trace => 1,
        };
        chart
            .draw_series(LineSeries::new(s.points.clone(), color.stroke_width(width)))
            .map_err(err)?
            .label(&s.name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(width))
            });
        if s.style == Style::Points {
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
        }
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
        let text =
            EmptyElement::at((x, y0)) + Text::new(label.to_string(), (6, -22), ("sans-serif", 14));
        chart.draw_series([text]).map_err(err)?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(err)?;
    Ok(())
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
        assert_eq!(
            labelled(Scale::Linear, 0.0, 2e6),
            ["0", "500k", "1M", "1.5M", "2M"]
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
        lines(&spec, &[Series::points("a", pts)], &png).unwrap();
        assert!(std::fs::metadata(&png).unwrap().len() > 1000);
        let none = lines(&spec, &[Series::points("a", vec![(1.0, 0.0)])], &png);
        assert!(none.unwrap_err().to_string().contains("no finite points"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
