//! One benchmark workload of `BENCHMARKS.md`, timed in this process; `cargo xtask bench` runs it.
//!
//! ```text
//! cargo build --release --example bench_workload
//! target/release/examples/bench_workload --workload NAME [--n N] [--reps R] [--seed S] [--profile]
//!     [--main-thread]
//! target/release/examples/bench_workload --workload generate-512-bf16 --against-f32 [--seed S]
//! target/release/examples/bench_workload --list
//! ```
//!
//! The process builds its seeded inputs (not timed), runs one warm-up repetition, then `R` (default
//! 3) timed ones, and prints one JSON line on stdout:
//! `{"median_ms": .., "times_ms": [..], "tokens": .., "peak_rss_mib": ..}` (`peak_rss_mib` is this
//! process's own `VmHWM`, for standalone use; xtask measures it from outside with `wait4`).
//! Threads: rayon's global pool, sized by `RAYON_NUM_THREADS` (xtask sets it) or all cores.
//! Everything (building, timing, profiling) runs on one of its workers (`team::on_pool`), as
//! `train_lm` runs its steps; `--main-thread` runs it on the main thread instead.
//!
//! With `--profile`, `R` more repetitions run under the op timer of
//! `performer::tensor::profile` (after the timed ones, which it does not slow), followed by the
//! GEMM calibration product; the JSON line gains a `"profile"` object (rows by phase and
//! category, per-op times, GEMM FLOPs, the measured GEMM rate) that `cargo xtask bench
//! --profile` turns into a table.
//!
//! With `--against-f32` (generate-512-bf16 only) the process builds the workload's bf16 model
//! and the f32 model it is rounded from (the same seed, prompt and sampler options) and prints
//! `{"tokens_equal": .., "tokens": 64, "logits_max_rel_err": .., "pairs": 15, "f32_ms": ..,
//! "bf16_ms": ..}`: how many leading sampled tokens the two generations share, the worst
//! relative error (`max |bf16 - f32| / max |f32|`) of the bf16 logits over the prompt's last
//! position and the 64 steps, both models fed the f32 model's tokens, and the median times of
//! 15 generations of each model taking turns (each after an untimed one of the same model, so
//! that its weights are in the caches): the speed bar measured where both meet the same
//! stretches of the machine's speed. xtask runs it in a process of its own, after the
//! timed one, so that the f32 model adds nothing to the workload's peak RSS.
//!
//! Exit status: 0 measured; 2 bad arguments; 3 the workload is not implemented yet (the last
//! stderr line is `not implemented yet: REASON`; xtask shows `n/a` and the reason); 1 it failed.
//!
//! # Adding a workload
//!
//! Write one function `fn(n: usize) -> Result<Prepared, BenchError>` that builds the model and
//! inputs and returns a [`Prepared`]: the closure that runs one repetition and the tokens it
//! processes. Put it in [`WORKLOADS`] under the name `tools/bench_reference.py` and
//! `xtask/src/bench/workloads.rs` use (the shapes and FLOP counts live there).

use std::process::ExitCode;
use std::time::Instant;

use performer::tensor::profile::{self, Phase};
use performer::tensor::{Tensor, rng, team};

/// The allocator: mimalloc, told never to return freed memory to the OS. Every repetition
/// allocates its outputs and temporaries afresh (hundreds of MB for attn-causal-4k, GBs at 64k);
/// on these VMs a page fault into fresh memory costs about 1.5 ms per MB (the kernel zeroes 2 MB
/// huge pages), glibc's malloc serves every allocation over 32 MB with a fresh mmap, and
/// mimalloc by default purges freed memory after 10 ms. Either way the benchmark would time page
/// faults rather than the library (measured: 0.2 s of system time per repetition of
/// attn-causal-4k, about as much as the computation). Peak RSS is unaffected: it is the high
/// water mark either way.
#[global_allocator]
static ALLOC: ProfiledAlloc = ProfiledAlloc;

