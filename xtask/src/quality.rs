//! `cargo xtask quality`: the attention-variant study. Trains the same byte-level PerformerLM
//! once per attention variant (`train_lm --attention NAME`), on the same batches from the same
//! seed, and reports validation bits per byte at fixed steps, the final score over the
//! validation split, tokens/s and peak memory.
//!
//! Each run is its own `train_lm` process (so its peak RSS is its own, measured from outside as
//! `cargo xtask bench` does), which writes a JSON summary (`--report`) read back here. The
//! long-context rows train the chosen variants at longer sequences with the same tokens per
//! step, and every run of the study is scored on the same validation bytes (`--eval-align`),
//! each model with the longest context it can use.
//!
//! Writes `target/quality/report.json` (every run) and `target/quality/curves.svg` (the
//! validation curves).

mod plot;
mod runs;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::bench::child;
use runs::{Measured, Run, ValPoint};

/// Command line of `cargo xtask quality`.
#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask quality",
    about = "Train the same PerformerLM once per attention variant on the same batches; report validation bits per byte, tokens/s and peak memory",
    after_help = "Variants: favor favor-shift relu relu-shift local hybrid hybrid-shift global (train_lm --attention). \
                  Arguments after `--` go to every train_lm run."
)]
struct Args {
    /// Text to train on (default: ../shared/data/tinyshakespeare.txt when present, else
    /// train_lm's default, this repository's .md and .rs files).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Optimizer steps of every run.
    #[arg(long, default_value_t = 600)]
    steps: u64,
    /// The variants of the main table (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "favor,favor-shift,relu,relu-shift,local,hybrid,hybrid-shift,global"
    )]
    variants: Vec<String>,
    /// Seeds: every run once per seed (weights, projections and batches).
    #[arg(long, value_delimiter = ',', default_value = "42")]
    seeds: Vec<u64>,
    /// Longer sequence lengths for the long-context rows (empty: none).
    #[arg(long, value_delimiter = ',', default_value = "1024,2048")]
    long_seq_lens: Vec<usize>,
    /// The variants of the long-context rows (default: global and train_lm's default).
    #[arg(long, value_delimiter = ',', default_value = "global,default")]
    long_variants: Vec<String>,
    /// Only the main table (no long-context rows).
    #[arg(long, conflicts_with = "only_long_context")]
    no_long_context: bool,
    /// Only the long-context rows (no main table).
    #[arg(long)]
    only_long_context: bool,
    /// Model width.
    #[arg(long, default_value_t = 256)]
    dim: usize,
    /// Layers.
    #[arg(long, default_value_t = 4)]
    depth: usize,
    /// Heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Width of each head.
    #[arg(long, default_value_t = 64)]
    dim_head: usize,
    /// Random features per FAVOR+ head.
    #[arg(long, default_value_t = 256)]
    nb_features: usize,
    /// Sequence length of the main table.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Sequences per step in the main table.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// Window of the local heads of the hybrid variants (the `local` variant attends over the
    /// whole sequence: exact causal attention).
    #[arg(long, default_value_t = 128)]
    window: usize,
    /// Validate (fixed windows) every this many steps.
    #[arg(long, default_value_t = 100)]
    validate_every: u64,
    /// Threads per run (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Output folder (default: target/quality).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Do not build examples/train_lm first.
    #[arg(long)]
    no_build: bool,
    /// Kill a run after this many seconds.
    #[arg(long, default_value_t = 4 * 3600, value_name = "SECS")]
    timeout: u64,
    /// Passed to every train_lm run.
    #[arg(last = true)]
    train_args: Vec<String>,
}

/// What `train_lm --report` writes (the fields this command reads).
#[derive(Clone, Debug, Deserialize, Serialize)]
struct TrainReport {
    parameters: usize,
    steps: u64,
    val: Vec<ValPoint>,
    val_all: Option<f64>,
    val_all_bytes: usize,
    tokens_per_second: f64,
    sample: String,
}

/// `report.json`.
#[derive(Serialize)]
struct Report<'a> {
    data: String,
    steps: u64,
    recipe: String,
    runs: &'a [Run],
}

/// The variant `train_lm` picks when `--attention` is not given.
const DEFAULT: &str = "default";

