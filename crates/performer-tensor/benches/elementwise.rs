//! Element-wise ops, softmax, layer_norm and reductions on tensors large enough to be split over
//! threads (4M elements, 16 MB: past the L2, as the model's activations are). Throughput is in
//! elements of the input per second.
//!
//! ```sh
//! cargo bench -p performer-tensor --bench elementwise
//! ```

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ndarray::{ArrayD, IxDyn};
use performer_tensor::Tensor;
use performer_tensor::rng::Generator;

const SHAPE: [usize; 3] = [8, 1024, 512];

fn randn(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut g = Generator::seeded(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || g.normal())
}

fn elementwise(c: &mut Criterion) {
    let n: usize = SHAPE.iter().product();
    let x = Tensor::new(randn(&SHAPE, 1));
    let y = Tensor::new(randn(&SHAPE, 2));
    let row = Tensor::new(randn(&SHAPE[2..], 3));
    let w = Tensor::new(randn(&SHAPE[2..], 4));
    let b = Tensor::new(randn(&SHAPE[2..], 5));
    let xv = Tensor::var(x.to_array());
    let seed = randn(&SHAPE, 6);

    let mut g = c.benchmark_group("elementwise");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("add", |t| t.iter(|| black_box(x.add(&y).unwrap())));
    g.bench_function("mul_broadcast_row", |t| {
        t.iter(|| black_box(x.mul(&row).unwrap()))
    });
    g.bench_function("mul_scalar", |t| t.iter(|| black_box(x.mul_scalar(1.5))));
    g.bench_function("exp", |t| t.iter(|| black_box(x.exp())));
    g.bench_function("gelu", |t| t.iter(|| black_box(x.gelu())));
    g.bench_function("gelu_tracked_fwd_bwd", |t| {
        t.iter(|| black_box(xv.gelu().backward_with_grad(seed.clone()).unwrap()))
    });
    g.bench_function("softmax_last", |t| {
        t.iter(|| black_box(x.softmax(-1).unwrap()))
    });
    g.bench_function("softmax_mid", |t| {
        t.iter(|| black_box(x.softmax(1).unwrap()))
    });
    g.bench_function("softmax_last_fwd_bwd", |t| {
        t.iter(|| {
            black_box(
                xv.softmax(-1)
                    .unwrap()
                    .backward_with_grad(seed.clone())
                    .unwrap(),
            )
        })
    });
    g.bench_function("log_softmax_last", |t| {
        t.iter(|| black_box(x.log_softmax(-1).unwrap()))
    });
    g.bench_function("layer_norm", |t| {
        t.iter(|| black_box(x.layer_norm(Some(&w), Some(&b), 1e-5).unwrap()))
    });
    g.bench_function("layer_norm_fwd_bwd", |t| {
        t.iter(|| {
            black_box(
                xv.layer_norm(Some(&w), Some(&b), 1e-5)
                    .unwrap()
                    .backward_with_grad(seed.clone())
                    .unwrap(),
            )
        })
    });
    g.bench_function("sum_last", |t| {
        t.iter(|| black_box(x.sum(&[-1], false).unwrap()))
    });
    g.bench_function("sum_first", |t| {
        t.iter(|| black_box(x.sum(&[0], false).unwrap()))
    });
    g.bench_function("sum_all", |t| t.iter(|| black_box(x.sum_all())));
    g.bench_function("mean_last_keepdim", |t| {
        t.iter(|| black_box(x.mean(&[-1], true).unwrap()))
    });
    g.bench_function("amax_last", |t| {
        t.iter(|| black_box(x.amax(&[-1], false).unwrap()))
    });
    let logits = Tensor::new(randn(&[8, 256, 2048], 7)); // (b, classes, n): 4M
    let target = ArrayD::from_shape_fn(IxDyn(&[8, 2048]), |ix| {
        ((ix[0] * 31 + ix[1] * 7) % 256) as i64
    });
    g.bench_function("cross_entropy", |t| {
        t.iter(|| black_box(logits.cross_entropy(&target.view(), Some(0)).unwrap()))
    });
    let lv = Tensor::var(logits.to_array());
    g.bench_function("cross_entropy_fwd_bwd", |t| {
        t.iter(|| {
            black_box(
                lv.cross_entropy(&target.view(), Some(0))
                    .unwrap()
                    .backward()
                    .unwrap(),
            )
        })
    });
    g.finish();
}

criterion_group!(benches, elementwise);
criterion_main!(benches);
