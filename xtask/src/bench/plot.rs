//! `scaling.svg`: time and peak memory of FastAttention forward + backward against sequence
//! length, causal and non-causal, ours and the reference's (Fig. 3 of the Performer paper).

use std::path::Path;

use plotters::prelude::*;

/// One measured length.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    /// Sequence length.
    pub n: usize,
    /// Median forward + backward time, seconds.
    pub seconds: f64,
    /// Peak RSS of the process, MiB.
    pub peak_mib: f64,
}

/// One line on both panels.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Legend text (the caller says there which lengths were skipped or failed).
    pub label: String,
    /// Causal attention (red) or non-causal (blue).
    pub causal: bool,
    /// The reference (thin dashed line, triangles) or ours (thick line, dots).
    pub reference: bool,
    /// Measured points, any order.
    pub points: Vec<Point>,
}

fn bounds(values: impl Iterator<Item = f64>, fallback: (f64, f64)) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo.is_finite() {
        (lo / 1.5, hi * 1.5)
    } else {
        fallback
    }
}

/// The x axis is log2(n), labelled at whole powers of two (`1k`, `2k`, ..., `64k`).
fn length_label(log2n: &f64) -> String {
    if (log2n - log2n.round()).abs() > 1e-6 {
        return String::new();
    }
    let n = 1usize << log2n.round().clamp(0.0, 62.0) as u32;
    if n >= 1024 {
        format!("{}k", n / 1024)
    } else {
        n.to_string()
    }
}

/// Compact axis numbers: `0.01`, `0.5`, `2`, `300`, `10000`.
fn compact(v: &f64) -> String {
    let v = *v;
    if v >= 10.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Pixel size of the image; the legend strip sits under the two panels.
const SIZE: (u32, u32) = (1400, 720);
const LEGEND_HEIGHT: u32 = 110;

/// Draws the two panels into an SVG at `path`, with the legend (one line per series, saying
/// which lengths have no point and why) under them; `lengths` spans the x axis even where
/// nothing was measured.
pub fn draw_scaling(path: &Path, lengths: &[usize], series: &[Series]) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    let log2 = |n: usize| (n.max(1) as f64).log2();
    let (xlo, xhi) = match (lengths.iter().min(), lengths.iter().max()) {
        (Some(&lo), Some(&hi)) => (log2(lo) - 0.3, log2(hi) + 0.3),
        _ => (9.7, 16.3),
    };
    let all = || series.iter().flat_map(|s| s.points.iter());
    let time_range = bounds(all().map(|p| p.seconds), (1e-3, 100.0));
    let mem_range = bounds(all().map(|p| p.peak_mib), (10.0, 30000.0));
    let x_ticks = ((xhi - xlo).round() as usize + 1).clamp(2, 24);
    let style_of = |s: &Series| {
        let color = if s.causal { RED } else { BLUE };
        (color, color.stroke_width(if s.reference { 1 } else { 3 }))
    };

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(
            "FastAttention forward + backward of out.sum() (h8, d64, m256, batch 1, f32)",
            ("sans-serif", 22),
        )
        .map_err(|e| err(&e))?;
    let (panels, legend) = root.split_vertically(root.dim_in_pixel().1 - LEGEND_HEIGHT);
    let (left, right) = panels.split_horizontally(SIZE.0 / 2);

    for (area, title, y_desc, range, pick) in [
        (
            &left,
            "time",
            "seconds (median)",
            time_range,
            (|p: &Point| p.seconds) as fn(&Point) -> f64,
        ),
        (
            &right,
            "memory",
            "peak RSS of the process, MiB",
            mem_range,
            |p: &Point| p.peak_mib,
        ),
    ] {
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(xlo..xhi, (range.0..range.1).log_scale())
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("sequence length")
            .y_desc(y_desc)
            .x_labels(x_ticks)
            .x_label_formatter(&length_label)
            .y_label_formatter(&compact)
            .light_line_style(BLACK.mix(0.04))
            .draw()
            .map_err(|e| err(&e))?;
        if series.iter().all(|s| s.points.is_empty()) {
            area.draw(&Text::new(
                "no measurements",
                (250, 250),
                ("sans-serif", 20),
            ))
            .map_err(|e| err(&e))?;
        }
        for s in series {
            let (color, line_style) = style_of(s);
            let mut pts: Vec<(f64, f64)> = s.points.iter().map(|p| (log2(p.n), pick(p))).collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            if s.reference {
                chart
                    .draw_series(DashedLineSeries::new(pts.clone(), 6, 4, line_style))
                    .map_err(|e| err(&e))?;
                chart
                    .draw_series(
                        pts.iter()
                            .map(|&p| TriangleMarker::new(p, 6, color.filled())),
                    )
                    .map_err(|e| err(&e))?;
            } else {
                chart
                    .draw_series(LineSeries::new(pts.clone(), line_style))
                    .map_err(|e| err(&e))?;
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(|e| err(&e))?;
            }
        }
    }

    // The legend strip: a line sample and marker, then the label, one series per row.
    let row = 22;
    for (i, s) in series.iter().enumerate() {
        let (color, line_style) = style_of(s);
        let y = 12 + row * i as i32;
        let (x0, x1) = (40, 80);
        if s.reference {
            for x in (x0..x1).step_by(10) {
                legend
                    .draw(&PathElement::new(vec![(x, y), (x + 6, y)], line_style))
                    .map_err(|e| err(&e))?;
            }
            legend
                .draw(&TriangleMarker::new(((x0 + x1) / 2, y), 6, color.filled()))
                .map_err(|e| err(&e))?;
        } else {
            legend
                .draw(&PathElement::new(vec![(x0, y), (x1, y)], line_style))
                .map_err(|e| err(&e))?;
            legend
                .draw(&Circle::new(((x0 + x1) / 2, y), 4, color.filled()))
                .map_err(|e| err(&e))?;
        }
        legend
            .draw(&Text::new(
                s.label.clone(),
                (x1 + 12, y - 7),
                ("sans-serif", 14),
            ))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_both_panels_with_legend() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("scaling.svg");
        let pts = |scale: f64| {
            (10..=16)
                .map(|p| Point {
                    n: 1 << p,
                    seconds: scale * (1 << p) as f64 * 1e-5,
                    peak_mib: 50.0 + (1 << (p - 8)) as f64,
                })
                .collect::<Vec<_>>()
        };
        let series = vec![
            Series {
                label: "performer-rs causal".into(),
                causal: true,
                reference: false,
                points: pts(2.0),
            },
            Series {
                label: "performer-rs non-causal".into(),
                causal: false,
                reference: false,
                points: pts(1.0),
            },
            Series {
                label: "performer-pytorch causal (skipped n >= 16k)".into(),
                causal: true,
                reference: true,
                points: pts(40.0)[..4].to_vec(),
            },
            Series {
                label: "performer-pytorch non-causal".into(),
                causal: false,
                reference: true,
                points: vec![],
            },
        ];
        let lengths: Vec<usize> = (10..=16).map(|p| 1 << p).collect();
        draw_scaling(&path, &lengths, &series).unwrap();
        if let Some(keep) = std::env::var_os("XTASK_BENCH_KEEP_PLOT") {
            std::fs::copy(&path, keep).unwrap(); // to look at the drawing
        }
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        for text in [
            "time",
            "memory",
            "performer-pytorch causal (skipped n &gt;= 16k)",
            "64k",
            "sequence length",
        ] {
            assert!(svg.contains(text), "missing {text:?}");
        }
        draw_scaling(&path, &lengths, &[]).unwrap();
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("no measurements")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
