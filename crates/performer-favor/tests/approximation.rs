//! FAVOR+ approximates softmax attention (Performer paper, Fig. 4): the error against exact
//! attention falls as the number of random features grows, and orthogonal features beat
//! independent ones at equal count. Both are asserted on averages over seeds.

use ndarray::{Array2, ArrayD, IxDyn};
use performer_favor::{
    OrthoScaling, gaussian_orthogonal_random_matrix_with, linear_attention, softmax_kernel,
};
use performer_tensor::rng::Generator;
use performer_tensor::{Tensor, no_grad};

const D: usize = 16;
const N: usize = 48;

fn randn(shape: &[usize], g: &mut Generator, scale: f32) -> ArrayD<f32> {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || scale * g.normal())
}

/// Exact softmax attention `softmax(q k^T / sqrt d) v` for one head.
fn exact(q: &ArrayD<f32>, k: &ArrayD<f32>, v: &ArrayD<f32>) -> ArrayD<f32> {
    let qt = Tensor::new(q.clone());
    let kt = Tensor::new(k.clone());
    let scores = qt
        .matmul(&kt.transpose(-1, -2).unwrap())
        .unwrap()
        .mul_scalar((D as f32).powf(-0.5));
    scores
        .softmax(-1)
        .unwrap()
        .matmul(&Tensor::new(v.clone()))
        .unwrap()
        .to_array()
}

fn favor(q: &ArrayD<f32>, k: &ArrayD<f32>, v: &ArrayD<f32>, proj: Array2<f32>) -> ArrayD<f32> {
    let p = Tensor::new(proj.into_dyn());
    let qf = softmax_kernel(&Tensor::new(q.clone()), &p, true, true, 1e-4).unwrap();
    let kf = softmax_kernel(&Tensor::new(k.clone()), &p, false, true, 1e-4).unwrap();
    linear_attention(&qf, &kf, &Tensor::new(v.clone()))
        .unwrap()
        .to_array()
}

fn iid(m: usize, g: &mut Generator) -> Array2<f32> {
    Array2::from_shape_simple_fn((m, D), || g.normal())
}

fn mse(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64
}

/// Mean squared error over `seeds` draws of inputs and features.
fn mean_error(m: usize, orthogonal: bool, seeds: u64) -> f64 {
    no_grad(|| {
        (0..seeds)
            .map(|s| {
                let mut g = Generator::seeded(1000 + s);
                let shape = [1, 1, N, D];
                let (q, k, v) = (
                    randn(&shape, &mut g, 0.6),
                    randn(&shape, &mut g, 0.6),
                    randn(&shape, &mut g, 1.0),
                );
                let proj = if orthogonal {
                    gaussian_orthogonal_random_matrix_with(m, D, OrthoScaling::Gaussian, &mut g)
                        .unwrap()
                } else {
                    iid(m, &mut g)
                };
                mse(&favor(&q, &k, &v, proj), &exact(&q, &k, &v))
            })
            .sum::<f64>()
            / seeds as f64
    })
}

#[test]
fn error_falls_as_features_grow() {
    let errors: Vec<f64> = [8, 32, 128, 512]
        .iter()
        .map(|&m| mean_error(m, true, 24))
        .collect();
    println!("MSE vs exact softmax attention for m = 8, 32, 128, 512: {errors:?}");
    for w in errors.windows(2) {
        assert!(w[1] < w[0], "error did not fall: {errors:?}");
    }
    assert!(errors[3] < errors[0] / 8.0, "{errors:?}");
}

#[test]
fn orthogonal_features_beat_iid_features() {
    for m in [16, 64] {
        let (ortho, indep) = (mean_error(m, true, 64), mean_error(m, false, 64));
        println!("m = {m}: orthogonal {ortho:.3e}, iid {indep:.3e}");
        assert!(ortho < indep, "m = {m}: orthogonal {ortho} vs iid {indep}");
    }
}