/// Entry point.
pub fn run(args: &[String]) -> Result<(), String> {
    let args: Args = crate::cli::parse("quality", args)?;
    if args.steps == 0 || args.batch_size == 0 || args.seq_len < 2 || args.seeds.is_empty() {
        return Err(
            "--steps, --batch-size and --seeds must be positive, --seq-len at least 2".into(),
        );
    }
    let root = crate::workspace::root();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/quality"));
    std::fs::create_dir_all(out.join("runs")).map_err(|e| format!("{}: {e}", out.display()))?;
    let data = args.data.clone().or_else(|| {
        let shakespeare = root.join("../shared/data/tinyshakespeare.txt");
        shakespeare.is_file().then_some(shakespeare)
    });
    let data_name = data
        .as_ref()
        .map_or("this repository's .md and .rs files".to_string(), |p| {
            p.display().to_string()
        });
    if !args.no_build {
        build_train_lm()?;
    }
    let exe = root.join("target/release/examples/train_lm");
    if !exe.is_file() {
        return Err(format!(
            "{} is missing (cargo build --release --example train_lm)",
            exe.display()
        ));
    }

    // Every run is scored on the same validation bytes: a multiple of every length it uses.
    let longest = args
        .long_seq_lens
        .iter()
        .copied()
        .chain([args.seq_len])
        .fold(1, lcm);
    let long_tokens = args
        .long_seq_lens
        .iter()
        .copied()
        .max()
        .map(|l| l.max(args.seq_len * args.batch_size));
    let long_tokens = long_tokens.filter(|_| !args.no_long_context);
    let main_variants: &[String] = if args.only_long_context {
        &[]
    } else {
        &args.variants
    };
    let mut plan = Vec::new();
    for &seed in &args.seeds {
        for v in main_variants {
            plan.push((v.clone(), false, args.seq_len, args.batch_size, seed));
        }
        if let Some(tokens) = long_tokens {
            for v in &args.long_variants {
                for len in std::iter::once(args.seq_len).chain(args.long_seq_lens.iter().copied()) {
                    if tokens % len != 0 {
                        return Err(format!(
                            "--long-seq-lens: {len} does not divide the long rows' {tokens} tokens per step"
                        ));
                    }
                    plan.push((v.clone(), true, len, tokens / len, seed));
                }
            }
        }
    }
    let recipe = format!(
        "dim {}, depth {}, heads {}, dim_head {}, nb_features {}, lr {} (train_lm's schedule), {} steps; main table: seq {} x batch {}; long-context rows: {} tokens per step; hybrid window {}",
        args.dim,
        args.depth,
        args.heads,
        args.dim_head,
        args.nb_features,
        args.lr,
        args.steps,
        args.seq_len,
        args.batch_size,
        long_tokens.map_or("none".to_string(), |t| t.to_string()),
        args.window
    );
    eprintln!("quality: {data_name}; {recipe}; {} runs", plan.len());

    let mut runs = Vec::new();
    for (i, (variant, long_context, seq_len, batch_size, seed)) in plan.into_iter().enumerate() {
        let tag = format!(
            "{variant}{}-s{seed}",
            if long_context {
                format!("-long{seq_len}")
            } else {
                String::new()
            }
        );
        eprintln!(
            "quality: run {}: {tag} (seq {seq_len} x batch {batch_size})",
            i + 1
        );
        let result = train_once(
            &exe,
            &args,
            data.as_deref(),
            &out.join("runs"),
            &tag,
            &variant,
            seq_len,
            batch_size,
            seed,
            longest,
        );
        if let Err(e) = &result {
            eprintln!("quality: {tag}: {e}");
        }
        runs.push(Run {
            variant,
            long_context,
            seq_len,
            batch_size,
            seed,
            result,
        });
        // After every run, so an interrupted study keeps what it measured.
        write_report(&out, &data_name, &args, &recipe, &runs)?;
    }
    print_tables(&runs, args.validate_every, args.steps);
    plot::draw_curves(&out.join("curves.svg"), &runs)?;
    println!(
        "\nwritten: {} and {}",
        out.join("report.json").display(),
        out.join("curves.svg").display()
    );
    let failed = runs.iter().filter(|r| r.result.is_err()).count();
    if failed > 0 {
        return Err(format!(
            "{failed} of {} runs failed (see above)",
            runs.len()
        ));
    }
    Ok(())
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn lcm(a: usize, b: usize) -> usize {
    a / gcd(a, b) * b
}

fn build_train_lm() -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("quality: cargo build --release -p performer --example train_lm");
    let status = Command::new(cargo)
        .current_dir(crate::workspace::root())
        .args([
            "build",
            "--release",
            "-p",
            "performer",
            "--example",
            "train_lm",
        ])
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("building train_lm failed: {status}"));
    }
    Ok(())
}

