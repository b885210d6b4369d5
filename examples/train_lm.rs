//! Trains a byte-level causal PerformerLM, in the manner of performer-pytorch's
//! `examples/enwik8_simple/train.py` (Adam, gradient clipping, validation and sampling every N
//! steps), sized for a CPU.
//!
//! ```text
//! cargo run --release --example train_lm                       # this repository's .md/.rs text
//! cargo run --release --example train_lm -- --data enwik8.gz   # enwik8: 90M / 5M / 5M split
//! cargo run --release --example train_lm -- --data ../shared/data/tinyshakespeare.txt \
//!     --dim 256 --depth 4 --heads 4 --dim-head 64 --nb-features 256 --seq-len 256
//! cargo run --release --example train_lm -- --resume runs/train_lm --steps 1000
//! cargo run --release --example generate -- runs/train_lm --prompt "fn main"
//! ```
//!
//! Data: `--data FILE` (plain or gzip, by the `.gz` suffix) is split into train / validation /
//! test by bytes: enwik8 (recognized by its size, 100,000,000 bytes) gets the standard 90M / 5M /
//! 5M split, any other file 90% / 5% / 5%. Without `--data` the text is every `.md` and `.rs`
//! file of this repository, concatenated in sorted path order, so nothing needs downloading.
//!
//! Training batches are windows of `seq_len + 1` bytes at offsets drawn from a seeded
//! generator (xoshiro256++, `performer::tensor::rng::Generator`); validation reads fixed, evenly
//! spaced windows of the validation split, so every validation is comparable; the final summary
//! also scores every non-overlapping window of the split. `tools/train_reference.py` runs
//! performer-pytorch on the same batches and windows.
//!
//! The checkpoint directory (`--out`, default `runs/train_lm`) holds `config.json` +
//! `model.safetensors` (the layout of `performer_models::save_pretrained`, so
//! `load_pretrained` and `examples/generate.rs` read it), `optimizer.safetensors` (Adam's
//! moments and step), `trainer.json` (step, settings, the global and the sampler's generator
//! states, the loss history) and `loss.svg` (train loss and validation bits per byte against
//! steps). It is written every `--checkpoint-every` steps, at the end, and on Ctrl-C, into a
//! fresh sibling directory that then replaces the old one, so an interruption at any moment leaves
//! a complete checkpoint. `--resume DIR` continues a run exactly: the weights, the optimizer, the
//! step and every random state are restored, so 10 steps + resume 10 steps end bit for bit where
//! an uninterrupted 20-step run ends (`tests/train_lm_resume.rs` checks exactly that).
//!
//! `--device cuda:0` (or `emulated`, the CPU-run stand-in for a GPU) trains on a device: built
//! with the facade's `cuda` feature (`cargo run --release --features cuda --example train_lm --
//! --device cuda:0`), the model is moved there once (`Module::to_device`), the batches' token
//! ids go up with each forward, the gradients, Adam's moments and the clipping stay there, and
//! only the loss scalar comes back per step. Checkpoints copy the weights and moments to the
//! host to write them, so a checkpoint is the same file whichever device trained it, and a run
//! may resume on another device.

/// The allocator: mimalloc, told to keep the memory it frees ([`keep_freed_memory`]). Every
/// step frees and reallocates the same few hundred activation and gradient buffers; glibc's
/// malloc returns the large ones to the OS and faults them in again the next step (the kernel
/// zeroes each page, and every unmap stops both cores for a TLB shootdown). Measured on the
/// 2-core Zen 4, 250 steps of this example's defaults in three alternating pairs of processes:
/// 18.9k / 20.0k / 20.3k tokens/s with glibc's malloc, 22.3k / 22.5k / 22.8k with mimalloc
/// (23.0k-23.7k in four runs with its freed memory kept, as here), the same losses bit for bit;
/// peak RSS 113-127 MB -> 143-176 MB.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::f64::consts::LN_2;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ndarray::Array2;
use performer::models::checkpoint::load_pretrained;
use performer::models::{
    AnyModel, AttentionPreset, KernelFn, LocalAttnHeads, ModelConfig, check_finite_step,
};
use performer::tensor::io::{load_safetensors, save_safetensors, write_atomic};
use performer::tensor::optim::{Adam, Optimizer, clip_grad_norm};
use performer::tensor::rng::{self, Generator, RngState};
use performer::tensor::schedule::WarmupCosine;
use performer::tensor::team::on_pool;
use performer::tensor::{Device, Gradients, Module, Tensor, no_grad};
use performer::{
    AutoregressiveWrapper, Filter, GenerateOptions, PerformerLM, PerformerLMConfig, SeqInputs,
    save_pretrained,
};
use serde::{Deserialize, Serialize};

#[path = "train_lm/distributed.rs"]
mod distributed;

type BoxError = Box<dyn std::error::Error>;
type Res<T> = std::result::Result<T, BoxError>;

/// `--attention`'s default: the variant `cargo xtask quality` found best at about equal speed
/// (README, "Attention that learns").
const DEFAULT_ATTENTION: &str = "hybrid-shift";

/// The size of enwik8, which gets the standard 90M / 5M / 5M split.
const ENWIK8_BYTES: usize = 100_000_000;

#[derive(Parser, Debug, Clone)]
#[command(
    about = "Train a byte-level causal PerformerLM (performer-pytorch's enwik8_simple recipe, sized for a CPU)",
    after_help = "Without --data the text is every .md and .rs file of this repository. \
                  On --resume, the model, data and optimization settings come from the checkpoint; \
                  --steps, the intervals and sampling settings, --threads and --out may be given \
                  again (else the checkpoint's apply)."
)]
struct Cli {
    /// Text to train on (plain, or gzip when the name ends in .gz). enwik8 (100,000,000 bytes)
    /// is split 90M / 5M / 5M, anything else 90% / 5% / 5%. Default: this repository's .md and
    /// .rs files.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Checkpoint directory (written every --checkpoint-every steps, at the end and on Ctrl-C).
    /// Default: runs/train_lm, or the --resume directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run saved in this checkpoint directory.
    #[arg(long)]
    resume: Option<PathBuf>,

    /// Model width.
    #[arg(long, default_value_t = 128)]
    dim: usize,
    /// Layers.
    #[arg(long, default_value_t = 3)]
    depth: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Width of each head.
    #[arg(long, default_value_t = 32)]
    dim_head: usize,
    /// FAVOR+ random features per head.
    #[arg(long, default_value_t = 64)]
    nb_features: usize,
    /// Redraw the random projections every this many forward calls (0: never).
    #[arg(long, default_value_t = 1000)]
    feature_redraw_interval: usize,
    /// Attention variant: favor (performer-pytorch's default), favor-shift, relu, relu-shift,
    /// local, hybrid (half the heads local), hybrid-shift, global (no local heads: linear in
    /// the sequence at any length). `cargo xtask quality` compares them; the default learned
    /// fastest per step there, and per second on the main job (README, "Attention that
    /// learns"). --local-attn-heads, --shift-tokens, --generalized-attention and --kernel-fn,
    /// when given, override the variant's choice.
    #[arg(long, default_value = DEFAULT_ATTENTION)]
    attention: AttentionPreset,
    /// Local (windowed softmax) heads per layer (default: the --attention variant's).
    #[arg(long)]
    local_attn_heads: Option<usize>,
    /// Window of the local heads.
    #[arg(long, default_value_t = 128)]
    local_window_size: usize,
    /// Generalized attention (kernel_fn(u) + 1e-3 features instead of the softmax kernel).
    #[arg(long)]
    generalized_attention: bool,
    /// The kernel of generalized attention: relu, gelu, elu, softplus, sigmoid, tanh, silu,
    /// leaky_relu.
    #[arg(long)]
    kernel_fn: Option<String>,
    /// GLU feed-forward.
    #[arg(long)]
    ff_glu: bool,
    /// Reversible layers (less memory, more compute).
    #[arg(long)]
    reversible: bool,
    /// Token shift before attention and feed-forward.
    #[arg(long)]
    shift_tokens: bool,

