//! `cargo xtask bench`: the comparative benchmark suite of `BENCHMARKS.md`.
//!
//! Every workload runs in its own process (so its peak RSS is its own): ours through
//! `examples/bench_workload.rs` built in release, the reference (`--reference`) through
//! `tools/bench_reference.py` with `$PERFORMER_REF_PYTHON`. Each process builds its inputs, runs
//! one warm-up and `--reps` timed repetitions, and prints one JSON line; this command measures the
//! process's peak RSS from outside ([`child`]), computes the median, tokens/s and GFLOP/s from the
//! FLOP counts of [`workloads`], prints the table and writes
//!
//! * `target/bench/report.json`: the contract workloads, one object per (workload, impl);
//! * `target/bench/scaling.json` and `target/bench/scaling.svg`: the scaling sweep (FastAttention
//!   forward + backward, causal and non-causal, 1k..64k).
//!
//! A workload an implementation does not have yet (or that fails, or times out) shows as `n/a`
//! with the reason under the table; the run goes on. A bf16 workload's bars against the f32
//! model it is rounded from (equal sampled tokens, the logits' error) are checked in a process
//! of its own after the timed ones, and its line follows the table ([`against_f32`]).

mod against_f32;
pub(crate) mod child;
mod plot;
mod profile;
mod report;
mod workloads;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::Parser;

use report::{OURS, REFERENCE, Record};
use workloads::{Kind, Workload};

/// Name that selects the scaling sweep in `--only`.
const SCALING: &str = "scaling";

/// Command line of `cargo xtask bench`.
#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask bench",
    about = "Run the BENCHMARKS.md workloads, each in its own process, and report time, tokens/s, peak RSS and GFLOP/s",
    after_help = "Workloads: attn-noncausal-4k attn-causal-1k attn-causal-4k attn-causal-64k lm-causal-1k \
                  lm-noncausal-1k lm-full-1k lm-small-64 generate-512 matmul-4k, and `scaling` (the sweep)."
)]
struct Args {
    /// Timed repetitions per workload, after one warm-up; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    reps: u32,
    /// Run only these workloads (comma-separated; `scaling` selects the sweep).
    #[arg(long, value_delimiter = ',', value_name = "NAME[,NAME]")]
    only: Vec<String>,
    /// Also run performer-pytorch (`$PERFORMER_REF_PYTHON`) on the same workloads, with ratios.
    #[arg(long)]
    reference: bool,
    /// Threads for both implementations (rayon / torch.set_num_threads); default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Kill a workload process after this many seconds (it is reported as n/a).
    #[arg(long, default_value_t = 900, value_name = "SECS")]
    timeout: u64,
    /// Skip the scaling sweep (and scaling.svg).
    #[arg(long)]
    no_scaling: bool,
    /// Sequence lengths of the sweep.
    #[arg(long, value_delimiter = ',', value_name = "N[,N]")]
    scaling_lengths: Option<Vec<usize>>,
    /// Longest causal length the reference runs. Its causal attention materializes the
    /// n x m x d prefix sums (n1024: 2.7 GiB, n4096: 7-9 GiB peak RSS; BENCHMARKS.md: n16384
    /// 62.5 s, 10.2 GiB); 8192 would risk the OOM killer on a shared 24 GiB machine.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    ref_max_causal: usize,
    /// Longest non-causal length the reference runs.
    #[arg(long, default_value_t = 16384, value_name = "N")]
    ref_max_noncausal: usize,
    /// Output folder (default: target/bench).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Do not build examples/bench_workload first.
    #[arg(long)]
    no_build: bool,
    /// List the workloads with their FLOP counts and targets, and exit.
    #[arg(long)]
    list: bool,
    /// Instead of the suite: one training workload's per-op breakdown (forward, backward and
    /// optimizer; each row's share and rate; the step's distance from its GEMM floor), printed
    /// and written to OUT/profile-WORKLOAD.md.
    #[arg(long, value_name = "WORKLOAD")]
    profile: Option<String>,
}