/// mimalloc, each call reported to the op timer's allocator row while `--profile` runs (one
/// relaxed load per call otherwise).
struct ProfiledAlloc;

// SAFETY: every method forwards to mimalloc's with the same arguments; the timer around the
// call only reads the clock and thread-local cells (it never allocates).
unsafe impl std::alloc::GlobalAlloc for ProfiledAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: forwarded from the caller's contract.
        profile::time_allocator(|| unsafe {
            std::alloc::GlobalAlloc::alloc(&mimalloc::MiMalloc, layout)
        })
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: forwarded from the caller's contract.
        profile::time_allocator(|| unsafe {
            std::alloc::GlobalAlloc::alloc_zeroed(&mimalloc::MiMalloc, layout)
        })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: forwarded from the caller's contract.
        profile::time_allocator(|| unsafe {
            std::alloc::GlobalAlloc::dealloc(&mimalloc::MiMalloc, ptr, layout)
        })
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        // SAFETY: forwarded from the caller's contract.
        profile::time_allocator(|| unsafe {
            std::alloc::GlobalAlloc::realloc(&mimalloc::MiMalloc, ptr, layout, new)
        })
    }
}

/// Sets mimalloc's purge delay to -1 (never purge).
fn keep_freed_memory() {
    // `mi_option_purge_delay` of mimalloc.h (v2 and v3), which the Rust binding does not name.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets an allocator option; mimalloc reads it when it next purges.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// One repetition of a workload, ready to run.
struct Prepared {
    /// Runs one repetition: forward, backward, optimizer step, sampling... Called once to warm
    /// up, then once per timed repetition; keep setup (weights, inputs) out of it.
    step: Box<dyn FnMut() -> Result<(), String>>,
    /// Tokens one repetition processes (sequence positions; sampled tokens for generation).
    tokens: usize,
}

/// Why a workload gives no measurement.
enum BenchError {
    /// The API it needs does not exist yet (every workload has one now; kept for new ones).
    #[allow(dead_code)]
    NotImplemented(String),
    /// Setup failed.
    Failed(String),
}

impl From<performer::tensor::Error> for BenchError {
    fn from(e: performer::tensor::Error) -> Self {
        BenchError::Failed(e.to_string())
    }
}

/// Builds a workload for length `n`.
type Builder = fn(usize) -> Result<Prepared, BenchError>;

/// Name, default `n` (`None`: `--n` is required), builder. The named workloads are the rows of
/// BENCHMARKS.md; `attn-noncausal` / `attn-causal` are the scaling sweep's families.
const WORKLOADS: &[(&str, Option<usize>, Builder)] = &[
    ("attn-noncausal-4k", Some(4096), attn_noncausal),
    ("attn-causal-1k", Some(1024), attn_causal),
    ("attn-causal-4k", Some(4096), attn_causal),
    ("attn-causal-64k", Some(65536), attn_causal),
    ("attn-noncausal", None, attn_noncausal),
    ("attn-causal", None, attn_causal),
    ("lm-causal-1k", Some(1024), lm_causal),
    ("lm-noncausal-1k", Some(1024), lm_noncausal),
    ("lm-full-1k", Some(1024), lm_full),
    ("lm-small-64", Some(64), lm_small),
    ("generate-512", Some(512), generate),
    ("generate-512-bf16", Some(512), generate_bf16),
    ("matmul-4k", Some(4096), matmul),
];

// ---------------------------------------------------------------------------------------------
// Workloads

/// FastAttention heads / head width / random features of the `attn-*` workloads.
const ATTN: (usize, usize, usize) = (8, 64, 256);

fn attn_noncausal(n: usize) -> Result<Prepared, BenchError> {
    attention(false, n)
}

fn attn_causal(n: usize) -> Result<Prepared, BenchError> {
    attention(true, n)
}

/// FastAttention(dim_heads 64, nb_features 256, causal) on q, k, v of shape (1, 8, n, 64) drawn
/// from the seeded generator; one repetition is the forward and the backward of `out.sum()`.
/// tokens = n.
fn attention(causal: bool, n: usize) -> Result<Prepared, BenchError> {
    use performer::{FastAttention, FastAttentionConfig};
    let (heads, dim_head, nb_features) = ATTN;
    let attn = FastAttention::new(FastAttentionConfig {
        nb_features: Some(nb_features),
        causal,
        ..FastAttentionConfig::new(dim_head)
    })?;
    let shape = [1, heads, n, dim_head];
    let [q, k, v] = [(); 3].map(|_| Tensor::var(Tensor::randn(&shape).to_array()));
    Ok(Prepared {
        step: Box::new(move || {
            let out = attn.forward(&q, &k, &v).map_err(|e| e.to_string())?;
            let grads = out.sum_all().backward().map_err(|e| e.to_string())?;
            std::hint::black_box(grads);
            Ok(())
        }),
        tokens: n,
    })
}

fn lm_causal(n: usize) -> Result<Prepared, BenchError> {
    lm_train(LmVariant::Causal, n)
}

fn lm_noncausal(n: usize) -> Result<Prepared, BenchError> {
    lm_train(LmVariant::NonCausal, n)
}

fn lm_full(n: usize) -> Result<Prepared, BenchError> {
    lm_train(LmVariant::Full, n)
}

fn lm_small(n: usize) -> Result<Prepared, BenchError> {
    lm_train(LmVariant::Small, n)
}

/// Sequences per step of lm-small-64.
const SMALL_BATCH: usize = 12;

/// Which PerformerLM a training workload builds.
#[derive(Clone, Copy, Debug, PartialEq)]
enum LmVariant {
    /// vocab 256, dim 256, depth 4, heads 4, dim_head 64, nb_features 256, causal.
    Causal,
    /// The same, non-causal.
    NonCausal,
    /// Causal + reversible, ff_glu, use_scalenorm, local_attn_heads 2 (window 256), shift_tokens.
    Full,
    /// The shape of a quick CPU run: dim 128, depth 4, heads 4, dim_head 32, nb_features 64,
    /// causal, shift_tokens, batch 12.
    Small,
}

/// PerformerLM (max_seq_len n) in an AutoregressiveWrapper; one repetition is the loss on a
/// batch of n + 1 seeded random tokens (1 sequence; 12 for lm-small-64), backward, an Adam step
/// (lr 1e-4) and zeroing the gradients. tokens = batch x n.
fn lm_train(variant: LmVariant, n: usize) -> Result<Prepared, BenchError> {
    use performer::models::{LocalAttnHeads, PerformerLMConfig};
    use performer::tensor::Module;
    use performer::tensor::optim::{Adam, Optimizer};
    use performer::{AutoregressiveWrapper, PerformerLM, SeqInputs};

    let base = lm_config(n, variant != LmVariant::NonCausal);
    let config = match variant {
        LmVariant::Causal | LmVariant::NonCausal => base,
        LmVariant::Full => PerformerLMConfig {
            reversible: true,
            ff_glu: true,
            use_scalenorm: true,
            local_attn_heads: LocalAttnHeads::All(2),
            local_window_size: 256,
            shift_tokens: true,
            ..base
        },
        LmVariant::Small => PerformerLMConfig {
            dim: 128,
            dim_head: 32,
            nb_features: Some(64),
            shift_tokens: true,
            ..base
        },
    };
    let batch = if variant == LmVariant::Small {
        SMALL_BATCH
    } else {
        1
    };
    let model = AutoregressiveWrapper::new(PerformerLM::new(config)?);
    model.set_training(true);
    let mut opt = Adam::new(model.named_parameters(), 1e-4);
    let x = random_tokens(batch, n + 1, 256);
    Ok(Prepared {
        // The other workers kept awake for the step, as train_lm runs its steps
        // (`team::keep_pool_warm`).
        step: Box::new(move || {
            team::keep_pool_warm(|| {
                let loss = model
                    .loss(&x.view(), &SeqInputs::default())
                    .map_err(|e| e.to_string())?;
                // The phases only matter to `--profile` (no-ops otherwise).
                profile::enter_phase(Phase::Backward);
                // Gradients are returned fresh by each backward: dropping them is zero_grad.
                let grads = loss.backward().map_err(|e| e.to_string())?;
                drop(loss); // the graph, freed before the update
                profile::enter_phase(Phase::Optimizer);
                opt.step(&grads).map_err(|e| e.to_string())
            })
        }),
        tokens: batch * n,
    })
}

/// The lm-* model shape: vocab 256, dim 256, depth 4, heads 4, dim_head 64, nb_features 256.
fn lm_config(max_seq_len: usize, causal: bool) -> performer::PerformerLMConfig {
    performer::PerformerLMConfig {
        num_tokens: 256,
        max_seq_len,
        dim: 256,
        depth: 4,
        heads: 4,
        dim_head: 64,
        nb_features: Some(256),
        causal,
        ..Default::default()
    }
}

/// `(batch, n)` tokens uniform in `0..vocab` from the global seeded generator.
fn random_tokens(batch: usize, n: usize, vocab: u64) -> ndarray::Array2<i64> {
    rng::with_rng(|g| ndarray::Array2::from_shape_simple_fn((batch, n), || g.below(vocab) as i64))
}

/// The lm-causal-1k model with max_seq_len 2048; one repetition primes with `prompt` random
/// tokens and samples 64 more (top-k, filter_thres 0.9). tokens = 64.
fn generate(prompt: usize) -> Result<Prepared, BenchError> {
    generate_stored(prompt, performer::tensor::DType::F32)
}

/// `generate` with the model's weights stored in bf16 (`PerformerLM::to_dtype`; f32
/// activations and sums): the same seeded weights, rounded, and the same prompt.
fn generate_bf16(prompt: usize) -> Result<Prepared, BenchError> {
    generate_stored(prompt, performer::tensor::DType::BF16)
}

fn generate_stored(prompt: usize, dtype: performer::tensor::DType) -> Result<Prepared, BenchError> {
    use performer::{AutoregressiveWrapper, GenerateOptions, PerformerLM, SeqInputs};

    const NEW_TOKENS: usize = 64;
    let net = PerformerLM::new(lm_config(2048, true))?;
    net.to_dtype(dtype);
    let model = AutoregressiveWrapper::new(net);
    let prime = random_tokens(1, prompt, 256);
    let opts = GenerateOptions::default(); // top-k, filter_thres 0.9, temperature 1
    Ok(Prepared {
        step: Box::new(move || {
            let out = model
                .generate(&prime.view(), NEW_TOKENS, &opts, &SeqInputs::default())
                .map_err(|e| e.to_string())?;
            if out.ncols() != NEW_TOKENS {
                return Err(format!(
                    "generated {} tokens, expected {NEW_TOKENS}",
                    out.ncols()
                ));
            }
            Ok(())
        }),
        tokens: NEW_TOKENS,
    })
}

/// `--against-f32`: generate-512-bf16's model and the f32 model it is rounded from (the seed
/// set by the caller, then the model, then the prompt, as `generate_stored` draws them) sample
/// `NEW_TOKENS` each with the default options; returns the JSON line with the leading tokens
/// they share and the worst relative error of the bf16 logits over the prompt's last position
/// and every step, both models fed the f32 model's tokens.
fn bf16_against_f32(prompt: usize) -> Result<String, String> {
    use performer::tensor::Module;
    use performer::tensor::testing::relative_error;
    use performer::{AutoregressiveWrapper, GenerateOptions, PerformerLM, SeqInputs};
    use std::sync::Arc;

    const NEW_TOKENS: usize = 64;
    let e = |e: performer::tensor::Error| e.to_string();
    let exact = Arc::new(PerformerLM::new(lm_config(2048, true)).map_err(e)?);
    let prime = random_tokens(1, prompt, 256);
    let rounded = Arc::new(PerformerLM::new(lm_config(2048, true)).map_err(e)?);
    rounded.load_state_dict(&exact.state_dict()).map_err(e)?;
    rounded.to_dtype(performer::tensor::DType::BF16);
    let opts = GenerateOptions::default();
    let generate = |net: &Arc<PerformerLM>| {
        AutoregressiveWrapper::new(Arc::clone(net))
            .generate(&prime.view(), NEW_TOKENS, &opts, &SeqInputs::default())
            .map_err(e)
    };
    let (a, b) = (generate(&exact)?, generate(&rounded)?);
    if a.dim() != (1, NEW_TOKENS) || b.dim() != a.dim() {
        return Err(format!("generated {:?} and {:?} tokens", a.dim(), b.dim()));
    }
    let tokens_equal = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    // The logits along the f32 model's tokens, step by step from the same prompt.
    exact.set_training(false);
    rounded.set_training(false);
    let (mut sa, mut sb) = (
        exact.decoding_state(1, None, None).map_err(e)?,
        rounded.decoding_state(1, None, None).map_err(e)?,
    );
    let mut la = exact.decode(&mut sa, &prime.view(), None).map_err(e)?;
    let mut lb = rounded.decode(&mut sb, &prime.view(), None).map_err(e)?;
    let mut worst = 0f32;
    for step in 0..=NEW_TOKENS {
        let err = relative_error(&lb, &la).map_err(|e| format!("step {step}: {e}"))?;
        worst = worst.max(err);
        if step == NEW_TOKENS {
            break;
        }
        la = exact.step(&mut sa, &[a[[0, step]]]).map_err(e)?;
        lb = rounded.step(&mut sb, &[a[[0, step]]]).map_err(e)?;
    }
    // Speed in this one process: the models take turns, the order flipping each pair, so
    // that both meet the same stretches of this VM's speed (the timed rows run in processes
    // minutes apart, and a slow stretch there moves their ratio by a third). Each turn
    // generates once untimed first, so that the timed generation finds its own weights in the
    // caches, as the timed rows' repetitions do, and not the other model's.
    let (mut f32_ms, mut bf16_ms) = (Vec::new(), Vec::new());
    for pair in 0..INTERLEAVED_PAIRS {
        for bf16_turn in [pair % 2 == 1, pair % 2 == 0] {
            let net = if bf16_turn { &rounded } else { &exact };
            generate(net)?;
            let start = Instant::now();
            generate(net)?;
            let ms = start.elapsed().as_secs_f64() * 1e3;
            match bf16_turn {
                true => bf16_ms.push(ms),
                false => f32_ms.push(ms),
            }
        }
    }
    let (f32_ms, bf16_ms) = (median(&f32_ms), median(&bf16_ms));
    Ok(format!(
        "{{\"tokens_equal\": {tokens_equal}, \"tokens\": {NEW_TOKENS}, \"logits_max_rel_err\": {worst:.6e}, \"pairs\": {INTERLEAVED_PAIRS}, \"f32_ms\": {f32_ms:.4}, \"bf16_ms\": {bf16_ms:.4}}}"
    ))
}

/// Generations of each model, alternating, that `--against-f32` times.
const INTERLEAVED_PAIRS: usize = 15;

/// `(n x 512) @ (512 x 2048)` through performer-tensor: the machine's GEMM floor in the same run,
/// and the self-test of the benchmark pipeline. tokens = n.
fn matmul(n: usize) -> Result<Prepared, BenchError> {
    let a = Tensor::randn(&[n, 512]);
    let b = Tensor::randn(&[512, 2048]);
    Ok(Prepared {
        step: Box::new(move || {
            let c = a.matmul(&b).map_err(|e| e.to_string())?;
            std::hint::black_box(c);
            Ok(())
        }),
        tokens: n,
    })
}

#[allow(dead_code)]
fn not_implemented(why: &str) -> Result<Prepared, BenchError> {
    Err(BenchError::NotImplemented(why.to_string()))
}

// ---------------------------------------------------------------------------------------------
// Driver

struct Options {
    workload: String,
    n: Option<usize>,
    reps: usize,
    seed: u64,
    profile: bool,
    /// Run on the main thread instead of a rayon worker (to measure what `on_pool` changes).
    main_thread: bool,
    /// Compare the bf16 generation with f32's instead of timing it (see the module doc).
    against_f32: bool,
}

const USAGE: &str = "usage: bench_workload --workload NAME [--n N] [--reps R] [--seed S] [--profile] [--main-thread] [--against-f32] | --list";

fn parse_args() -> Result<Option<Options>, String> {
    let mut args = std::env::args().skip(1);
    let mut opts = Options {
        workload: String::new(),
        n: None,
        reps: 3,
        seed: 0,
        profile: false,
        main_thread: false,
        against_f32: false,
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--workload" => opts.workload = value("--workload")?,
            "--n" => opts.n = Some(value("--n")?.parse().map_err(|e| format!("--n: {e}"))?),
            "--reps" => {
                opts.reps = value("--reps")?
                    .parse()
                    .map_err(|e| format!("--reps: {e}"))?
            }
            "--seed" => {
                opts.seed = value("--seed")?
                    .parse()
                    .map_err(|e| format!("--seed: {e}"))?
            }
            "--profile" => opts.profile = true,
            "--main-thread" => opts.main_thread = true,
            "--against-f32" => opts.against_f32 = true,
            "--list" => return Ok(None),
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if opts.workload.is_empty() {
        return Err(format!("--workload is required\n{USAGE}"));
    }
    if opts.reps == 0 {
        return Err("--reps must be at least 1".into());
    }
    if opts.against_f32 && opts.workload != "generate-512-bf16" {
        return Err(format!(
            "--against-f32 compares generate-512-bf16 with f32, not {}",
            opts.workload
        ));
    }
    Ok(Some(opts))
}

/// `reps` more repetitions under the op timer (after the timed ones), then the GEMM rate of
/// this machine measured in the same process (the matmul-4k product, median of 3 after a
/// warm-up). Returns the JSON object `{"reps", "step_ms": [..], "rows": [..], "ops": [..],
/// "gemm_flops_all_threads", "gemm_gflops"}` with the rows summed over the repetitions.
fn profile_steps(prepared: &mut Prepared, reps: usize) -> Result<String, String> {
    use std::collections::BTreeMap;
    let mut rows: BTreeMap<(Phase, &'static str), [u64; 4]> = BTreeMap::new();
    let mut ops: BTreeMap<(Phase, &'static str), [u64; 2]> = BTreeMap::new();
    let mut gemm_all = 0;
    let mut step_ms = Vec::new();
    for _ in 0..reps {
        let start = Instant::now();
        profile::start();
        let result = (prepared.step)();
        let report = profile::stop();
        step_ms.push(start.elapsed().as_secs_f64() * 1e3);
        result?;
        for r in report.rows {
            let acc = rows.entry((r.phase, r.category.name())).or_default();
            for (a, v) in acc.iter_mut().zip([r.ns, r.calls, r.bytes, r.flops]) {
                *a += v;
            }
        }
        for o in report.ops {
            let acc = ops.entry((o.phase, o.name)).or_default();
            acc[0] += o.ns;
            acc[1] += o.calls;
        }
        gemm_all += report.gemm_flops_all_threads;
    }
    let mut calibration = matmul(4096).map_err(|_| "the GEMM calibration failed to build")?;
    let mut gemm_ms = Vec::new();
    for rep in 0..4 {
        let start = Instant::now();
        (calibration.step)()?;
        if rep > 0 {
            gemm_ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let gemm_gflops = 2.0 * 4096.0 * 512.0 * 2048.0 / (median(&gemm_ms) * 1e6);
    let rows: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|((phase, category), [ns, calls, bytes, flops])| {
            serde_json::json!({"phase": phase.name(), "category": category, "ns": ns,
                "calls": calls, "bytes": bytes, "flops": flops})
        })
        .collect();
    let ops: Vec<serde_json::Value> = ops
        .into_iter()
        .map(|((phase, name), [ns, calls])| {
            serde_json::json!({"phase": phase.name(), "name": name, "ns": ns, "calls": calls})
        })
        .collect();
    Ok(
        serde_json::json!({"reps": reps, "step_ms": step_ms, "rows": rows, "ops": ops,
        "gemm_flops_all_threads": gemm_all, "gemm_gflops": gemm_gflops})
        .to_string(),
    )
}

fn median(times: &[f64]) -> f64 {
    let mut v = times.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        0.5 * (v[mid - 1] + v[mid])
    }
}

/// This process's peak resident set (`VmHWM`), MiB, where /proc has it.
fn own_peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

fn main() -> ExitCode {
    keep_freed_memory();
    let opts = match parse_args() {
        Ok(Some(opts)) => opts,
        Ok(None) => {
            for (name, _, _) in WORKLOADS {
                println!("{name}");
            }
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("bench_workload: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(&(name, default_n, build)) =
        WORKLOADS.iter().find(|(name, _, _)| *name == opts.workload)
    else {
        let known: Vec<&str> = WORKLOADS.iter().map(|w| w.0).collect();
        eprintln!(
            "bench_workload: unknown workload {:?}; known: {}",
            opts.workload,
            known.join(", ")
        );
        return ExitCode::from(2);
    };
    let Some(n) = opts.n.or(default_n) else {
        eprintln!("bench_workload: workload {name} needs --n");
        return ExitCode::from(2);
    };

    if opts.main_thread {
        return run(name, n, build, opts);
    }
    // The model, its steps and the profiler all on one rayon worker, as train_lm runs its
    // steps (`on_pool`): from the main thread every parallel op would hand its whole loop to
    // the workers and sleep, a third thread on two cores.
    team::on_pool(move || run(name, n, build, opts))
}

/// Builds the workload, runs its repetitions and prints the JSON line.
fn run(name: &'static str, n: usize, build: Builder, opts: Options) -> ExitCode {
    rng::manual_seed(opts.seed);
    if opts.against_f32 {
        return match bf16_against_f32(n) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("bench_workload: {name} --against-f32: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let mut prepared = match build(n) {
        Ok(p) => p,
        Err(BenchError::NotImplemented(why)) => {
            eprintln!("not implemented yet: {why}");
            return ExitCode::from(3);
        }
        Err(BenchError::Failed(why)) => {
            eprintln!("bench_workload: {name}: setup failed: {why}");
            return ExitCode::FAILURE;
        }
    };

    let mut times_ms = Vec::with_capacity(opts.reps);
    for rep in 0..=opts.reps {
        let start = Instant::now();
        if let Err(e) = (prepared.step)() {
            eprintln!("bench_workload: {name}: repetition {rep} failed: {e}");
            return ExitCode::FAILURE;
        }
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if rep > 0 {
            times_ms.push(ms); // rep 0 is the warm-up
        }
    }

    let profile_json = if opts.profile {
        match profile_steps(&mut prepared, opts.reps) {
            Ok(p) => format!(", \"profile\": {p}"),
            Err(e) => {
                eprintln!("bench_workload: {name}: profiled repetition failed: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        String::new()
    };

    let times: Vec<String> = times_ms.iter().map(|t| format!("{t:.6}")).collect();
    let rss = own_peak_rss_mib().map_or(String::new(), |m| format!(", \"peak_rss_mib\": {m:.3}"));
    println!(
        "{{\"median_ms\": {:.6}, \"times_ms\": [{}], \"tokens\": {}{rss}{profile_json}}}",
        median(&times_ms),
        times.join(", "),
        prepared.tokens
    );
    ExitCode::SUCCESS
}
