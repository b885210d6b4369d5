//! Quick timing of FastAttention forward + backward at the benchmark shapes:
//! `cargo run --release -p performer-favor --example attn_timing -- [n] [causal 0/1] [reps] [chunk]`.
//!
//! Prints wall and process CPU time (user + system, all threads) per repetition: on a shared
//! machine the CPU time is the steadier guide.

use std::time::Instant;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use performer_favor::{FastAttention, FastAttentionConfig};
use performer_tensor::Tensor;

/// Process CPU seconds (user, system) so far.
fn cpu_seconds() -> (f64, f64) {
    // SAFETY: getrusage writes the struct it is given.
    let ru = unsafe {
        let mut ru = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    (secs(ru.ru_utime), secs(ru.ru_stime))
}

fn main() -> performer_tensor::Result<()> {
    // Never hand freed memory back to the OS (mimalloc.h's mi_option_purge_delay = -1): page
    // faults into fresh memory would otherwise cost as much as the computation here.
    // SAFETY: sets an allocator option.
    unsafe { libmimalloc_sys::mi_option_set(15, -1) };
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(4096);
    let causal = args.get(2).map(|s| s == "1").unwrap_or(true);
    let reps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
    let chunk: usize = args
        .get(4)
        .and_then(|s| s.parse().ok())
        .unwrap_or(performer_favor::DEFAULT_CHUNK);
    performer_tensor::rng::manual_seed(0);
    let mut attn = FastAttention::new(FastAttentionConfig {
        nb_features: Some(256),
        causal,
        ..FastAttentionConfig::new(64)
    })?;
    attn.set_chunk_size(chunk)?;
    let shape = [1, 8, n, 64];
    let (q, k, v) = (
        Tensor::var(Tensor::randn(&shape).to_array()),
        Tensor::var(Tensor::randn(&shape).to_array()),
        Tensor::var(Tensor::randn(&shape).to_array()),
    );
    let (mut walls, mut cpus) = (Vec::new(), Vec::new());
    for r in 0..=reps {
        let (u0, s0) = cpu_seconds();
        let t = Instant::now();
        let out = attn.forward(&q, &k, &v)?;
        let t_fwd = t.elapsed();
        let g = out.sum_all().backward()?;
        let total = t.elapsed();
        std::hint::black_box(g);
        let (u1, s1) = cpu_seconds();
        let (user, sys) = ((u1 - u0) * 1e3, (s1 - s0) * 1e3);
        if r > 0 {
            walls.push(total.as_secs_f64() * 1e3);
            cpus.push(user + sys);
        }
        eprintln!(
            "rep {r}: forward {:.1} ms, total {:.1} ms wall; cpu {user:.1} user + {sys:.1} sys ms",
            t_fwd.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3,
        );
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let min_cpu = cpus.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "n {n} causal {causal} chunk {chunk}: median {:.1} ms wall, {:.1} ms cpu (min {min_cpu:.1})",
        median(&mut walls),
        median(&mut cpus)
    );
    Ok(())
}