    /// Tokens (bytes) per sequence; also the model's max_seq_len.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Sequences per micro-batch (on each rank with --distributed: the global batch is this
    /// times the ranks).
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Micro-batches whose gradients are summed into one optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Peak learning rate (performer-pytorch's recipe uses 1e-4 for a 6-layer dim-512 model;
    /// this small model trains faster with more).
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// Steps of linear learning-rate warm-up, before the cosine decay (0: none).
    #[arg(long, default_value_t = 100)]
    warmup: u64,
    /// The learning rate the cosine decays to, at --decay-steps (default: --lr / 10; --min-lr
    /// equal to --lr with --warmup 0 gives a constant rate, performer-pytorch's recipe).
    #[arg(long)]
    min_lr: Option<f32>,
    /// The step at which the cosine reaches --min-lr (default: --steps of the first run; a
    /// resumed run keeps it, so a longer resumed run trains on at --min-lr).
    #[arg(long)]
    decay_steps: Option<u64>,
    /// AdamW's decoupled weight decay on the weight matrices (not on biases, norm gains or
    /// other vectors); 0 gives Adam.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Clip the gradients' joint L2 norm to this (0: no clipping).
    #[arg(long, default_value_t = 0.5)]
    clip: f32,
    /// Optimizer steps to reach (a resumed run continues up to this step).
    #[arg(long, default_value_t = 2000)]
    steps: u64,
    /// Seed of the weights, the projections and the batch sampler.
    #[arg(long, default_value_t = 42)]
    seed: u64,

    /// Validate every this many steps (and at the end).
    #[arg(long, default_value_t = 100)]
    validate_every: u64,
    /// Validation windows (fixed, evenly spaced over the validation split).
    #[arg(long, default_value_t = 16)]
    val_windows: usize,
    /// Print a generated sample every this many steps (0: only at the end).
    #[arg(long, default_value_t = 500)]
    generate_every: u64,
    /// Bytes to generate for each sample.
    #[arg(long, default_value_t = 128)]
    generate_length: usize,
    /// Bytes of the validation text that prime each sample.
    #[arg(long, default_value_t = 64)]
    prime_length: usize,
    /// Sampling temperature of the samples.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Write a checkpoint every this many steps (and at the end).
    #[arg(long, default_value_t = 500)]
    checkpoint_every: u64,
    /// Threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Where to train: cpu, cuda (= cuda:0), cuda:N, or emulated (the CUDA kernels run on the
    /// CPU; slow, for checking the device path). Devices other than cpu need the `cuda`
    /// feature. Not saved in the checkpoint: a run may resume on another device.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: Device,
    /// bf16 autocast on the device (performer-pytorch's amp_enabled): the matrix products of
    /// the forward and backward read bf16 operands and accumulate in f32, and the activations
    /// they and the element-wise ops produce are stored in bf16; weights, gradients, Adam's
    /// state, FAVOR+, softmax, norms and the loss stay f32 (performer_tensor::autocast). Needs
    /// a --device other than cpu.
    #[arg(long)]
    amp: bool,
    /// Skip scoring the whole validation split at the end.
    #[arg(long)]
    no_final_eval: bool,
    /// At the end, score the longest run of predicted validation bytes (from the split's
    /// start) that is a multiple of N (itself a multiple of --seq-len), so that runs with
    /// different --seq-len are scored on the same bytes, each with the longest context it can
    /// use (`cargo xtask quality` passes the longest length it compares).
    #[arg(long, value_name = "N")]
    eval_align: Option<usize>,
    /// Write a JSON summary of the run (settings, validation curve, final score, tokens/s, the
    /// last sample) to this file at the end.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// When a step's loss or gradient is not finite, skip its optimizer update (as
    /// mixed-precision trainers do) and go on, instead of stopping. Stops anyway after
    /// --max-skipped-steps such steps in a row.
    #[arg(long)]
    skip_nonfinite: bool,
    /// With --skip-nonfinite: stop after this many non-finite steps in a row.
    #[arg(long, default_value_t = 20)]
    max_skipped_steps: u64,
    /// Testing hook: make the gradients of this step NaN (0: never).
    #[arg(long, default_value_t = 0, hide = true)]
    inject_nonfinite_at: u64,

    /// Data-parallel training across the processes `mpirun -np N` starts: `mpi` (built with
    /// `--features mpi`), or `nccl` (features `nccl` and `mpi`, GPUs). Each rank trains on its
    /// share of a global batch of --batch-size times N sequences; rank 0 prints and writes the
    /// checkpoints. README, "Training on several processes".
    #[arg(long, value_name = "BACKEND")]
    distributed: Option<String>,
    /// With --distributed: seconds a collective may wait for the other ranks before the job
    /// is aborted with an error (a rank died or stalled).
    #[arg(long, default_value_t = 300.0)]
    dist_timeout: f64,
    /// With --distributed: size of the gradient buckets averaged across ranks, in MiB.
    #[arg(long, default_value_t = 4.0)]
    bucket_mb: f64,
    /// Testing hook: RANK:STEP:kill|stall makes that rank die or hang at that step.
    #[arg(long, hide = true)]
    inject_rank_failure: Option<String>,
}

/// Everything that decides the result of a run; saved in `trainer.json` and restored by
/// `--resume`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// The corpus (`None`: the repository's own .md and .rs files).
    pub data: Option<PathBuf>,
    /// Its length in bytes.
    pub data_bytes: usize,
    /// Its FNV-1a hash: `--resume` warns when the corpus changed since (the default corpus, this
    /// repository, changes with every edit), as the run then no longer matches an
    /// uninterrupted one.
    pub data_fnv1a: String,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// The peak learning rate.
    pub lr: f32,
    /// Gradient-norm clip.
    pub clip: f32,
    /// Seed of the weights and the batch sampler.
    pub seed: u64,
    /// Validation windows per evaluation.
    pub val_windows: usize,
    /// Warm-up steps of the schedule (0 in checkpoints from before the schedule).
    #[serde(default)]
    pub warmup: u64,
    /// The schedule's floor (`None` in checkpoints from before the schedule: constant `lr`).
    #[serde(default)]
    pub min_lr: Option<f32>,
    /// The step at which the cosine reaches `min_lr`.
    #[serde(default)]
    pub decay_steps: u64,
    /// AdamW weight decay on matrices (0: Adam).
    #[serde(default)]
    pub weight_decay: f32,
    /// The `--attention` variant the model was built with (`None`: knobs given one by one, or
    /// a checkpoint from before the variants).
    #[serde(default)]
    pub attention: Option<String>,
    /// bf16 autocast of the device's matrix products (`--amp`).
    #[serde(default)]
    pub amp: bool,
}

