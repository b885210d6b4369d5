//! `cargo xtask bench --profile WORKLOAD`: the per-op breakdown of one training step.
//!
//! `bench_workload --profile` runs the step under performer-tensor's op timer and prints its
//! rows (by phase and category, summed over the profiled repetitions), per-op times, the GEMM
//! FLOPs of all threads and the machine's GEMM rate measured in the same process; this module
//! turns them into a BENCHMARKS-style table with each row's share and rate, and the step's
//! distance from its GEMM floor: the model's matrix-product FLOPs
//! ([`workloads::lm_matmul_flops`], three per forward product) at that measured rate.

use serde::Deserialize;

use super::workloads::{self, Kind, Workload};

/// The `"profile"` object of a workload process's JSON line.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Profile {
    /// Profiled repetitions the rows are summed over.
    pub reps: u32,
    /// Wall time of each profiled repetition, ms.
    pub step_ms: Vec<f64>,
    /// (phase, category) rows.
    pub rows: Vec<ProfileRow>,
    /// Per op name and phase.
    pub ops: Vec<OpRow>,
    /// FLOPs of every GEMM on every thread, over all repetitions.
    pub gemm_flops_all_threads: f64,
    /// The matmul-4k product's rate in the same process, GFLOP/s.
    pub gemm_gflops: f64,
}

/// One (phase, category) row.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ProfileRow {
    /// `forward`, `backward` or `optimizer`.
    pub phase: String,
    /// Category label.
    pub category: String,
    /// Nanoseconds.
    pub ns: f64,
    /// Ops or calls.
    pub calls: f64,
    /// Input + output bytes of the ops.
    pub bytes: f64,
    /// GEMM FLOPs timed in this row.
    pub flops: f64,
}

/// One op name's own time in one phase.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct OpRow {
    /// Phase.
    pub phase: String,
    /// Op name in the graph.
    pub name: String,
    /// Nanoseconds.
    pub ns: f64,
    /// Calls.
    pub calls: f64,
}

/// Extracts the profile from a workload process's stdout (its last JSON line).
pub fn parse(stdout: &str) -> Result<Profile, String> {
    #[derive(Deserialize)]
    struct Line {
        profile: Profile,
    }
    stdout
        .lines()
        .rev()
        .map(str::trim)
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str::<Line>(l).ok())
        .map(|l| l.profile)
        .ok_or_else(|| "no JSON line with a \"profile\" object on stdout".to_string())
}

const PHASES: [&str; 3] = ["forward", "backward", "optimizer"];

