//! Times a PerformerLM training step and `generate` on one device, for the device bundle's
//! comparison with performer-pytorch 1.1.4 on the same GPU (`xtask/assets/bench_reference.py`
//! times the same workloads there; `bench_table.py` prints the ratios).
//!
//! ```text
//! cargo run --release --features cuda --example lm_bench -- --device cuda:0 [--out FILE]
//!   [--vocab 256] [--dim 512] [--depth 6] [--heads 8] [--seq 1024] [--batch 8]
//!   [--prompt 512] [--new 64] [--gen-batch 1] [--warmup 1] [--reps 5] [--workloads train,generate]
//! ```
//!
//! Workloads (a causal PerformerLM, performer-pytorch's defaults otherwise, weights seeded):
//! * `train_step`, f32 and under bf16 autocast (`performer_tensor::autocast`): forward,
//!   `AutoregressiveWrapper::loss` over `batch` windows of `seq + 1` tokens, backward and one
//!   Adam step; the loss is read back each step, which synchronises with the device. Tokens per
//!   step: `batch * seq`.
//! * `generate` (f32): `gen_batch` prompts of `prompt` tokens, `new` sampled tokens (the
//!   constant-time-per-token decoding state, on the device). Tokens: `gen_batch * new`.
//!
//! Each runs `warmup` untimed repetitions, then `reps` timed ones, and prints one JSON line,
//! `{"impl":"performer-rs","workload":..,"precision":..,"device":..,"median_ms":..,
//! "times_ms":[..],"tokens":..,"tokens_per_s":..,"shape":..}`, on stdout (and appends it to
//! `--out`), the format `bench_table.py` reads. A workload that fails prints a line with an
//! `"error"` instead of times, and the others still run.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use ndarray::Array2;
use performer::tensor::autocast::autocast_bf16;
use performer::tensor::optim::{Adam, Optimizer};
use performer::tensor::{Device, Module, rng};
use performer::{
    AutoregressiveWrapper, GenerateOptions, PerformerLM, PerformerLMConfig, SeqInputs,
};

/// The benchmark's settings (the defaults are the bundle's GPU shape).
#[derive(Clone, Debug)]
pub struct BenchArgs {
    /// Where the model runs.
    pub device: String,
    /// Vocabulary size.
    pub vocab: usize,
    /// Model width.
    pub dim: usize,
    /// Layers.
    pub depth: usize,
    /// Attention heads.
    pub heads: usize,
    /// Training window (tokens predicted per sequence).
    pub seq: usize,
    /// Training batch.
    pub batch: usize,
    /// Prompt tokens of generate.
    pub prompt: usize,
    /// New tokens of generate.
    pub new: usize,
    /// Sequences generated at once.
    pub gen_batch: usize,
    /// Untimed repetitions.
    pub warmup: usize,
    /// Timed repetitions.
    pub reps: usize,
    /// Which workloads: `train` and/or `generate`.
    pub workloads: Vec<String>,
    /// A file the JSON lines are appended to.
    pub out: Option<String>,
}

impl Default for BenchArgs {
    fn default() -> Self {
        BenchArgs {
            device: "cpu".into(),
            vocab: 256,
            dim: 512,
            depth: 6,
            heads: 8,
            seq: 1024,
            batch: 8,
            prompt: 512,
            new: 64,
            gen_batch: 1,
            warmup: 1,
            reps: 5,
            workloads: vec!["train".into(), "generate".into()],
            out: None,
        }
    }
}

/// Parses `--name value` pairs; an unknown flag or a bad number is an error naming it.
pub fn parse_args(args: &[String]) -> Result<BenchArgs, String> {
    let mut a = BenchArgs::default();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let val = it
            .next()
            .ok_or_else(|| format!("{flag}: needs a value"))?
            .clone();
        let num = |v: &str| -> Result<usize, String> {
            v.parse::<usize>()
                .map_err(|e| format!("{flag} {v}: not a count: {e}"))
        };
        match flag.as_str() {
            "--device" => a.device = val,
            "--vocab" => a.vocab = num(&val)?,
            "--dim" => a.dim = num(&val)?,
            "--depth" => a.depth = num(&val)?,
            "--heads" => a.heads = num(&val)?,
            "--seq" => a.seq = num(&val)?,
            "--batch" => a.batch = num(&val)?,
            "--prompt" => a.prompt = num(&val)?,
            "--new" => a.new = num(&val)?,
            "--gen-batch" => a.gen_batch = num(&val)?,
            "--warmup" => a.warmup = num(&val)?,
            "--reps" => a.reps = num(&val)?,
            "--workloads" => a.workloads = val.split(',').map(str::to_string).collect(),
            "--out" => a.out = Some(val),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.reps == 0 || a.seq == 0 || a.batch == 0 || a.new == 0 || a.prompt == 0 {
        return Err("--reps, --seq, --batch, --prompt and --new must be at least 1".into());
    }
    if a.vocab < 2 || a.heads == 0 || a.dim % a.heads != 0 {
        return Err(format!(
            "--vocab {} must be at least 2 and --dim {} a multiple of --heads {}",
            a.vocab, a.dim, a.heads
        ));
    }
    for w in &a.workloads {
        if w != "train" && w != "generate" {
            return Err(format!(
                "--workloads: unknown workload {w} (train, generate)"
            ));
        }
    }
    Ok(a)
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn model(a: &BenchArgs, device: Device) -> Res<Arc<PerformerLM>> {
    rng::manual_seed(0);
    let m = PerformerLM::new(PerformerLMConfig {
        num_tokens: a.vocab,
        // Long enough for the training window and the whole generated sequence, so that
        // generate never falls back to the sliding window.
        max_seq_len: a.seq.max(a.prompt + a.new),
        dim: a.dim,
        depth: a.depth,
        heads: a.heads,
        dim_head: a.dim / a.heads,
        causal: true,
        ..Default::default()
    })?;
    m.to_device(device)?;
    Ok(Arc::new(m))
}

/// Seeded tokens in `1..vocab` (0 is the wrapper's ignore_index).
fn tokens(rows: usize, cols: usize, vocab: usize, seed: u64) -> Array2<i64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    Array2::from_shape_fn((rows, cols), |_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        1 + (s % (vocab as u64 - 1)) as i64
    })
}