impl Settings {
    /// The learning-rate schedule these settings give.
    pub fn schedule(&self) -> Res<WarmupCosine> {
        let min = self.min_lr.unwrap_or(self.lr);
        Ok(WarmupCosine::new(
            self.lr,
            min,
            self.warmup,
            self.decay_steps.max(self.warmup),
        )?)
    }
}

/// A point of the loss history.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Optimizer step.
    pub step: u64,
    /// Validation bits per byte.
    pub bpb: f64,
}

/// Settings of the run that do not change its result (the step target, intervals, sampling);
/// a resumed run keeps them unless given again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunControl {
    /// The step to stop at.
    pub steps: u64,
    /// Steps between validations.
    pub validate_every: u64,
    /// Steps between samples.
    pub generate_every: u64,
    /// Tokens per sample.
    pub generate_length: usize,
    /// Prompt tokens of each sample.
    pub prime_length: usize,
    /// Sampling temperature.
    pub temperature: f32,
    /// Steps between checkpoints.
    pub checkpoint_every: u64,
    /// Skip non-finite steps instead of stopping (`--skip-nonfinite`).
    #[serde(default)]
    pub skip_nonfinite: bool,
    /// Non-finite steps in a row after which even `--skip-nonfinite` stops.
    #[serde(default)]
    pub max_skipped_steps: u64,
}

/// `trainer.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    /// What decides the result.
    pub settings: Settings,
    /// What does not.
    pub control: RunControl,
    /// The global generator (weights, projection redraws, dropout) after `step`.
    pub global_rng: [u64; 4],
    /// The batch sampler's generator after `step`.
    pub sampler_rng: [u64; 4],
    /// Mean train loss of each step, bits per byte.
    pub train: Vec<Point>,
    /// Validation bits per byte.
    pub val: Vec<Point>,
    /// Seconds spent training (not validating or sampling), over all sessions.
    pub train_seconds: f64,
    /// Tokens trained on, over all sessions.
    pub tokens: u64,
    /// Steps whose update was skipped because the loss or a gradient was not finite
    /// (`--skip-nonfinite`).
    #[serde(default)]
    pub skipped: Vec<u64>,
}

/// The train / validation / test bytes.
struct Corpus {
    train: Vec<u8>,
    val: Vec<u8>,
    test_len: usize,
    description: String,
}

fn fnv1a(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The repository root: the facade's manifest directory when it still exists, else the
/// current directory.
fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if manifest.join("Cargo.toml").is_file() {
        manifest
    } else {
        PathBuf::from(".")
    }
}

/// Every `.md` and `.rs` file under `root` (skipping hidden directories, `target` and `runs`),
/// sorted by path.
fn repository_text_files(root: &Path) -> Res<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                if !name.starts_with('.') && name != "target" && name != "runs" {
                    stack.push(entry.path());
                }
            } else if kind.is_file() && (name.ends_with(".md") || name.ends_with(".rs")) {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn read_data(path: Option<&Path>) -> Res<(Vec<u8>, String)> {
    match path {
        Some(p) => {
            let raw = std::fs::read(p).map_err(|e| format!("--data {}: {e}", p.display()))?;
            let bytes = if p.extension().is_some_and(|e| e == "gz") {
                let mut out = Vec::new();
                flate2::read::MultiGzDecoder::new(&raw[..])
                    .read_to_end(&mut out)
                    .map_err(|e| format!("--data {}: not gzip: {e}", p.display()))?;
                out
            } else {
                raw
            };
            Ok((bytes, p.display().to_string()))
        }
        None => {
            let root = repo_root();
            let files = repository_text_files(&root)?;
            let mut bytes = Vec::new();
            for f in &files {
                bytes.extend(std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?);
            }
            Ok((
                bytes,
                format!(
                    "{} .md/.rs files of {}",
                    files.len(),
                    root.canonicalize().unwrap_or(root).display()
                ),
            ))
        }
    }
}

/// enwik8: 90M / 5M / 5M; anything else 90% / 5% / 5%.
fn split(bytes: Vec<u8>, name: String) -> Corpus {
    let len = bytes.len();
    let (train_end, val_end) = if len == ENWIK8_BYTES {
        (90_000_000, 95_000_000)
    } else {
        (len * 90 / 100, len * 95 / 100)
    };
    let kind = if len == ENWIK8_BYTES {
        "enwik8 split 90M/5M/5M"
    } else {
        "split 90/5/5"
    };
    Corpus {
        val: bytes[train_end..val_end].to_vec(),
        test_len: len - val_end,
        description: format!(
            "{name}: {len} bytes, {kind}: train {train_end}, validation {}, test {}",
            val_end - train_end,
            len - val_end
        ),
        train: {
            let mut b = bytes;
            b.truncate(train_end);
            b
        },
    }
}

/// `(rows, len)` tokens from windows of `data` starting at `offsets`.
fn windows(data: &[u8], offsets: &[usize], len: usize) -> Array2<i64> {
    Array2::from_shape_fn((offsets.len(), len), |(r, c)| data[offsets[r] + c] as i64)
}

/// A training batch: `batch` windows of `len` bytes at offsets uniform in `0..data.len() - len`
/// (performer-pytorch's `randint(0, len - seq_len - 1)` with `len = seq_len + 1`).
fn sample_batch(g: &mut Generator, data: &[u8], batch: usize, len: usize) -> Array2<i64> {
    let offsets: Vec<usize> = (0..batch)
        .map(|_| g.below((data.len() - len) as u64) as usize)
        .collect();
    windows(data, &offsets, len)
}

/// `count` windows of `len` bytes evenly spaced over `data` (first at 0, last at the end).
fn val_offsets(data_len: usize, len: usize, count: usize) -> Vec<usize> {
    let span = data_len - len;
    if count <= 1 {
        return vec![0];
    }
    (0..count).map(|i| i * span / (count - 1)).collect()
}

/// Every non-overlapping window: offsets 0, len - 1, 2 (len - 1), ... (each window's last
/// byte is the next one's first input, so every byte after the first is predicted once).
/// With `predicted`, only the windows that predict the first `predicted` bytes after the
/// first (a multiple of `len - 1`, checked by the caller).
fn full_offsets(data_len: usize, len: usize, predicted: Option<usize>) -> Vec<usize> {
    let windows = predicted.map_or(usize::MAX, |p| p / (len - 1));
    (0..)
        .map(|i| i * (len - 1))
        .take_while(|o| o + len <= data_len)
        .take(windows)
        .collect()
}

/// `--report`: what `cargo xtask quality` reads back.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunReport {
    /// The settings of the run (data, optimizer, schedule, attention variant).
    pub settings: Settings,
    /// The model's configuration.
    pub model: PerformerLMConfig,
    /// Parameters of the model.
    pub parameters: usize,
    /// Optimizer steps done.
    pub steps: u64,
    /// Validation bits per byte on the fixed windows, at every validation.
    pub val: Vec<Point>,
    /// The final score over `val_all_bytes` predicted bytes of the validation split.
    pub val_all: Option<f64>,
    /// Bytes that score predicted.
    pub val_all_bytes: usize,
    /// Training tokens per second of this session (steps only, not validation or sampling).
    pub tokens_per_second: f64,
    /// The last generated sample, prime included.
    pub sample: String,
    /// Where the model's parameters were at the end (`cpu`, `cuda:0`, `emulated`): read from
    /// the parameters themselves, not from `--device`.
    #[serde(default)]
    pub device: String,
}

