use ndarray::Array2;
use performer_models::{PerformerLM, PerformerLMConfig};
use performer_tensor::Module;
use std::time::Instant;
fn main() -> performer_tensor::Result<()> {
    performer_tensor::rng::manual_seed(0);
    let lm = PerformerLM::new(PerformerLMConfig {
        num_tokens: 256,
        max_seq_len: 2048,
        dim: 256,
        depth: 4,
        heads: 4,
        dim_head: 64,
        nb_features: Some(256),
        causal: true,
        ..Default::default()
    })?;
    lm.set_training(false);
    let mut g = performer_tensor::rng::Generator::seeded(1);
    let prompt = Array2::from_shape_simple_fn((1, 512), || g.below(256) as i64);
    let reps: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(30);
    let mut times = vec![];
    for _ in 0..reps {
        let mut state = lm.decoding_state(1, None, None)?;
        let t = Instant::now();
        lm.decode(&mut state, &prompt.view(), None)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("prime median {:.1} ms min {:.1}", times[reps / 2], times[0]);
    Ok(())
}