/// Entry point: `args` are the arguments after `bench`.
pub fn run(args: &[String]) -> Result<(), String> {
    let args: Args = crate::cli::parse("bench", args)?;
    if args.list {
        print!("{}", list_workloads());
        return Ok(());
    }

    let (selected, sweep) = select(&args)?;
    let root = crate::workspace::root();
    let target_dir = target_dir(&root);
    let out_dir = args.out.clone().unwrap_or_else(|| target_dir.join("bench"));
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));

    let reference = if args.reference {
        let python = std::env::var_os("PERFORMER_REF_PYTHON").filter(|p| !p.is_empty()).ok_or_else(|| {
            "--reference needs PERFORMER_REF_PYTHON: the python of a performer-pytorch 1.1.4 environment \
             (reference/setup-venv.sh builds one)"
                .to_string()
        })?;
        let script = root.join("tools/bench_reference.py");
        if !script.is_file() {
            return Err(format!("{} is missing", script.display()));
        }
        Some(Runner::Reference {
            python: PathBuf::from(python),
            script,
        })
    } else {
        None
    };

    if !args.no_build {
        build_workload_binary(&root)?;
    }
    let exe = target_dir
        .join("release/examples")
        .join(format!("bench_workload{}", std::env::consts::EXE_SUFFIX));
    if !exe.is_file() {
        return Err(format!(
            "{} is missing (build it with cargo build --release --example bench_workload)",
            exe.display()
        ));
    }
    let ours = Runner::Ours { exe };
    if let Some(name) = &args.profile {
        return run_profile(name, &ours, &args, threads, &out_dir);
    }

    let ctx = Ctx {
        reps: args.reps,
        threads,
        timeout: Duration::from_secs(args.timeout),
        ref_max_causal: args.ref_max_causal,
        ref_max_noncausal: args.ref_max_noncausal,
    };
    eprintln!(
        "bench: {} workload(s){}, {} thread(s), 1 warm-up + {} timed reps each, cpu: {}",
        selected.len(),
        if sweep { " + scaling sweep" } else { "" },
        threads,
        args.reps,
        cpu_name()
    );
    let load_before = load_average();

    let mut records = Vec::new();
    for (i, w) in selected.iter().enumerate() {
        let tag = format!("[{}/{}]", i + 1, selected.len());
        records.push(ctx.measure(&tag, w, &ours));
        if let Some(r) = &reference {
            records.push(ctx.measure(&tag, w, r));
        }
    }

    // The bf16 workloads' bars against f32, each in a process after the timed ones.
    let mut checks = Vec::new();
    for w in &selected {
        if let Some(bar) = &w.target.against_f32 {
            eprint!("[check] {} against f32 ... ", w.name);
            let got = ctx.against_f32(w, &ours);
            let min_speedup = w.target.min_speedup_over.map(|(_, min)| min);
            let verdict = against_f32::verdict(&w.name, bar, min_speedup, &got);
            let speed = match verdict.speed_ok {
                Some(true) => ", speedup ok",
                Some(false) => ", speedup miss",
                None => "",
            };
            let agreement = if verdict.ok { "ok" } else { "miss" };
            eprintln!("tokens and logits {agreement}{speed}");
            checks.push(verdict.line);
            checks.extend(verdict.speed_line);
        }
    }

    let mut wrote = Vec::new();
    if !selected.is_empty() {
        let path = out_dir.join("report.json");
        report::write_json_atomic(&path, &records)?;
        wrote.push(path);
    }

    let mut scaling_records = Vec::new();
    if sweep {
        let lengths = args
            .scaling_lengths
            .clone()
            .unwrap_or_else(workloads::default_scaling_lengths);
        let mut series = Vec::new();
        for causal in [false, true] {
            let mut mine = Vec::new();
            let mut theirs = Vec::new();
            for &n in &lengths {
                let w = workloads::scaling_point(causal, n);
                let tag = format!("[scaling {}]", w.name);
                mine.push(ctx.measure(&tag, &w, &ours));
                if let Some(r) = &reference {
                    theirs.push(ctx.measure(&tag, &w, r));
                }
            }
            let mode = if causal { "causal" } else { "non-causal" };
            series.push(scaling_series(
                format!("{OURS} {mode}"),
                causal,
                false,
                &lengths,
                &mine,
            ));
            if reference.is_some() {
                series.push(scaling_series(
                    format!("{REFERENCE} {mode}"),
                    causal,
                    true,
                    &lengths,
                    &theirs,
                ));
            }
            scaling_records.extend(mine);
            scaling_records.extend(theirs);
        }
        let json = out_dir.join("scaling.json");
        report::write_json_atomic(&json, &scaling_records)?;
        let svg = out_dir.join("scaling.svg");
        let tmp = out_dir.join(format!(".scaling.svg.{}.tmp", std::process::id()));
        plot::draw_scaling(&tmp, &lengths, &series)?;
        std::fs::rename(&tmp, &svg).map_err(|e| format!("writing {}: {e}", svg.display()))?;
        wrote.extend([json, svg]);
    }

    println!();
    if !selected.is_empty() {
        print!("{}", format_table(&selected, &records, reference.is_some()));
    }
    for line in &checks {
        println!("{line}");
    }
    if sweep {
        let points: Vec<Workload> = scaling_records
            .iter()
            .filter(|r| r.implementation == OURS)
            .filter_map(|r| parse_scaling_name(&r.workload))
            .collect();
        println!("\nscaling sweep (FastAttention forward + backward):");
        print!(
            "{}",
            format_table(&points, &scaling_records, reference.is_some())
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if let (Some(before), Some(after)) = (load_before, load_average()) {
        println!(
            "\nload average (1 min): {before:.2} at the start, {after:.2} at the end, {cores} core(s)"
        );
        if before.max(after) > cores as f64 + 0.5 {
            println!(
                "warning: the machine was busy with other work; times (the reference's multi-threaded \
                 small ops most of all) are inflated: rerun on a quiet machine before quoting them"
            );
        }
    }
    println!();
    for p in &wrote {
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// `--profile NAME`: runs the workload's process with `--profile`, prints the table and
/// writes it to `out_dir/profile-NAME.md`.
fn run_profile(
    name: &str,
    ours: &Runner,
    args: &Args,
    threads: usize,
    out_dir: &Path,
) -> Result<(), String> {
    let w = workloads::all()
        .into_iter()
        .find(|w| w.name == name)
        .ok_or_else(|| format!("unknown workload {name:?} for --profile"))?;
    if !matches!(w.kind, Kind::LmTrain { .. }) {
        return Err(format!(
            "--profile breaks down training steps; {name} is not one (lm-* workloads are)"
        ));
    }
    let ctx = Ctx {
        reps: args.reps,
        threads,
        timeout: Duration::from_secs(args.timeout),
        ref_max_causal: args.ref_max_causal,
        ref_max_noncausal: args.ref_max_noncausal,
    };
    let mut cmd = ours.command(&w, &ctx);
    cmd.arg("--profile");
    let load_before = load_average();
    eprintln!(
        "bench --profile {name}: {threads} thread(s), 1 warm-up + {} timed + {} profiled reps, cpu: {}",
        args.reps,
        args.reps,
        cpu_name()
    );
    let done = child::run_process(cmd, ctx.timeout).map_err(|f| f.to_string())?;
    let line = child::parse_process_line(&done.stdout)
        .ok_or_else(|| "no JSON line on stdout".to_string())?;
    let median = report::median(&line.times_ms).unwrap_or(line.median_ms);
    let p = profile::parse(&done.stdout)?;
    let mut text = profile::format(&w, median, &p);
    if let (Some(before), Some(after)) = (load_before, load_average()) {
        text.push_str(&format!(
            "
load average (1 min): {before:.2} at the start, {after:.2} at the end, {} core(s)
",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ));
    }
    print!("{text}");
    let path = out_dir.join(format!("profile-{name}.md"));
    report::write_text_atomic(&path, &text)?;
    println!("\nwrote {}", path.display());
    Ok(())
}

/// Settings shared by every measurement.
struct Ctx {
    reps: u32,
    threads: usize,
    timeout: Duration,
    ref_max_causal: usize,
    ref_max_noncausal: usize,
}

/// How to start one implementation's workload process.
enum Runner {
    Ours { exe: PathBuf },
    Reference { python: PathBuf, script: PathBuf },
}

impl Runner {
    fn name(&self) -> &'static str {
        match self {
            Runner::Ours { .. } => OURS,
            Runner::Reference { .. } => REFERENCE,
        }
    }

    fn command(&self, w: &Workload, ctx: &Ctx) -> Command {
        let mut cmd = match self {
            Runner::Ours { exe } => {
                let mut c = Command::new(exe);
                c.env("RAYON_NUM_THREADS", ctx.threads.to_string());
                c
            }
            Runner::Reference { python, script } => {
                let mut c = Command::new(python);
                c.arg(script).args(["--threads", &ctx.threads.to_string()]);
                c
            }
        };
        cmd.args([
            "--workload",
            w.process_name,
            "--reps",
            &ctx.reps.to_string(),
        ]);
        if let Some(n) = w.n_arg {
            cmd.args(["--n", &n.to_string()]);
        }
        cmd
    }
}

impl Ctx {
    /// Why the reference does not run `w`, if it does not (lengths over the caps).
    fn reference_skip(&self, w: &Workload) -> Option<String> {
        match w.kind {
            Kind::Attention { causal: true, n } if n > self.ref_max_causal => Some(format!(
                "skipped: longer than --ref-max-causal {}",
                self.ref_max_causal
            )),
            Kind::Attention { causal: false, n } if n > self.ref_max_noncausal => Some(format!(
                "skipped: longer than --ref-max-noncausal {}",
                self.ref_max_noncausal
            )),
            _ => None,
        }
    }

    /// `bench_workload --against-f32` for `w` (ours), in a process of its own.
    fn against_f32(&self, w: &Workload, ours: &Runner) -> Result<against_f32::Agreement, String> {
        let mut cmd = ours.command(w, self);
        cmd.arg("--against-f32");
        let done = child::run_process(cmd, self.timeout).map_err(|f| f.to_string())?;
        against_f32::parse(&done.stdout)
            .ok_or_else(|| format!("no JSON line on stdout; stderr: {}", done.stderr.trim()))
    }

    /// Runs `w` on `runner` in its own process and turns the result into a report row.
    fn measure(&self, tag: &str, w: &Workload, runner: &Runner) -> Record {
        let implementation = runner.name();
        if let (Runner::Reference { .. }, Some(why)) = (runner, self.reference_skip(w)) {
            eprintln!("{tag} {} {implementation}: {why}", w.name);
            return Record::missing(&w.name, implementation, w.tokens(), why);
        }
        eprint!("{tag} {} {implementation} ... ", w.name);
        let record = match child::run(runner.command(w, self), self.timeout) {
            Ok(m) => {
                if m.line.tokens != w.tokens() {
                    eprint!(
                        "(process says {} tokens, the contract {}) ",
                        m.line.tokens,
                        w.tokens()
                    );
                }
                let median = report::median(&m.line.times_ms).unwrap_or(m.line.median_ms);
                let times: Vec<String> =
                    m.line.times_ms.iter().map(|t| format!("{t:.1}")).collect();
                eprint!("[{}] ", times.join(", "));
                Record::measured(
                    &w.name,
                    implementation,
                    median,
                    w.tokens(),
                    m.peak_rss_mib,
                    w.flops(),
                )
            }
            Err(failure) => {
                Record::missing(&w.name, implementation, w.tokens(), failure.to_string())
            }
        };
        match (&record.median_ms, &record.peak_rss_mib, &record.error) {
            (Some(ms), Some(mib), _) => eprintln!("median {ms:.1} ms, {mib:.0} MiB"),
            (_, _, Some(e)) => eprintln!("n/a ({e})"),
            _ => eprintln!(),
        }
        record
    }
}

/// The workloads `--only` selects, and whether the sweep runs.
fn select(args: &Args) -> Result<(Vec<Workload>, bool), String> {
    let all = workloads::all();
    if args.only.is_empty() {
        return Ok((all, !args.no_scaling));
    }
    let mut picked = Vec::new();
    let mut sweep = false;
    for name in args.only.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        if name == SCALING {
            sweep = true;
        } else if let Some(w) = all.iter().find(|w| w.name == name) {
            if !picked.contains(w) {
                picked.push(w.clone());
            }
        } else {
            let known: Vec<&str> = all
                .iter()
                .map(|w| w.name.as_str())
                .chain([SCALING])
                .collect();
            return Err(format!(
                "unknown workload {name:?}; known: {}",
                known.join(", ")
            ));
        }
    }
    Ok((picked, sweep && !args.no_scaling))
}

fn parse_scaling_name(name: &str) -> Option<Workload> {
    let (family, n) = name.split_once('@')?;
    Some(workloads::scaling_point(
        family == "attn-causal",
        n.parse().ok()?,
    ))
}

/// Cargo's target folder: `$CARGO_TARGET_DIR` or `target/` under the workspace root.
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
        Some(d) => std::env::current_dir()
            .map(|cwd| cwd.join(&d))
            .unwrap_or_else(|_| PathBuf::from(d)),
        None => root.join("target"),
    }
}

fn build_workload_binary(root: &Path) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("bench: cargo build --release -p performer --example bench_workload");
    let status = Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "--release",
            "-p",
            "performer",
            "--example",
            "bench_workload",
        ])
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("building bench_workload failed ({status})"))
    }
}