/// The Markdown table and the floor paragraph for `w`, whose unprofiled median is `median_ms`.
pub fn format(w: &Workload, median_ms: f64, p: &Profile) -> String {
    let reps = f64::from(p.reps.max(1));
    let mut categories: Vec<&str> = Vec::new();
    for r in &p.rows {
        if !categories.contains(&r.category.as_str()) {
            categories.push(&r.category);
        }
    }
    let ms = |cat: &str, phase: &str| -> f64 {
        p.rows
            .iter()
            .filter(|r| r.category == cat && r.phase == phase)
            .map(|r| r.ns)
            .sum::<f64>()
            / reps
            / 1e6
    };
    let sum = |cat: &str, f: fn(&ProfileRow) -> f64| -> f64 {
        p.rows
            .iter()
            .filter(|r| r.category == cat)
            .map(f)
            .sum::<f64>()
            / reps
    };
    let total: f64 = p.rows.iter().map(|r| r.ns).sum::<f64>() / reps / 1e6;
    let params = match w.kind {
        Kind::LmTrain { shape, .. } => Some(workloads::lm_parameters(&shape)),
        _ => None,
    };
    // Rows by total time, largest first.
    categories.sort_by(|a, b| {
        let t = |c: &str| PHASES.iter().map(|ph| ms(c, ph)).sum::<f64>();
        t(b).total_cmp(&t(a))
    });

    let mut out = format!(
        "{}: one training step under the op timer (mean of {} profiled steps: {:.1} ms; \
         unprofiled median {:.1} ms)\n\n",
        w.name, p.reps, total, median_ms
    );
    out.push_str("| op | forward ms | backward ms | optimizer ms | share | rate |\n");
    out.push_str("|---|---:|---:|---:|---:|---|\n");
    for cat in &categories {
        let [f, b, o] = PHASES.map(|ph| ms(cat, ph));
        let t = f + b + o;
        let rate = match *cat {
            "GEMM" => format!("{:.0} GFLOP/s", sum(cat, |r| r.flops) / (t * 1e6)),
            "optimizer" => params.map_or(String::new(), |n| {
                // Adam reads parameter, gradient and both moments and writes three of them.
                format!("{:.1} GB/s (7 x 4 B/param)", 28.0 * n as f64 / (t * 1e6))
            }),
            "allocator" => format!("{:.0} calls", sum(cat, |r| r.calls)),
            "autograd bookkeeping" | "other" => String::new(),
            _ => {
                let bytes = sum(cat, |r| r.bytes);
                if bytes > 0.0 {
                    format!("{:.1} GB/s", bytes / (t * 1e6))
                } else {
                    String::new()
                }
            }
        };
        out.push_str(&format!(
            "| {cat} | {} | {} | {} | {:.1}% | {rate} |\n",
            cell(f),
            cell(b),
            cell(o),
            100.0 * t / total
        ));
    }
    let [f, b, o] = PHASES.map(|ph| categories.iter().map(|c| ms(c, ph)).sum::<f64>());
    out.push_str(&format!(
        "| **step** | **{f:.1}** | **{b:.1}** | **{o:.1}** | 100% | {:.0} GFLOP/s counted |\n",
        w.flops() / (total * 1e6)
    ));

    if let Kind::LmTrain { shape, n, batch } = w.kind {
        let products = 3.0 * batch as f64 * workloads::lm_matmul_flops(&shape, n);
        let floor_ms = products / (p.gemm_gflops * 1e6);
        let timed: f64 = sum("GEMM", |r| r.flops);
        out.push_str(&format!(
            "\nGEMM floor: the model's matrix products, 3 x {:.3} GFLOP = {:.3} GFLOP, at {:.0} \
             GFLOP/s (matmul-4k measured in the same process) = **{floor_ms:.1} ms**; the step \
             (unprofiled median) is **{:.2}x** its floor. GEMM FLOPs the implementation ran: \
             {:.3} G timed in the GEMM row, {:.3} G on all threads (fused kernels' products and \
             recomputation included).\n",
            products / 3e9,
            products / 1e9,
            p.gemm_gflops,
            median_ms / floor_ms,
            timed / 1e9,
            p.gemm_flops_all_threads / reps / 1e9,
        ));
    }

    let mut ops: Vec<&OpRow> = p.ops.iter().collect();
    ops.sort_by(|a, b| b.ns.total_cmp(&a.ns));
    out.push_str("\nLargest ops by own time (GEMM and allocator time excluded):\n\n");
    out.push_str("| op | phase | ms | calls |\n|---|---|---:|---:|\n");
    for o in ops.iter().take(12) {
        out.push_str(&format!(
            "| {} | {} | {:.2} | {:.0} |\n",
            o.name,
            o.phase,
            o.ns / reps / 1e6,
            o.calls / reps
        ));
    }
    out
}

fn cell(ms: f64) -> String {
    if ms == 0.0 {
        "-".into()
    } else {
        format!("{ms:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(phase: &str, category: &str, ms: f64, flops: f64) -> ProfileRow {
        ProfileRow {
            phase: phase.into(),
            category: category.into(),
            ns: ms * 1e6,
            calls: 1.0,
            bytes: 0.0,
            flops,
        }
    }

    #[test]
    fn shares_add_up_and_the_floor_uses_the_measured_rate() {
        let w = workloads::all()
            .into_iter()
            .find(|w| w.name == "lm-small-64")
            .unwrap();
        let p = Profile {
            reps: 2,
            step_ms: vec![100.0, 100.0],
            rows: vec![
                row("forward", "GEMM", 60.0, 6e9),
                row("backward", "GEMM", 100.0, 0.0),
                row("backward", "autograd bookkeeping", 40.0, 0.0),
            ],
            ops: vec![],
            gemm_flops_all_threads: 2e9,
            gemm_gflops: 100.0,
        };
        let text = format(&w, 100.0, &p);
        // 160 of 200 ms (per step: 80 of 100) are GEMM, 6 GFLOP / 2 reps in 80 ms.
        assert!(
            text.contains("| GEMM | 30.00 | 50.00 | - | 80.0% | 38 GFLOP/s |"),
            "{text}"
        );
        assert!(
            text.contains("| autograd bookkeeping | - | 20.00 | - | 20.0% |"),
            "{text}"
        );
        let Kind::LmTrain { shape, n, batch } = w.kind else {
            unreachable!()
        };
        let floor = 3.0 * batch as f64 * workloads::lm_matmul_flops(&shape, n) / 100e6;
        assert!(text.contains(&format!("**{floor:.1} ms**")), "{text}");
        assert!(
            text.contains(&format!("**{:.2}x**", 100.0 / floor)),
            "{text}"
        );
    }

    #[test]
    fn parse_finds_the_profile_on_the_last_json_line() {
        let out = "noise\n{\"median_ms\": 1, \"tokens\": 2, \"profile\": {\"reps\": 1, \
                   \"step_ms\": [1.0], \"rows\": [], \"ops\": [], \"gemm_flops_all_threads\": 0, \
                   \"gemm_gflops\": 5.0}}\n";
        assert_eq!(parse(out).unwrap().gemm_gflops, 5.0);
        assert!(parse("{\"median_ms\": 1, \"tokens\": 2}").is_err());
    }
}
