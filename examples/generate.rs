//! Samples text from a byte-level PerformerLM checkpoint (written by `examples/train_lm.rs`, or
//! any `save_pretrained` directory of a PerformerLM with 256 tokens).
//!
//! ```text
//! cargo run --release --example generate -- runs/train_lm --prompt "fn main() {" --length 300
//! cargo run --release --example generate -- runs/train_lm --temperature 0.7 --top-p 0.9
//! cargo run --release --example generate -- runs/train_lm --top-k 10 --seed 3 --samples 2
//! ```
//!
//! Filtering follows performer-pytorch's `generate`: `--top-k K` keeps the K most likely bytes
//! (the reference's default, `filter_thres = 0.9`, keeps 25 of 256), `--top-p P` keeps the most
//! likely bytes until their probability passes P (`top_p(thres = 1 - P)`), `--no-filter` keeps
//! all; logits are divided by `--temperature` before the softmax.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use ndarray::Array2;
use performer::models::checkpoint::{into_autoregressive, load_pretrained};
use performer::{Filter, GenerateOptions, SeqInputs};

#[derive(Parser, Debug)]
#[command(about = "Sample text from a byte-level PerformerLM checkpoint")]
struct Cli {
    /// Checkpoint directory (config.json + model.safetensors), e.g. runs/train_lm.
    checkpoint: PathBuf,
    /// Text the samples continue (bytes; an empty prompt starts from a newline).
    #[arg(long, default_value = "\n")]
    prompt: String,
    /// Bytes to generate.
    #[arg(long, default_value_t = 256)]
    length: usize,
    /// Logits are divided by this before sampling.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Keep only the K most likely bytes (default: performer-pytorch's filter_thres 0.9).
    #[arg(long, conflicts_with_all = ["top_p", "no_filter"])]
    top_k: Option<usize>,
    /// Nucleus sampling: keep the most likely bytes until their probability exceeds P.
    #[arg(long, conflicts_with = "no_filter")]
    top_p: Option<f32>,
    /// Sample from the whole distribution.
    #[arg(long)]
    no_filter: bool,
    /// Independent samples (one batch).
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() {
    if let Err(e) = run() {
        eprintln!("generate: error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let cli = Cli::parse();
    if cli.threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(cli.threads)
            .build_global()?;
    }
    let (_, model) = load_pretrained(&cli.checkpoint)
        .map_err(|e| format!("loading {}: {e}", cli.checkpoint.display()))?;
    let model = into_autoregressive(model)?;
    let vocab = model.net.config().num_tokens;
    if vocab != 256 {
        return Err(format!(
            "{} is a PerformerLM over {vocab} tokens; this example samples bytes (256 tokens)",
            cli.checkpoint.display()
        )
        .into());
    }
    let filter = match (cli.top_k, cli.top_p, cli.no_filter) {
        (_, _, true) => Filter::None,
        (Some(k), _, _) => {
            if k == 0 || k > vocab {
                return Err(format!("--top-k must be in 1..={vocab}").into());
            }
            // The reference keeps int((1 - thres) * vocab); aim at the middle of K's interval.
            Filter::TopK {
                thres: 1.0 - (k as f64 + 0.5) / vocab as f64,
            }
        }
        (None, Some(p), _) => {
            if !(0.0..=1.0).contains(&p) {
                return Err("--top-p must lie in [0, 1]".into());
            }
            Filter::TopP {
                thres: 1.0 - f64::from(p),
            }
        }
        (None, None, false) => Filter::TopK { thres: 0.9 },
    };
    let opts = GenerateOptions {
        temperature: cli.temperature,
        filter,
        seed: cli.seed,
        ..Default::default()
    };
    let prompt = if cli.prompt.is_empty() {
        b"\n".to_vec()
    } else {
        cli.prompt.clone().into_bytes()
    };
    let start = Array2::from_shape_fn((cli.samples.max(1), prompt.len()), |(_, c)| {
        prompt[c] as i64
    });
    let t = Instant::now();
    let out = model.generate(&start.view(), cli.length, &opts, &SeqInputs::default())?;
    let secs = t.elapsed().as_secs_f64();
    let mut stdout = std::io::stdout().lock();
    for (i, row) in out.rows().into_iter().enumerate() {
        if cli.samples > 1 {
            writeln!(stdout, "--- sample {} ---", i + 1)?;
        }
        let bytes: Vec<u8> = prompt
            .iter()
            .copied()
            .chain(row.iter().map(|&t| t.clamp(0, 255) as u8))
            .collect();
        writeln!(stdout, "{}", String::from_utf8_lossy(&bytes))?;
    }
    eprintln!(
        "generate: {} x {} bytes in {secs:.2}s ({:.1} bytes/s; {:?}, temperature {})",
        out.nrows(),
        out.ncols(),
        (out.len() as f64) / secs.max(1e-9),
        opts.filter,
        opts.temperature
    );
    Ok(())
}