/// One `train_lm` process; its `--report` read back, with its peak RSS.
#[allow(clippy::too_many_arguments)]
fn train_once(
    exe: &Path,
    args: &Args,
    data: Option<&Path>,
    runs: &Path,
    tag: &str,
    variant: &str,
    seq_len: usize,
    batch_size: usize,
    seed: u64,
    eval_align: usize,
) -> Result<Measured, String> {
    let report_path = runs.join(format!("{tag}.json"));
    let _ = std::fs::remove_file(&report_path);
    let mut cmd = Command::new(exe);
    if let Some(d) = data {
        cmd.arg("--data").arg(d);
    }
    cmd.arg("--out").arg(runs.join(tag));
    cmd.arg("--report").arg(&report_path);
    if variant != DEFAULT {
        cmd.args(["--attention", variant]);
    }
    // `local` attends over the whole sequence (exact causal attention); the hybrids use the
    // study's window.
    let window = if variant == "local" {
        seq_len
    } else {
        args.window
    };
    let n = |v: &dyn ToString| v.to_string();
    cmd.args([
        "--steps",
        &n(&args.steps),
        "--dim",
        &n(&args.dim),
        "--depth",
        &n(&args.depth),
        "--heads",
        &n(&args.heads),
        "--dim-head",
        &n(&args.dim_head),
        "--nb-features",
        &n(&args.nb_features),
        "--seq-len",
        &n(&seq_len),
        "--batch-size",
        &n(&batch_size),
        "--lr",
        &n(&args.lr),
        "--local-window-size",
        &n(&window),
        "--seed",
        &n(&seed),
        "--validate-every",
        &n(&args.validate_every),
        "--generate-every",
        "0",
        "--checkpoint-every",
        &n(&args.steps),
        "--eval-align",
        &n(&eval_align),
        "--threads",
        &n(&args.threads),
    ]);
    cmd.args(&args.train_args);
    let done =
        child::run_process(cmd, Duration::from_secs(args.timeout)).map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(&report_path)
        .map_err(|e| format!("{}: {e}", report_path.display()))?;
    let r: TrainReport =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", report_path.display()))?;
    // A run that trained but scored nothing, or scored NaN, failed all the same.
    let finite = r.val.iter().all(|p| p.bpb.is_finite());
    if r.steps != args.steps
        || r.val.is_empty()
        || !finite
        || !r.val_all.is_some_and(f64::is_finite)
    {
        return Err(format!(
            "{}: {} of {} steps, validation {:?}, final score {:?}",
            report_path.display(),
            r.steps,
            args.steps,
            r.val.iter().map(|p| p.bpb).collect::<Vec<_>>(),
            r.val_all
        ));
    }
    Ok(Measured {
        parameters: r.parameters,
        val: r.val,
        val_all: r.val_all,
        val_all_bytes: r.val_all_bytes,
        tokens_per_second: r.tokens_per_second,
        peak_rss_mib: done.peak_rss_mib,
        sample: r.sample,
    })
}

fn write_report(
    out: &Path,
    data: &str,
    args: &Args,
    recipe: &str,
    runs: &[Run],
) -> Result<(), String> {
    let report = Report {
        data: data.to_string(),
        steps: args.steps,
        recipe: recipe.to_string(),
        runs,
    };
    let path = out.join("report.json");
    let tmp = out.join(".report.json.tmp");
    let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The validation steps every row shows: every `--validate-every` steps and the last.
fn shown_steps(validate_every: u64, steps: u64) -> Vec<u64> {
    let mut s: Vec<u64> = (1..)
        .map(|i| i * validate_every.max(1))
        .take_while(|&x| x < steps)
        .collect();
    s.push(steps);
    s
}

fn print_tables(runs: &[Run], validate_every: u64, steps: u64) {
    let columns = shown_steps(validate_every, steps);
    for (long, title) in [
        (false, "validation bits per byte (fixed windows) at step"),
        (
            true,
            "long context: same tokens per step, scored on the same validation bytes",
        ),
    ] {
        let rows: Vec<&Run> = runs.iter().filter(|r| r.long_context == long).collect();
        if rows.is_empty() {
            continue;
        }
        println!("\n{title}");
        let mut header = format!(
            "{:<14} {:>5} {:>5} {:>5} |",
            "variant", "seq", "batch", "seed"
        );
        for s in &columns {
            header += &format!(" {:>6}", s);
        }
        header += &format!(" | {:>8} {:>8} {:>8}", "all-val", "tok/s", "peak MiB");
        println!("{header}");
        for r in rows {
            let mut line = format!(
                "{:<14} {:>5} {:>5} {:>5} |",
                r.variant, r.seq_len, r.batch_size, r.seed
            );
            match &r.result {
                Ok(m) => {
                    for s in &columns {
                        match m.val.iter().find(|p| p.step == *s) {
                            Some(p) => line += &format!(" {:>6.3}", p.bpb),
                            None => line += &format!(" {:>6}", "-"),
                        }
                    }
                    line += &format!(
                        " | {:>8} {:>8.0} {:>8.0}",
                        m.val_all.map_or("-".to_string(), |v| format!("{v:.4}")),
                        m.tokens_per_second,
                        m.peak_rss_mib
                    );
                }
                Err(e) => line += &format!(" failed: {e}"),
            }
            println!("{line}");
        }
    }
    if let Some(bytes) = runs
        .iter()
        .find_map(|r| r.result.as_ref().ok().map(|m| m.val_all_bytes))
    {
        println!(
            "\nall-val: bits per byte over the first {bytes} predicted bytes of the validation split (non-overlapping windows of each run's length)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_multiple_and_shown_steps() {
        assert_eq!([256, 1024, 2048].into_iter().fold(1, lcm), 2048);
        assert_eq!([256, 384].into_iter().fold(1, lcm), 768);
        assert_eq!(shown_steps(100, 600), vec![100, 200, 300, 400, 500, 600]);
        assert_eq!(shown_steps(100, 250), vec![100, 200, 250]);
        assert_eq!(shown_steps(100, 50), vec![50]);
    }
}