/// Mean loss over windows at `offsets`, in bits per byte (eval mode, no graph).
fn evaluate(
    model: &AutoregressiveWrapper,
    data: &[u8],
    offsets: &[usize],
    len: usize,
    batch: usize,
) -> Res<f64> {
    let was_training = performer::models::is_training(model);
    model.set_training(false);
    // On a rayon worker, as the training steps (`on_pool`).
    let result = on_pool(|| {
        no_grad(|| -> performer::tensor::Result<f64> {
            let mut total = 0.0f64;
            for chunk in offsets.chunks(batch.max(1)) {
                let x = windows(data, chunk, len);
                let loss = model.loss(&x.view(), &SeqInputs::default())?.item()? as f64;
                total += loss * chunk.len() as f64;
            }
            Ok(total / offsets.len() as f64 / LN_2)
        })
    })
    .map_err(Into::into);
    model.set_training(was_training);
    result
}

/// Bytes as text for the terminal: invalid UTF-8 replaced, control characters other than
/// newline and tab shown as spaces (the reference maps every byte below 32 to a space).
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                ' '
            } else {
                c
            }
        })
        .collect()
}

fn sample_text(
    model: &AutoregressiveWrapper,
    prime: &[u8],
    length: usize,
    temperature: f32,
    seed: u64,
) -> Res<String> {
    let start = Array2::from_shape_fn((1, prime.len()), |(_, c)| prime[c] as i64);
    let opts = GenerateOptions {
        temperature,
        filter: Filter::TopK { thres: 0.9 },
        seed,
        ..Default::default()
    };
    let out = model.generate(&start.view(), length, &opts, &SeqInputs::default())?;
    let bytes: Vec<u8> = out.iter().map(|&t| t.clamp(0, 255) as u8).collect();
    Ok(printable(&bytes))
}

fn model_config(cli: &Cli, matches: &clap::ArgMatches) -> Res<PerformerLMConfig> {
    let mut config = PerformerLMConfig {
        num_tokens: 256,
        max_seq_len: cli.seq_len,
        dim: cli.dim,
        depth: cli.depth,
        heads: cli.heads,
        dim_head: cli.dim_head,
        nb_features: Some(cli.nb_features),
        feature_redraw_interval: (cli.feature_redraw_interval > 0)
            .then_some(cli.feature_redraw_interval),
        local_window_size: cli.local_window_size,
        ff_glu: cli.ff_glu,
        reversible: cli.reversible,
        causal: true,
        ..Default::default()
    };
    cli.attention.apply(&mut config)?;
    // Knobs given one by one override the variant's choice.
    if let Some(n) = cli.local_attn_heads {
        config.local_attn_heads = LocalAttnHeads::All(n);
    }
    if explicitly_given(matches, "shift_tokens") {
        config.shift_tokens = cli.shift_tokens;
    }
    if explicitly_given(matches, "generalized_attention") {
        config.generalized_attention = cli.generalized_attention;
    }
    if let Some(name) = &cli.kernel_fn {
        config.kernel_fn =
            serde_json::from_value::<KernelFn>(serde_json::Value::from(name.as_str()))
                .map_err(|e| format!("--kernel-fn {name}: {e}"))?;
    }
    Ok(config)
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

const TRAINER_JSON: &str = "trainer.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const PLOT_FILE: &str = "loss.svg";

/// `dir`'s hidden sibling `.NAME.SUFFIX` (the save's scratch and previous copies).
pub fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    dir.with_file_name(format!(".{name}.{suffix}"))
}

/// Writes the whole checkpoint into a fresh sibling directory, then swaps it in for `dir`.
fn save_checkpoint(
    dir: &Path,
    model: &AutoregressiveWrapper,
    opt: &Adam,
    state: &TrainerState,
) -> Res<()> {
    if dir.exists() && !dir.join(TRAINER_JSON).is_file() && dir.read_dir()?.next().is_some() {
        return Err(format!(
            "{} exists and is not a train_lm checkpoint; refusing to replace it",
            dir.display()
        )
        .into());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    // A kill between the two renames below leaves only `old`: put it back first, so that a
    // complete checkpoint exists under one of the two names at every moment.
    let old = sibling(dir, "old");
    if !dir.exists() && old.join(TRAINER_JSON).is_file() {
        std::fs::rename(&old, dir)?;
    }
    let tmp = sibling(dir, "tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    save_pretrained(
        &tmp,
        &model.net,
        &ModelConfig::PerformerLM(model.net.config().clone()),
    )?;
    save_safetensors(tmp.join(OPTIMIZER_FILE), &opt.state_dict(), None)?;
    write_atomic(
        tmp.join(TRAINER_JSON),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    draw_loss_curve(&tmp.join(PLOT_FILE), state)?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    if dir.exists() {
        std::fs::rename(dir, &old)?;
    }
    std::fs::rename(&tmp, dir)?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(parent)
    {
        let _ = d.sync_all();
    }
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

/// A checkpoint read back: the model, Adam's state and `trainer.json`.
#[allow(dead_code)] // fields read by tests/train_lm_robustness.rs
pub struct Resumed {
    /// The model, weights loaded.
    pub model: AutoregressiveWrapper,
    /// Adam's moments and step.
    pub opt_state: std::collections::BTreeMap<String, performer::tensor::io::TensorData>,
    /// `trainer.json`.
    pub state: TrainerState,
}

/// Reads the checkpoint in `dir` (or, after a save killed between its two renames, the
/// complete previous one that save left beside it).
pub fn load_checkpoint(dir: &Path) -> Res<Resumed> {
    let old = sibling(dir, "old");
    // A save killed between its two renames leaves the previous checkpoint, complete, in `old`
    // (save_checkpoint moves it back on the next save).
    let dir = if !dir.exists() && old.join(TRAINER_JSON).is_file() {
        eprintln!(
            "train_lm: {} is missing: an interrupted save left the previous checkpoint in {}; resuming from it",
            dir.display(),
            old.display()
        );
        old.as_path()
    } else {
        dir
    };
    let path = dir.join(TRAINER_JSON);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let (_, model) = load_pretrained(dir)?;
    let AnyModel::PerformerLM(lm) = model else {
        return Err(format!("{} does not hold a PerformerLM", dir.display()).into());
    };
    Ok(Resumed {
        model: AutoregressiveWrapper::new(lm),
        opt_state: load_safetensors(dir.join(OPTIMIZER_FILE))?,
        state,
    })
}

// ---------------------------------------------------------------------------------------------
// The loss curve

fn draw_loss_curve(path: &Path, state: &TrainerState) -> Res<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let last = state.step.max(1) as f64;
    let all = state.train.iter().chain(&state.val).map(|p| p.bpb);
    let (lo, hi) = all
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    let (lo, hi) = if lo.is_finite() {
        ((lo - 0.1).max(0.0), hi + 0.1)
    } else {
        (0.0, 8.0)
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "PerformerLM byte-level training: {} steps, seq {}, batch {} x {}",
                state.step,
                state.settings.seq_len,
                state.settings.batch_size,
                state.settings.grad_accum
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..last, lo..hi)?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_desc("step")
        .y_desc("bits per byte")
        .draw()?;
    let train: Vec<(f64, f64)> = state.train.iter().map(|p| (p.step as f64, p.bpb)).collect();
    chart
        .draw_series(LineSeries::new(
            train.clone(),
            BLUE.mix(0.3).stroke_width(1),
        ))?
        .label("train loss (bits per byte), each step")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.mix(0.3)));
    // The mean of the last (up to) 25 steps, so the trend shows through the batch noise.
    let smooth: Vec<(f64, f64)> = (0..train.len())
        .map(|i| {
            let w = &train[i.saturating_sub(24)..=i];
            (
                train[i].0,
                w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64,
            )
        })
        .collect();
    chart
        .draw_series(LineSeries::new(smooth, BLUE.stroke_width(2)))?
        .label("train loss, mean of 25 steps")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    let val: Vec<(f64, f64)> = state.val.iter().map(|p| (p.step as f64, p.bpb)).collect();
    chart
        .draw_series(LineSeries::new(val.clone(), RED.stroke_width(3)))?
        .label("validation bits per byte")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(3)));
    chart.draw_series(val.iter().map(|&p| Circle::new(p, 3, RED.filled())))?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The run

