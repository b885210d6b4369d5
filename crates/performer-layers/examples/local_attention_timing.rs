//! Times LocalAttention's forward and forward + backward at lm-full-1k's shape (2 local heads
//! of 64 over 1024 positions, window 256, causal) and prints a checksum of the output and the
//! gradients' bits, so two builds can be compared for speed and for bit-exactness.
//!
//! ```text
//! cargo run --release -p performer-layers --example local_attention_timing -- [--reps R] [--noncausal] [--mask]
//! ```

use std::time::Instant;

use ndarray::{Array2, ArrayD, IxDyn};
use performer_layers::LocalAttention;
use performer_tensor::rng::Generator;
use performer_tensor::{Tensor, no_grad};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// FNV-1a over the bits of every value.
fn checksum(h: &mut u64, a: &ArrayD<f32>) {
    for x in a.iter() {
        for b in x.to_bits().to_le_bytes() {
            *h = (*h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(9);
    let causal = !args.iter().any(|a| a == "--noncausal");
    let with_mask = args.iter().any(|a| a == "--mask");
    let (heads, n, d, window) = (2, 1024, 64, 256);
    let la = LocalAttention::new(window, causal, 0.0, d).expect("valid configuration");
    let mut g = Generator::seeded(11);
    let mut input = || {
        Tensor::var(ArrayD::from_shape_simple_fn(
            IxDyn(&[1, heads, n, d]),
            || g.normal(),
        ))
    };
    let (q, k, v) = (input(), input(), input());
    let mask = Array2::from_shape_fn((1, n), |(_, j)| j < n - 100);
    let mask = with_mask.then(|| mask.view());
    let mut fwd = Vec::new();
    let mut both = Vec::new();
    let mut sums = [0xcbf2_9ce4_8422_2325u64; 4];
    for rep in 0..=reps {
        let t = Instant::now();
        let out = no_grad(|| la.forward(&q, &k, &v, mask)).expect("forward");
        let tf = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let out2 = la.forward(&q, &k, &v, mask).expect("forward");
        let grads = out2
            .mul(&out2)
            .expect("square")
            .sum_all()
            .backward()
            .expect("backward");
        let tb = t.elapsed().as_secs_f64() * 1e3;
        if rep == 0 {
            checksum(&mut sums[0], &out.to_array());
            for (sum, x) in sums[1..].iter_mut().zip([&q, &k, &v]) {
                checksum(sum, grads.get(x).expect("gradient"));
            }
        } else {
            fwd.push(tf);
            both.push(tb);
        }
    }
    println!(
        "local attention causal {causal} mask {with_mask}: forward {:.2} ms, forward+backward {:.2} ms (medians of {reps}); checksums (out, dq, dk, dv) {:04x?}",
        median(fwd),
        median(both),
        sums.map(|s| s as u16)
    );
}