/// The 1-minute load average (Linux `/proc/loadavg`).
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn scaling_series(
    label: String,
    causal: bool,
    reference: bool,
    lengths: &[usize],
    records: &[Record],
) -> plot::Series {
    let mut points = Vec::new();
    let mut missing: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (&n, r) in lengths.iter().zip(records) {
        match (r.median_ms, r.peak_rss_mib) {
            (Some(ms), Some(mib)) => points.push(plot::Point {
                n,
                seconds: ms / 1e3,
                peak_mib: mib,
            }),
            _ => {
                let why = r.error.as_deref().unwrap_or("no data");
                // Group by reason: "skipped: ..." as it is, failures by their first words
                // ("timed out after ...", "failed", "not implemented yet").
                let short = if why.starts_with("skipped") {
                    why.to_string()
                } else {
                    why.split(':').next().unwrap_or(why).to_string()
                };
                missing.entry(short).or_default().push(n);
            }
        }
    }
    let mut label = label;
    for (why, ns) in missing {
        let ns: Vec<String> = ns.iter().map(|&n| human_length(n)).collect();
        label.push_str(&format!(" [{why}: n = {}]", ns.join(", ")));
    }
    plot::Series {
        label,
        causal,
        reference,
        points,
    }
}

fn human_length(n: usize) -> String {
    if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}k", n / 1024)
    } else {
        n.to_string()
    }
}