/// "AdamW lr 0.001 (warm-up 100, cosine to 0.0001 at step 2000), weight decay 0.1".
fn describe_optimizer(settings: &Settings, schedule: &WarmupCosine) -> String {
    let name = if settings.weight_decay > 0.0 {
        "AdamW"
    } else {
        "Adam"
    };
    let mut s = format!("{name} lr {}", schedule.peak);
    if schedule.min != schedule.peak || schedule.warmup > 0 {
        s += &format!(
            " (warm-up {}, cosine to {} at step {})",
            schedule.warmup, schedule.min, schedule.decay_steps
        );
    }
    if settings.weight_decay > 0.0 {
        s += &format!(", weight decay {} on matrices", settings.weight_decay);
    }
    s
}

/// The attention knobs of a model, in words.
fn describe_attention(config: &PerformerLMConfig) -> String {
    let local = match &config.local_attn_heads {
        LocalAttnHeads::All(n) => format!("{n}"),
        LocalAttnHeads::PerLayer(v) => format!("{v:?}"),
    };
    let kernel = if config.generalized_attention {
        format!(
            "generalized ({})",
            serde_json::to_string(&config.kernel_fn).unwrap_or_default()
        )
    } else {
        "FAVOR+ softmax".to_string()
    };
    format!(
        "{kernel}, {local} local heads (window {}), shift_tokens {}",
        config.local_window_size, config.shift_tokens
    )
}

fn parse_device(s: &str) -> std::result::Result<Device, String> {
    s.parse::<Device>().map_err(|e| e.to_string())
}

/// Whether this build can train on `device`, and with what: an error naming the missing
/// feature or the unsupported combination, before any data is read.
fn check_device(device: Device, distributed: bool, amp: bool) -> Res<()> {
    if device.is_cpu() {
        if amp {
            return Err(
                "--amp: bf16 autocast is for the device path; add --device cuda:N \
                        (or emulated)"
                    .into(),
            );
        }
        return Ok(());
    }
    if !cfg!(feature = "cuda") {
        return Err(format!(
            "--device {device}: train_lm was built without the `cuda` feature; run \
             `cargo run --release --features cuda --example train_lm -- --device {device} ...`"
        )
        .into());
    }
    if distributed {
        return Err(format!(
            "--device {device} with --distributed: data-parallel training averages host \
             gradients; train on one device, or on the CPU across ranks"
        )
        .into());
    }
    Ok(())
}

/// `--inject-nonfinite-at`: every gradient of `params` replaced by NaN, where it lives.
fn poison_gradients(grads: &mut Gradients, params: &[performer::tensor::Param]) -> Res<()> {
    for p in params {
        if let Some(g) = grads.tensor(p.id()) {
            let nan = Tensor::full_on(g.shape(), f32::NAN, g.device())?;
            grads.insert_tensor(p.id(), nan);
        }
    }
    Ok(())
}

