//! Quick timing of FastAttention forward + backward at the benchmark shapes:
//! `cargo run --release -p performer-favor --example attn_timing -- [n] [causal 0/1] [reps] [chunk]`.

use std::time::Instant;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use performer_favor::{FastAttention, FastAttentionConfig};
use performer_tensor::Tensor;

fn main() -> performer_tensor::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(4096);
    let causal = args.get(2).map(|s| s == "1").unwrap_or(true);
    let reps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
    let chunk: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(64);
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
    let mut times = Vec::new();
    for r in 0..=reps {
        let t = Instant::now();
        let out = attn.forward(&q, &k, &v)?;
        let t_fwd = t.elapsed();
        let g = out.sum_all().backward()?;
        let total = t.elapsed();
        std::hint::black_box(g);
        if r > 0 {
            times.push(total.as_secs_f64() * 1e3);
        }
        eprintln!(
            "rep {r}: forward {:.1} ms, total {:.1} ms",
            t_fwd.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3
        );
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "n {n} causal {causal} chunk {chunk}: median {:.1} ms",
        times[times.len() / 2]
    );
    Ok(())
}
