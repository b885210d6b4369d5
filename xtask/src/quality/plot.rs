//! `curves.svg`: validation bits per byte against steps, one line per run of the study.

use std::path::Path;

use plotters::prelude::*;

use super::runs::{Measured, Run};

/// Line colours, one per run in order (cycled).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Draws every finished run's validation curve; long-context rows dashed.
pub fn draw_curves(path: &Path, runs: &[Run]) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    let finished: Vec<(&Run, &Measured)> = runs
        .iter()
        .filter_map(|r| r.result.as_ref().ok().map(|m| (r, m)))
        .filter(|(_, m)| !m.val.is_empty())
        .collect();
    let points = || finished.iter().flat_map(|(_, m)| m.val.iter());
    let last = points().map(|p| p.step).max().unwrap_or(1).max(1) as f64;
    let (lo, hi) = points()
        .map(|p| p.bpb)
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    let (lo, hi) = if lo.is_finite() {
        ((lo - 0.1).max(0.0), hi + 0.1)
    } else {
        (0.0, 8.0)
    };
    let root = SVGBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Attention variants: validation bits per byte (cargo xtask quality)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..last, lo..hi)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("validation bits per byte")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (run, m)) in finished.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let style = color.stroke_width(if run.long_context { 1 } else { 2 });
        let label = format!(
            "{} seq {} x {} seed {}",
            run.variant, run.seq_len, run.batch_size, run.seed
        );
        let line: Vec<(f64, f64)> = m.val.iter().map(|p| (p.step as f64, p.bpb)).collect();
        chart
            .draw_series(LineSeries::new(line.clone(), style))
            .map_err(|e| err(&e))?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
        chart
            .draw_series(line.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}