fn explicitly_given(matches: &clap::ArgMatches, id: &str) -> bool {
    matches.value_source(id) == Some(ValueSource::CommandLine)
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Sets mimalloc's purge delay to -1: freed memory stays with the process for the next step
/// instead of going back to the OS after 10 ms (a step of the default model takes about 45).
fn keep_freed_memory() {
    // `mi_option_purge_delay` of mimalloc.h (v2 and v3), which the Rust binding does not name.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets an allocator option; mimalloc reads it when it next purges.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

fn main() {
    keep_freed_memory();
    std::process::exit(run_main(std::env::args_os().collect(), true));
}

/// `train_lm ARGS` as a process (`args[0]` is the program): returns the exit code. Tests run
/// the ranks of a distributed job through this (without a Ctrl-C handler).
pub fn run_main(args: Vec<std::ffi::OsString>, handle_ctrlc: bool) -> i32 {
    let matches = Cli::command().get_matches_from(args);
    let mut printed = false;
    let result = (|| -> Res<Outcome> {
        let cli = Cli::from_arg_matches(&matches)?;
        let comm = distributed::connect(cli.distributed.as_deref(), cli.dist_timeout)?;
        let rank = match comm.world_size() {
            1 => String::new(),
            _ => format!("rank {}: ", comm.rank()),
        };
        let threads = match cli.threads {
            0 if cli.distributed.is_some() => distributed::default_threads(),
            n => n,
        };
        if threads > 0 {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build_global()?;
        }
        let interrupted = Arc::new(AtomicBool::new(false));
        if handle_ctrlc {
            let flag = interrupted.clone();
            ctrlc::set_handler(move || {
                if flag.swap(true, Ordering::SeqCst) {
                    eprintln!("\ntrain_lm: second Ctrl-C: exiting without saving");
                    std::process::exit(130);
                }
                eprintln!(
                    "\ntrain_lm: Ctrl-C: saving a checkpoint after this step (Ctrl-C again quits without saving)"
                );
            })?;
        }
        let result = train(&cli, &matches, &interrupted, &*comm);
        if let Err(e) = &result {
            // Said before `comm` is dropped: a communicator whose collective failed aborts
            // the whole job when dropped.
            eprintln!("train_lm: {rank}error: {e}");
            printed = true;
        }
        result
    })();
    match result {
        Ok(Outcome::Finished(_)) => 0,
        Ok(Outcome::Interrupted(_)) => 130,
        Err(e) => {
            if !printed {
                eprintln!("train_lm: error: {e}");
            }
            1
        }
    }
}

/// How a run ended.
#[allow(dead_code)] // the state is read by tests/train_lm_resume.rs
enum Outcome {
    /// Reached `--steps`; the final state.
    Finished(TrainerState),
    /// Ctrl-C: the state saved.
    Interrupted(TrainerState),
}

/// Runs `train_lm ARGS...` in this process (for tests: no Ctrl-C handler, rayon's pool as it is).
#[allow(dead_code)] // used by tests/train_lm_resume.rs
pub fn train_with_args(args: &[&str]) -> Res<TrainerState> {
    let matches = Cli::command()
        .try_get_matches_from(std::iter::once("train_lm").chain(args.iter().copied()))?;
    let cli = Cli::from_arg_matches(&matches)?;
    let comm = distributed::connect(cli.distributed.as_deref(), cli.dist_timeout)?;
    match train(&cli, &matches, &AtomicBool::new(false), &*comm)? {
        Outcome::Finished(s) | Outcome::Interrupted(s) => Ok(s),
    }
}

/// The training run on this rank of `comm` (one process unless `--distributed`):
/// `interrupted` is polled after every step.
fn train(
    cli: &Cli,
    matches: &clap::ArgMatches,
    interrupted: &AtomicBool,
    comm: &dyn performer::dist::Communicator,
) -> Res<Outcome> {
    let mut cli = cli.clone();
    check_device(cli.device, cli.distributed.is_some(), cli.amp)?;
    let mut dist = distributed::Dist::new(
        comm,
        cli.distributed.is_some(),
        cli.dist_timeout,
        cli.inject_rank_failure.as_deref(),
    )?;

    // The model, the optimizer state and the trainer state: fresh or from a checkpoint.
    let (model, opt_state, mut state) = if let Some(dir) = &cli.resume {
        // Settings that decide the result come from the checkpoint.
        const FIXED: &[&str] = &[
            "data",
            "dim",
            "depth",
            "heads",
            "dim_head",
            "nb_features",
            "feature_redraw_interval",
            "attention",
            "local_attn_heads",
            "local_window_size",
            "generalized_attention",
            "kernel_fn",
            "ff_glu",
            "reversible",
            "shift_tokens",
            "seq_len",
            "batch_size",
            "grad_accum",
            "lr",
            "warmup",
            "min_lr",
            "decay_steps",
            "weight_decay",
            "clip",
            "seed",
            "val_windows",
            "amp",
        ];
        let ignored: Vec<String> = FIXED
            .iter()
            .filter(|id| explicitly_given(matches, id))
            .map(|id| format!("--{}", id.replace('_', "-")))
            .collect();
        if !ignored.is_empty() {
            eprintln!(
                "train_lm: resuming {}: ignoring {} (the checkpoint's settings apply)",
                dir.display(),
                ignored.join(", ")
            );
        }
        // Only rank 0 reads `dir`; the others read the copy it sends them.
        let local = dist.checkpoint_copy(dir)?;
        let r = load_checkpoint(&local);
        dist.forget_copy(dir, &local);
        let r = r?;
        let saved = &r.state.control;
        macro_rules! keep {
            ($($f:ident),*) => {$(
                if !explicitly_given(matches, stringify!($f)) {
                    cli.$f = saved.$f.clone();
                }
            )*};
        }
        keep!(
            steps,
            validate_every,
            generate_every,
            generate_length,
            prime_length,
            temperature,
            checkpoint_every,
            skip_nonfinite,
            max_skipped_steps
        );
        (r.model, Some(r.opt_state), r.state)
    } else {
        rng::manual_seed(cli.seed);
        let model = AutoregressiveWrapper::new(PerformerLM::new(model_config(&cli, matches)?)?);
        let overridden = [
            "local_attn_heads",
            "shift_tokens",
            "generalized_attention",
            "kernel_fn",
        ]
        .iter()
        .any(|id| explicitly_given(matches, id));
        let state = TrainerState {
            step: 0,
            settings: Settings {
                // Absolute, so that --resume works from any directory.
                data: cli
                    .data
                    .as_ref()
                    .map(|p| p.canonicalize().unwrap_or_else(|_| p.clone())),
                data_bytes: 0,
                data_fnv1a: String::new(),
                seq_len: cli.seq_len,
                // The global batch: every rank's share together.
                batch_size: cli.batch_size * dist.ranks(),
                grad_accum: cli.grad_accum,
                lr: cli.lr,
                clip: cli.clip,
                seed: cli.seed,
                val_windows: cli.val_windows,
                warmup: cli.warmup,
                // Through the decimal the user typed, so that 1e-3 gives 1e-4, not 1.00000005e-4.
                min_lr: Some(cli.min_lr.unwrap_or_else(|| {
                    let typed: f64 = cli.lr.to_string().parse().unwrap_or(cli.lr as f64);
                    (typed / 10.0) as f32
                })),
                decay_steps: cli.decay_steps.unwrap_or(cli.steps),
                weight_decay: cli.weight_decay,
                amp: cli.amp,
                attention: Some(if overridden {
                    format!("{} with knobs given one by one", cli.attention)
                } else {
                    cli.attention.to_string()
                }),
            },
            control: RunControl {
                steps: 0,
                validate_every: 0,
                generate_every: 0,
                generate_length: 0,
                prime_length: 0,
                temperature: 0.0,
                checkpoint_every: 0,
                skip_nonfinite: false,
                max_skipped_steps: 0,
            },
            global_rng: rng::get_state().0,
            sampler_rng: Generator::seeded(cli.seed).state().0,
            train: Vec::new(),
            val: Vec::new(),
            train_seconds: 0.0,
            tokens: 0,
            skipped: Vec::new(),
        };
        (model, None, state)
    };
    if cli.validate_every == 0 || cli.checkpoint_every == 0 {
        return Err("--validate-every and --checkpoint-every must be positive".into());
    }
    state.control = RunControl {
        steps: cli.steps,
        validate_every: cli.validate_every,
        generate_every: cli.generate_every,
        generate_length: cli.generate_length,
        prime_length: cli.prime_length,
        temperature: cli.temperature,
        checkpoint_every: cli.checkpoint_every,
        skip_nonfinite: cli.skip_nonfinite,
        max_skipped_steps: cli.max_skipped_steps,
    };
    let settings = state.settings.clone();
    if settings.seq_len < 2 || settings.batch_size == 0 || settings.grad_accum == 0 {
        return Err("--seq-len must be at least 2, --batch-size and --grad-accum positive".into());
    }
    let per_rank_batch = dist.per_rank_batch(settings.batch_size)?;
    let out_dir = cli
        .out
        .clone()
        .or_else(|| cli.resume.clone())
        .unwrap_or_else(|| PathBuf::from("runs/train_lm"));

    // Data.
    let (bytes, name) = read_data(settings.data.as_deref())?;
    let fingerprint = fnv1a(&bytes);
    if cli.resume.is_some()
        && (bytes.len(), &fingerprint) != (settings.data_bytes, &settings.data_fnv1a)
    {
        eprintln!(
            "train_lm: warning: the data changed since the checkpoint ({} bytes, fnv1a {} then; {} bytes, {} now); the run will not match an uninterrupted one",
            settings.data_bytes,
            settings.data_fnv1a,
            bytes.len(),
            fingerprint
        );
    }
    dist.check_same_data(&fingerprint)?;
    state.settings.data_bytes = bytes.len();
    state.settings.data_fnv1a = fingerprint;
    let corpus = split(bytes, name);
    let window = settings.seq_len + 1;
    if corpus.train.len() <= window || corpus.val.len() < window {
        return Err(format!(
            "{}: too short for windows of {window} bytes (--seq-len {})",
            corpus.description, settings.seq_len
        )
        .into());
    }
    let val_offsets = val_offsets(corpus.val.len(), window, settings.val_windows.max(1));
    if let Some(n) = cli.eval_align
        && (n == 0 || n % settings.seq_len != 0 || n + 1 > corpus.val.len())
    {
        return Err(format!(
            "--eval-align {n}: must be a positive multiple of --seq-len {} and at most {} (the validation split less one byte)",
            settings.seq_len,
            corpus.val.len() - 1
        )
        .into());
    }

    // The model on its device before the optimizer sees its parameters (their ids stay, so a
    // resumed optimizer state finds them; Adam uploads the moments at its first step).
    model
        .net
        .to_device(cli.device)
        .map_err(|e| format!("--device {}: moving the model: {e}", cli.device))?;

    // Optimizer (over the PerformerLM's names, as the checkpoint stores them).
    let params: Vec<_> = model.net.parameters();
    let schedule = settings.schedule()?;
    let mut opt = if settings.weight_decay > 0.0 {
        let mut opt = Adam::adamw(model.net.named_parameters(), settings.lr);
        opt.weight_decay = settings.weight_decay;
        opt.exclude_from_weight_decay(|_, p| p.shape().len() < 2);
        opt
    } else {
        Adam::new(model.net.named_parameters(), settings.lr)
    };
    if let Some(s) = &opt_state {
        opt.load_state_dict(s)?;
    }
    // Every rank from rank 0's weights, optimizer and trainer state.
    dist.start(&model, &mut opt, &mut state, params.clone(), cli.bucket_mb)?;
    rng::set_state(RngState(state.global_rng));
    let mut sampler = Generator::from_state(RngState(state.sampler_rng));
    model.set_training(true);

    let config = model.net.config().clone();
    let n_params = model.net.num_parameters();
    let tokens_per_step = (settings.batch_size * settings.grad_accum * settings.seq_len) as u64;
    println!("data:  {}", corpus.description);
    println!(
        "model: PerformerLM causal, dim {}, depth {}, heads {}, dim_head {}, nb_features {}, max_seq_len {}: {:.2}M parameters; attention: {}",
        config.dim,
        config.depth,
        config.heads,
        config.dim_head,
        config.nb_features.unwrap_or(0),
        config.max_seq_len,
        n_params as f64 / 1e6,
        describe_attention(&config)
    );
    println!(
        "train: steps {} -> {}, batch {} x {} accumulated x seq {} ({} tokens/step), {}, clip {}, seed {}, {} threads",
        state.step,
        cli.steps,
        settings.batch_size,
        settings.grad_accum,
        settings.seq_len,
        tokens_per_step,
        describe_optimizer(&settings, &schedule),
        settings.clip,
        settings.seed,
        rayon::current_num_threads()
    );
    if let Some(line) = dist.describe(per_rank_batch) {
        println!("{line}");
    }
    if !cli.device.is_cpu() {
        println!("device: {}", cli.device);
    }
    println!("out:   {}", out_dir.display());

    let pb = ProgressBar::new(cli.steps);
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    pb.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} {bar:20.cyan/blue} step {pos}/{len} {wide_msg} eta {eta}",
        )?
        .progress_chars("=> "),
    );
    pb.set_position(state.step);
    pb.reset_eta();
    pb.enable_steady_tick(Duration::from_millis(500));

    let prime: Vec<u8> = corpus.val[..cli.prime_length.min(corpus.val.len())].to_vec();
    let mut session_train = Duration::ZERO;
    let mut session_tokens = 0u64;
    let mut last_val = state.val.last().map(|p| p.bpb);
    let mut last_saved = None;
    let mut last_sample = String::new();
    // The checkpoint this session started from, if it resumed one.
    let resumed_at = cli.resume.is_some().then_some(state.step);
    let session_start = Instant::now();
    let status = |loss: f64, val: Option<f64>, tps: f64| {
        format!(
            "loss {loss:.3} | val {} | {tps:.0} tok/s",
            val.map_or("-".to_string(), |v| format!("{v:.3} bpb"))
        )
    };

    while state.step < cli.steps && !interrupted.load(Ordering::SeqCst) {
        let t0 = Instant::now();
        let step = state.step + 1;
        dist.begin_step(&model, step);
        let mut grads: Option<Gradients> = None;
        let mut loss_sum = 0.0f64;
        for micro in 0..settings.grad_accum {
            // The global batch, the same on every rank; this rank trains on its share.
            let x = sample_batch(&mut sampler, &corpus.train, settings.batch_size, window);
            let x = dist.my_rows(x)?;
            // The backward's products follow the forward's autocast choice. On a rayon worker:
            // a step of small ops runs 10-20% faster there than from this thread (`on_pool`),
            // and faster again with the other workers kept awake (`Dist::on_step_pool`).
            let loss = dist.on_step_pool(|| {
                performer::tensor::autocast::autocast_bf16(settings.amp, || {
                    model.loss(&x.view(), &SeqInputs::default())
                })
            })?;
            loss_sum += loss.item()? as f64;
            let last = micro + 1 == settings.grad_accum;
            grads = Some(dist.backward(&loss, grads.take(), last)?);
        }
        let mut grads = grads.expect("grad_accum >= 1");
        let (loss_sum, stop) = dist.agree(loss_sum, interrupted.load(Ordering::SeqCst))?;
        if stop {
            interrupted.store(true, Ordering::SeqCst);
        }
        if cli.inject_nonfinite_at == step {
            poison_gradients(&mut grads, &params)?;
        }
        let loss = loss_sum / settings.grad_accum as f64;
        // Checked before the update, so the weights and the optimizer never see it.
        let finite = check_finite_step(step, loss as f32, &model.net, &grads);
        if settings.clip > 0.0 {
            clip_grad_norm(&mut grads, &params, settings.clip);
        }
        if let Err(e) = finite {
            let what = e.to_string();
            let in_a_row = state
                .skipped
                .iter()
                .rev()
                .zip((1..step).rev())
                .take_while(|(s, expected)| *s == expected)
                .count() as u64;
            if !cli.skip_nonfinite || in_a_row + 1 > cli.max_skipped_steps {
                pb.finish_and_clear();
                let last_good = match last_saved.or(resumed_at) {
                    Some(s) => format!(
                        "the last checkpoint (step {s}) in {} is untouched",
                        out_dir.display()
                    ),
                    None => "no checkpoint was written in this run".to_string(),
                };
                let why = if cli.skip_nonfinite {
                    format!(
                        "{} non-finite steps in a row (--max-skipped-steps)",
                        in_a_row + 1
                    )
                } else {
                    "stopping (--skip-nonfinite skips such steps instead)".to_string()
                };
                return Err(format!("{what}; {why}; {last_good}").into());
            }
            state.skipped.push(step);
            pb.suspend(|| eprintln!("train_lm: {what}: update skipped (--skip-nonfinite)"));
        } else {
            opt.set_lr(schedule.lr(step));
            dist.on_step_pool(|| opt.step(&grads))?;
        }
        drop(grads);
        state.step = step;
        let dt = t0.elapsed();
        session_train += dt;
        session_tokens += tokens_per_step;
        state.train_seconds += dt.as_secs_f64();
        state.tokens += tokens_per_step;
        if loss.is_finite() {
            state.train.push(Point {
                step: state.step,
                bpb: loss / LN_2,
            });
        }
        let tps = session_tokens as f64 / session_train.as_secs_f64().max(1e-9);
        pb.set_position(state.step);
        pb.set_message(status(loss, last_val, tps));

        let last = state.step == cli.steps;
        if state.step % cli.validate_every == 0 || last {
            dist.check_synchronized(&model)?;
            let bpb = dist.evaluate(&val_offsets, |offsets| {
                evaluate(&model, &corpus.val, offsets, window, per_rank_batch)
            })?;
            last_val = Some(bpb);
            state.val.push(Point {
                step: state.step,
                bpb,
            });
            pb.set_message(status(loss, last_val, tps));
            let eta = pb.eta();
            pb.suspend(|| {
                println!(
                    "step {:>6}/{} | train loss {:.4} ({:.3} bpb) | val {:.4} bpb | lr {:.2e} | {:.0} tok/s | elapsed {} | eta {}",
                    state.step,
                    cli.steps,
                    loss,
                    loss / LN_2,
                    bpb,
                    schedule.lr(state.step),
                    tps,
                    human(session_start.elapsed()),
                    human(eta)
                )
            });
        }
        if dist.is_root()
            && ((cli.generate_every > 0 && state.step % cli.generate_every == 0) || last)
        {
            let text = sample_text(
                &model,
                &prime,
                cli.generate_length,
                cli.temperature,
                settings.seed ^ state.step,
            )?;
            pb.suspend(|| {
                println!(
                    "--- sample at step {} (prime: {:?}) ---\n{}{}\n---",
                    state.step,
                    printable(&prime),
                    printable(&prime),
                    text
                )
            });
            last_sample = format!("{}{text}", printable(&prime));
        }
        if state.step % cli.checkpoint_every == 0 || last || interrupted.load(Ordering::SeqCst) {
            state.global_rng = rng::get_state().0;
            state.sampler_rng = sampler.state().0;
            if dist.is_root() {
                save_checkpoint(&out_dir, &model, &opt, &state)?;
            }
            last_saved = Some(state.step);
        }
    }
    pb.finish_and_clear();
    if interrupted.load(Ordering::SeqCst) {
        println!(
            "interrupted at step {}: checkpoint in {} (continue with --resume {})",
            state.step,
            out_dir.display(),
            out_dir.display()
        );
        return Ok(Outcome::Interrupted(state));
    }
    if last_saved != Some(state.step) {
        // Nothing ran (already at --steps): still leave a checkpoint and plot.
        state.global_rng = rng::get_state().0;
        state.sampler_rng = sampler.state().0;
        if dist.is_root() {
            save_checkpoint(&out_dir, &model, &opt, &state)?;
        }
    }

    // Summary.
    let tail = &state.train[state.train.len().saturating_sub(20)..];
    let tail_mean = tail.iter().map(|p| p.bpb).sum::<f64>() / tail.len().max(1) as f64;
    println!("\n=== summary ===");
    println!(
        "steps:            {} ({} this session, {} training, {:.0} tokens/s)",
        state.step,
        human(session_start.elapsed()),
        human(session_train),
        session_tokens as f64 / session_train.as_secs_f64().max(1e-9)
    );
    if let Some(c) = dist.stats().filter(|c| c.steps > 0) {
        let per_step = |d: Duration| d.as_secs_f64() * 1e3 / c.steps as f64;
        println!(
            "communication:    {:.1}% of training time ({:.2} ms/step exposed after the backward, \
             {:.2} ms/step inside it; {} of {} buckets started during the backward)",
            100.0 * c.total().as_secs_f64() / session_train.as_secs_f64().max(1e-9),
            per_step(c.exposed),
            per_step(c.in_backward),
            c.overlapped_buckets,
            c.buckets
        );
    }
    if let (Some(first), Some(_)) = (state.train.first(), state.train.last()) {
        println!(
            "train loss:       {:.3} bpb at step {} -> {:.3} bpb (mean of the last {})",
            first.bpb,
            first.step,
            tail_mean,
            tail.len()
        );
    }
    if let Some(v) = state.val.last() {
        println!(
            "validation:       {:.4} bpb at step {} ({} fixed windows)",
            v.bpb,
            v.step,
            val_offsets.len()
        );
    }
    let mut val_all = None;
    let mut val_all_bytes = 0;
    if !cli.no_final_eval {
        let predicted = cli.eval_align.map(|n| (corpus.val.len() - 1) / n * n);
        let offsets = full_offsets(corpus.val.len(), window, predicted);
        let t = Instant::now();
        let bpb = dist.evaluate(&offsets, |offsets| {
            evaluate(&model, &corpus.val, offsets, window, per_rank_batch)
        })?;
        val_all_bytes = offsets.len() * settings.seq_len;
        println!(
            "validation (all): {bpb:.4} bpb over {} windows, {val_all_bytes} bytes predicted ({})",
            offsets.len(),
            human(t.elapsed())
        );
        val_all = Some(bpb);
    }
    if let Some(path) = cli.report.as_ref().filter(|_| dist.is_root()) {
        let report = RunReport {
            settings: state.settings.clone(),
            model: config.clone(),
            parameters: n_params,
            steps: state.step,
            val: state.val.clone(),
            val_all,
            val_all_bytes,
            tokens_per_second: session_tokens as f64 / session_train.as_secs_f64().max(1e-9),
            sample: last_sample.clone(),
            device: params
                .first()
                .map(|p| p.device().to_string())
                .unwrap_or_default(),
        };
        write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())
            .map_err(|e| format!("--report {}: {e}", path.display()))?;
    }
    println!("test split:       {} bytes, held out", corpus.test_len);
    println!("checkpoint:       {}", out_dir.display());
    println!("loss curve:       {}", out_dir.join(PLOT_FILE).display());
    println!(
        "sample from it:   cargo run --release --example generate -- {} --prompt \"...\"",
        out_dir.display()
    );
    Ok(Outcome::Finished(state))
}