/// Runs `f` `warmup` times untimed and `reps` times timed; the times in ms, sorted.
fn time_reps(warmup: usize, reps: usize, mut f: impl FnMut() -> Res<()>) -> Res<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// One measurement, as a JSON line.
fn line(
    a: &BenchArgs,
    workload: &str,
    precision: &str,
    tokens: usize,
    shape: String,
    result: Res<Vec<f64>>,
) -> serde_json::Value {
    let mut v = serde_json::json!({
        "impl": "performer-rs",
        "workload": workload,
        "precision": precision,
        "device": a.device,
        "tokens": tokens,
        "shape": shape,
    });
    match result {
        Ok(times) => {
            let median = times[times.len() / 2];
            v["median_ms"] = median.into();
            v["times_ms"] = times.into();
            v["tokens_per_s"] = (tokens as f64 / (median / 1e3)).into();
        }
        Err(e) => v["error"] = e.to_string().into(),
    }
    v
}

/// Runs the selected workloads and returns their JSON lines (also printed and appended to
/// `--out`, each as soon as it is measured, so that a run cut short keeps what it finished).
pub fn run(a: &BenchArgs) -> Res<Vec<serde_json::Value>> {
    let device = a.device.parse::<Device>().map_err(|e| e.to_string())?;
    let mut out = match &a.out {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        ),
        None => None,
    };
    let mut lines = Vec::new();
    let mut emit = |v: serde_json::Value| -> Res<()> {
        println!("{v}");
        if let Some(f) = out.as_mut() {
            writeln!(f, "{v}")?;
            f.flush()?;
        }
        lines.push(v);
        Ok(())
    };
    let dims = format!(
        "vocab {} dim {} depth {} heads {} causal",
        a.vocab, a.dim, a.depth, a.heads
    );
    if a.workloads.iter().any(|w| w == "train") {
        for (precision, amp) in [("f32", false), ("bf16", true)] {
            let result = (|| -> Res<Vec<f64>> {
                let net = model(a, device)?;
                let wrapper = AutoregressiveWrapper::new(net.clone());
                let mut opt = Adam::new(net.named_parameters(), 1e-4);
                let x = tokens(a.batch, a.seq + 1, a.vocab, 1);
                time_reps(a.warmup, a.reps, || {
                    // The backward's products follow the forward's autocast choice.
                    let loss =
                        autocast_bf16(amp, || wrapper.loss(&x.view(), &SeqInputs::default()))?;
                    let grads = loss.backward()?;
                    opt.step(&grads)?;
                    // Reading the loss waits for the device.
                    let l = loss.item()?;
                    if !l.is_finite() {
                        return Err(format!("training step: loss {l}").into());
                    }
                    Ok(())
                })
            })();
            let shape = format!("{dims}, batch {} seq {}, Adam", a.batch, a.seq);
            emit(line(
                a,
                "train_step",
                precision,
                a.batch * a.seq,
                shape,
                result,
            ))?;
        }
    }
    if a.workloads.iter().any(|w| w == "generate") {
        let result = (|| -> Res<Vec<f64>> {
            let net = model(a, device)?;
            net.set_training(false);
            let wrapper = AutoregressiveWrapper::new(net);
            let prompt = tokens(a.gen_batch, a.prompt, a.vocab, 2);
            let opts = GenerateOptions::default();
            time_reps(a.warmup, a.reps, || {
                let got = wrapper.generate(&prompt.view(), a.new, &opts, &SeqInputs::default())?;
                if got.dim() != (a.gen_batch, a.new) {
                    return Err(format!("generate returned {:?} tokens", got.dim()).into());
                }
                Ok(())
            })
        })();
        let shape = format!(
            "{dims}, batch {} prompt {} new {}, top-k 0.9",
            a.gen_batch, a.prompt, a.new
        );
        emit(line(
            a,
            "generate",
            "f32",
            a.gen_batch * a.new,
            shape,
            result,
        ))?;
    }
    Ok(lines)
}

#[allow(dead_code)]
fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = match parse_args(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("lm_bench: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(&a) {
        Ok(lines) if lines.iter().all(|l| l.get("error").is_none()) => {
            std::process::ExitCode::SUCCESS
        }
        Ok(_) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("lm_bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
