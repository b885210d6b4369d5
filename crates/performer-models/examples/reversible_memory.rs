//! Peak memory of a Performer stack's forward + backward against depth (issue 4's check):
//! `reversible_memory DEPTH [reversible 0/1] [n]`; run under `/usr/bin/time -f %M` (peak RSS).
//! dim 256, heads 4, dim_head 64, nb_features 256, causal, batch 1.

use performer_models::{Performer, PerformerConfig};
use performer_tensor::Tensor;

fn main() -> performer_tensor::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let depth: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let reversible = args.get(2).map(|s| s == "1").unwrap_or(true);
    let n: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(4096);
    performer_tensor::rng::manual_seed(0);
    let p = Performer::new(PerformerConfig {
        dim: 256,
        depth,
        heads: 4,
        dim_head: Some(64),
        nb_features: Some(256),
        causal: true,
        reversible,
        ..Default::default()
    })?;
    let x = Tensor::var(Tensor::randn(&[1, n, 256]).to_array());
    let out = p.forward(&x, None, None, None, None)?;
    let grads = out.sum_all().backward()?;
    println!(
        "depth {depth} reversible {reversible} n {n}: {} gradients",
        grads.len()
    );
    Ok(())
}