/// Renders the table: one row per (workload, impl); with the reference, ratio columns on our
/// rows (speedup = reference ms / our ms, memory ratio = reference MiB / our MiB: above 1 we
/// win); the BENCHMARKS.md target check on our rows; the reasons for `n/a` below.
fn format_table(workloads: &[Workload], records: &[Record], with_reference: bool) -> String {
    let find = |name: &str, imp: &str| {
        records
            .iter()
            .find(|r| r.workload == name && r.implementation == imp)
    };
    let num = |v: Option<f64>, prec: usize| v.map_or("n/a".to_string(), |v| format!("{v:.prec$}"));
    let mut header = vec![
        "workload",
        "impl",
        "median ms",
        "tokens/s",
        "peak RSS MiB",
        "GFLOP/s",
    ];
    if with_reference {
        header.extend(["speedup", "mem ratio"]);
    }
    header.push("target");
    let mut rows: Vec<Vec<String>> = Vec::new();
    // (impl, reason) -> workloads, in order of first appearance.
    let mut notes: Vec<((&str, String), Vec<String>)> = Vec::new();
    for w in workloads {
        for imp in [OURS, REFERENCE] {
            let Some(r) = find(&w.name, imp) else {
                continue;
            };
            let mut row = vec![
                w.name.clone(),
                imp.to_string(),
                num(r.median_ms, 1),
                num(r.tokens_per_s, 0),
                num(r.peak_rss_mib, 0),
                num(r.gflops, 1),
            ];
            if with_reference {
                let theirs = find(&w.name, REFERENCE);
                let ratio = |f: fn(&Record) -> Option<f64>| match (imp, theirs.and_then(f), f(r)) {
                    (OURS, Some(t), Some(o)) if o > 0.0 => format!("{:.2}x", t / o),
                    (OURS, _, _) => "n/a".into(),
                    _ => String::new(),
                };
                row.push(ratio(|r| r.median_ms));
                row.push(ratio(|r| r.peak_rss_mib));
            }
            row.push(if imp == OURS {
                let baseline = w
                    .target
                    .min_speedup_over
                    .and_then(|(name, _)| find(name, OURS))
                    .and_then(|b| b.median_ms);
                target_check(w, r, baseline)
            } else {
                String::new()
            });
            if let Some(e) = &r.error {
                match notes
                    .iter_mut()
                    .find(|(key, _)| key.0 == imp && key.1 == *e)
                {
                    Some((_, names)) => names.push(w.name.clone()),
                    None => notes.push(((imp, e.clone()), vec![w.name.clone()])),
                }
            }
            rows.push(row);
        }
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            rows.iter()
                .map(|r| r[c].len())
                .chain([header[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (c, cell) in cells.iter().enumerate() {
            // Text columns left-aligned, numbers right-aligned.
            if c < 2 || c == cells.len() - 1 {
                s.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            } else {
                s.push_str(&format!("{cell:>w$}  ", w = widths[c]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    out.push_str(&line(widths.iter().map(|&w| "-".repeat(w)).collect()));
    for row in rows {
        out.push_str(&line(row));
    }
    if !notes.is_empty() {
        out.push_str("n/a:\n");
        for ((imp, e), names) in notes {
            out.push_str(&format!("  {} {imp}: {e}\n", names.join(", ")));
        }
    }
    out
}

/// `ok`, `miss: ...` against the BENCHMARKS.md target, or `-` where there is none.
/// `baseline_ms` is the same run's median of the workload a relative target names.
fn target_check(w: &Workload, r: &Record, baseline_ms: Option<f64>) -> String {
    let t = w.target;
    if t.max_ms.is_none()
        && t.min_tokens_per_s.is_none()
        && t.max_rss_mib.is_none()
        && t.min_speedup_over.is_none()
    {
        return "-".into();
    }
    if r.median_ms.is_none() {
        return "n/a".into();
    }
    let mut misses = Vec::new();
    if let (Some(max), Some(ms)) = (t.max_ms, r.median_ms)
        && ms > max
    {
        misses.push(format!("ms > {max}"));
    }
    if let (Some(min), Some(tps)) = (t.min_tokens_per_s, r.tokens_per_s)
        && tps < min
    {
        misses.push(format!("tok/s < {min}"));
    }
    if let (Some(max), Some(mib)) = (t.max_rss_mib, r.peak_rss_mib)
        && mib > max
    {
        misses.push(format!("MiB > {max}"));
    }
    if let (Some((name, min)), Some(ms)) = (t.min_speedup_over, r.median_ms) {
        match baseline_ms {
            Some(base) if base / ms < min => {
                misses.push(format!("{:.2}x < {min}x {name}", base / ms));
            }
            Some(_) => {}
            None => misses.push(format!("no {name} in this run to compare with")),
        }
    }
    if misses.is_empty() {
        "ok".into()
    } else {
        format!("miss: {}", misses.join(", "))
    }
}

fn list_workloads() -> String {
    let mut s = String::from("workload            GFLOP  tokens  target\n");
    for w in workloads::all() {
        let t = w.target;
        let mut target = Vec::new();
        if let Some(v) = t.max_ms {
            target.push(format!("<= {v} ms"));
        }
        if let Some(v) = t.min_tokens_per_s {
            target.push(format!(">= {v} tok/s"));
        }
        if let Some(v) = t.max_rss_mib {
            target.push(format!("<= {v} MiB"));
        }
        if let Some((name, v)) = t.min_speedup_over {
            target.push(format!(">= {v}x {name} (same run)"));
        }
        if let Some(a) = t.against_f32 {
            target.push(format!(
                "against f32: >= {} equal tokens, logits within {:.0e}",
                a.min_equal_tokens, a.max_logits_rel_err
            ));
        }
        s.push_str(&format!(
            "{:<18} {:>6.1} {:>7}  {}\n",
            w.name,
            w.flops() / 1e9,
            w.tokens(),
            target.join(", ")
        ));
    }
    s.push_str(&format!(
        "{SCALING:<18} attn-causal / attn-noncausal at n = {}\n",
        workloads::default_scaling_lengths()
            .iter()
            .map(|&n| human_length(n))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("bench").chain(extra.iter().copied())).unwrap()
    }

    #[test]
    fn only_selects_workloads_and_the_sweep() {
        let (w, sweep) = select(&args(&[])).unwrap();
        assert_eq!(w.len(), workloads::all().len());
        assert!(sweep);
        let (w, sweep) = select(&args(&["--only", "attn-causal-1k,matmul-4k"])).unwrap();
        assert_eq!(
            w.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(),
            ["attn-causal-1k", "matmul-4k"]
        );
        assert!(!sweep);
        let (w, sweep) = select(&args(&["--only", "scaling"])).unwrap();
        assert!(w.is_empty() && sweep);
        assert!(
            select(&args(&["--only", "nope"]))
                .unwrap_err()
                .contains("unknown workload")
        );
        assert!(Args::try_parse_from(["bench", "--reps", "0"]).is_err());
    }

    #[test]
    fn reference_caps_skip_long_attention() {
        let ctx = Ctx {
            reps: 3,
            threads: 2,
            timeout: Duration::from_secs(1),
            ref_max_causal: 8192,
            ref_max_noncausal: 16384,
        };
        assert!(
            ctx.reference_skip(&workloads::scaling_point(true, 8192))
                .is_none()
        );
        assert!(
            ctx.reference_skip(&workloads::scaling_point(true, 16384))
                .unwrap()
                .contains("--ref-max-causal")
        );
        assert!(
            ctx.reference_skip(&workloads::scaling_point(false, 16384))
                .is_none()
        );
        let all = workloads::all();
        let big = all.iter().find(|w| w.name == "attn-causal-64k").unwrap();
        assert!(ctx.reference_skip(big).is_some());
    }

    #[test]
    fn table_has_ratios_targets_and_reasons() {
        let all = workloads::all();
        let w: Vec<Workload> = all
            .into_iter()
            .filter(|w| w.name == "attn-causal-1k" || w.name == "lm-full-1k")
            .collect();
        let records = vec![
            Record::measured("attn-causal-1k", OURS, 20.0, 1024, 100.0, 4.3e9),
            Record::measured("attn-causal-1k", REFERENCE, 640.0, 1024, 2000.0, 4.3e9),
            Record::missing("lm-full-1k", OURS, 1024, "not implemented yet: lm-full-1k"),
            Record::measured("lm-full-1k", REFERENCE, 1159.0, 1024, 1557.0, 30e9),
        ];
        let table = format_table(&w, &records, true);
        assert!(
            table.contains("speedup") && table.contains("mem ratio"),
            "{table}"
        );
        assert!(
            table.contains("32.00x") && table.contains("20.00x"),
            "{table}"
        );
        let ours_full = table
            .lines()
            .find(|l| l.starts_with("lm-full-1k") && l.contains(OURS))
            .unwrap();
        assert!(ours_full.contains("n/a"), "{table}");
        assert!(
            table.contains("lm-full-1k performer-rs: not implemented yet"),
            "{table}"
        );
        let ours_attn = table
            .lines()
            .find(|l| l.starts_with("attn-causal-1k") && l.contains(OURS))
            .unwrap();
        assert!(ours_attn.ends_with("ok"), "{table}");
        let slow = Record::measured("attn-causal-1k", OURS, 40.0, 1024, 200.0, 4.3e9);
        assert_eq!(target_check(&w[0], &slow, None), "miss: ms > 30, MiB > 150");
    }

    #[test]
    fn relative_targets_compare_with_the_named_workload_of_the_same_run() {
        let all = workloads::all();
        let bf16 = all.iter().find(|w| w.name == "generate-512-bf16").unwrap();
        let f32_row = all.iter().find(|w| w.name == "generate-512").unwrap();
        let fast = Record::measured("generate-512-bf16", OURS, 20.0, 64, 100.0, 1e9);
        let slow = Record::measured("generate-512-bf16", OURS, 25.0, 64, 100.0, 1e9);
        assert_eq!(target_check(bf16, &fast, Some(36.0)), "ok");
        assert_eq!(
            target_check(bf16, &slow, Some(36.0)),
            "miss: 1.44x < 1.6x generate-512"
        );
        assert!(target_check(bf16, &fast, None).starts_with("miss: no generate-512"));
        // Through the table: the baseline is the same run's generate-512 row.
        let records = vec![
            Record::measured("generate-512", OURS, 36.0, 64, 100.0, 1e9),
            fast.clone(),
        ];
        let table = format_table(&[f32_row.clone(), bf16.clone()], &records, false);
        let line = table
            .lines()
            .find(|l| l.starts_with("generate-512-bf16"))
            .unwrap();
        assert!(line.ends_with("ok"), "{table}");
        let records = vec![
            Record::measured("generate-512", OURS, 30.0, 64, 100.0, 1e9),
            fast,
        ];
        let table = format_table(&[f32_row.clone(), bf16.clone()], &records, false);
        assert!(table.contains("1.50x < 1.6x generate-512"), "{table}");
    }

    #[test]
    fn scaling_labels_name_skipped_lengths() {
        let lengths = [1024, 2048, 16384];
        let recs = vec![
            Record::measured("attn-causal@1024", REFERENCE, 600.0, 1024, 2000.0, 1.0),
            Record::missing(
                "attn-causal@2048",
                REFERENCE,
                2048,
                "timed out after 5 s and was killed",
            ),
            Record::missing(
                "attn-causal@16384",
                REFERENCE,
                16384,
                "skipped: longer than --ref-max-causal 8192",
            ),
        ];
        let s = scaling_series(
            "performer-pytorch causal".into(),
            true,
            true,
            &lengths,
            &recs,
        );
        assert_eq!(s.points.len(), 1);
        assert!(
            s.label
                .contains("[skipped: longer than --ref-max-causal 8192: n = 16k]"),
            "{}",
            s.label
        );
        assert!(
            s.label
                .contains("[timed out after 5 s and was killed: n = 2k]"),
            "{}",
            s.label
        );
    }
}
