//! Per-token decoding cost against position, on the lm-causal-1k model of BENCHMARKS.md
//! (vocab 256, dim 256, depth 4, heads 4, dim_head 64, nb_features 256) with max_seq_len 4160:
//! primes 512 tokens, times 64 steps; continues to position 4096, times 64 steps again.
//! `cargo run --release -p performer-models --example decode_timing [-- --bf16] [--large]`
//! (`--bf16`: the same model with its weights stored in bf16, `PerformerLM::to_dtype`;
//! `--large`: dim 1024, depth 8, 16 heads, 101M parameters, whose f32 weights (405 MB)
//! are far larger than the L3 cache, so that each step reads them from memory; the steps are
//! then timed at position 512 only).
//!
//! One untimed prompt pass first (it makes the weights' cached transposes), then the timed
//! one; the allocator is mimalloc, as in `bench_workload`.

use std::time::Instant;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// CPU seconds used by this process so far (all threads): wall time is unreliable on a shared
/// machine, CPU time much less so.
fn cpu_seconds() -> f64 {
    // SAFETY: rusage is plain integers, for which all-zero bytes are a valid value.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given, which outlives the call.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

use ndarray::Array2;
use performer_models::{PerformerLM, PerformerLMConfig};
use performer_tensor::Module;

fn main() -> performer_tensor::Result<()> {
    // On a rayon worker, as `generate` runs: the caller and the team's helper are then the
    // pool's own threads, one per core (`performer_tensor::team::on_pool`).
    performer_tensor::team::on_pool(measure)
}

fn measure() -> performer_tensor::Result<()> {
    performer_tensor::rng::manual_seed(0);
    let large = std::env::args().any(|a| a == "--large");
    let (dim, depth) = if large { (1024, 8) } else { (256, 4) };
    let lm = PerformerLM::new(PerformerLMConfig {
        num_tokens: 256,
        max_seq_len: 4160,
        dim,
        depth,
        heads: dim / 64,
        dim_head: 64,
        nb_features: Some(256),
        causal: true,
        ..Default::default()
    })?;
    lm.set_training(false);
    println!("{} parameters", lm.num_parameters());
    if std::env::args().any(|a| a == "--bf16") {
        lm.to_dtype(performer_tensor::DType::BF16);
        println!("weights stored in bf16");
    }
    let mut g = performer_tensor::rng::Generator::seeded(1);
    let prompt = Array2::from_shape_simple_fn((1, 512), || g.below(256) as i64);
    lm.decode(&mut lm.decoding_state(1, None, None)?, &prompt.view(), None)?;
    let mut state = lm.decoding_state(1, None, None)?;
    let (t, c) = (Instant::now(), cpu_seconds());
    lm.decode(&mut state, &prompt.view(), None)?;
    let prime_ms = t.elapsed().as_secs_f64() * 1e3;
    let prime_cpu_ms = (cpu_seconds() - c) * 1e3;
    let time_steps = |state: &mut performer_models::DecodingState,
                      g: &mut performer_tensor::rng::Generator,
                      steps: usize|
     -> performer_tensor::Result<(f64, f64)> {
        let (t, c) = (Instant::now(), cpu_seconds());
        // The steps in one parallel region, as `generate` runs them.
        performer_tensor::team::with_team(|_| {
            for _ in 0..steps {
                lm.step(state, &[g.below(256) as i64])?;
            }
            Ok::<_, performer_tensor::Error>(())
        })?;
        Ok((
            t.elapsed().as_secs_f64() * 1e3 / steps as f64,
            (cpu_seconds() - c) * 1e3 / steps as f64,
        ))
    };
    let at_512 = time_steps(&mut state, &mut g, 64)?;
    println!("prime 512 tokens: {prime_ms:.1} ms wall, {prime_cpu_ms:.1} ms CPU");
    println!(
        "per token at position 512:  {:.3} ms wall, {:.3} ms CPU",
        at_512.0, at_512.1
    );
    println!(
        "generate-512 equivalent (prime + 64 steps): {:.1} tok/s wall",
        64.0 / ((prime_ms + 64.0 * at_512.0) / 1e3)
    );
    if large {
        return Ok(());
    }
    while state.position() < 4096 {
        lm.step(&mut state, &[g.below(256) as i64])?;
    }
    let at_4096 = time_steps(&mut state, &mut g, 64)?;
    println!(
        "per token at position 4096: {:.3} ms wall, {:.3} ms CPU",
        at_4096.0, at_4096.1
    );
    Ok(())
}
