//! Time of one training step of the lm-causal-1k model of BENCHMARKS.md (1025 tokens -> loss,
//! backward, Adam step): `MIMALLOC_PURGE_DELAY=-1 lm_step_timing [causal 0/1] [reps]` (mimalloc,
//! told not to return freed memory, so the timing is not one of page faults).

use std::time::Instant;

use ndarray::Array2;
use performer_models::{AutoregressiveWrapper, PerformerLM, PerformerLMConfig, SeqInputs};
use performer_tensor::Module;
use performer_tensor::optim::{Adam, Optimizer};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> performer_tensor::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let causal = args.get(1).map(|s| s == "1").unwrap_or(true);
    let reps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    performer_tensor::rng::manual_seed(0);
    let lm = PerformerLM::new(PerformerLMConfig {
        num_tokens: 256,
        max_seq_len: 1024,
        dim: 256,
        depth: 4,
        heads: 4,
        dim_head: 64,
        nb_features: Some(256),
        causal,
        ..Default::default()
    })?;
    let model = AutoregressiveWrapper::new(lm);
    let mut opt = Adam::new(model.named_parameters(), 1e-4);
    let mut g = performer_tensor::rng::Generator::seeded(1);
    let x = Array2::from_shape_simple_fn((1, 1025), || g.below(256) as i64);
    let mut times = Vec::new();
    for r in 0..=reps {
        let t = Instant::now();
        let loss = model.loss(&x.view(), &SeqInputs::default())?;
        let t_fwd = t.elapsed();
        let grads = loss.backward()?;
        let t_bwd = t.elapsed();
        opt.step(&grads)?;
        let total = t.elapsed();
        eprintln!(
            "rep {r}: forward {:.1} ms, +backward {:.1} ms, total {:.1} ms",
            t_fwd.as_secs_f64() * 1e3,
            t_bwd.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3
        );
        if r > 0 {
            times.push(total.as_secs_f64() * 1e3);
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let med = times[times.len() / 2];
    println!(
        "lm causal {causal}: median {med:.1} ms/step, {:.0} tok/s",
        1024.0 / (med / 1e3)
    );
    Ok(())
}
