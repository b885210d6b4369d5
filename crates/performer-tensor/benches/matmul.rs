//! Matrix products at the model's shapes: ours (`Tensor::matmul`, `gemm::matmul2`,
//! `ops::batched_matmul`) against ndarray's default `dot`, the `gemm` crate called directly and
//! faer's matmul, all on all cores. Throughput is reported in elements/s where one element is
//! one floating-point operation (2 m n k per product), so `Gelem/s` reads as GFLOP/s.
//!
//! ```sh
//! cargo bench -p performer-tensor --bench matmul
//! ```
//!
//! ndarray's `dot` runs on matrixmultiply, whose `threading` feature the dev-dependencies turn
//! on so that it, too, uses every core (`MATMUL_NUM_THREADS` overrides the count).

use std::hint::black_box;
use std::time::Duration;

use criterion::{
    BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime,
};
use ndarray::{Array2, Array3, Axis};
use performer_tensor::gemm::{Threads, matmul2};
use performer_tensor::rng::Generator;
use performer_tensor::{Tensor, ops::batched_matmul};
use rayon::prelude::*;

fn random(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
    let mut g = Generator::seeded(seed);
    Array2::from_shape_simple_fn((rows, cols), || g.normal())
}

/// `a @ b` through the `gemm` crate, row-major, into a new array.
fn gemm_crate(a: &Array2<f32>, b: &Array2<f32>, parallelism: gemm::Parallelism) -> Array2<f32> {
    let ((m, k), n) = (a.dim(), b.ncols());
    let mut c = Array2::<f32>::zeros((m, n));
    // SAFETY: the three arrays are contiguous row-major matrices of the stated sizes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    c
}

/// `a @ b` through faer, on row-major views of the same data, into a new (column-major) matrix.
fn faer_matmul(a: &Array2<f32>, b: &Array2<f32>, par: faer::Par) -> faer::Mat<f32> {
    let ((m, k), n) = (a.dim(), b.ncols());
    let av = faer::MatRef::from_row_major_slice(a.as_slice().unwrap(), m, k);
    let bv = faer::MatRef::from_row_major_slice(b.as_slice().unwrap(), k, n);
    let mut c = faer::Mat::<f32>::zeros(m, n);
    faer::linalg::matmul::matmul(c.as_mut(), faer::Accum::Replace, av, bv, 1.0f32, par);
    c
}

fn configure<'a>(c: &'a mut Criterion, name: &str, flops: u64) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Elements(flops));
    g
}

fn bench_2d(c: &mut Criterion, m: usize, k: usize, n: usize) {
    let (a, b) = (random(m, k, 1), random(k, n, 2));
    let (ta, tb) = (
        Tensor::new(a.clone().into_dyn()),
        Tensor::new(b.clone().into_dyn()),
    );
    let threads = rayon::current_num_threads();
    let mut g = configure(c, &format!("matmul_{m}x{k}x{n}"), 2 * (m * k * n) as u64);
    g.bench_function("ours_tensor_matmul", |x| {
        x.iter(|| black_box(ta.matmul(&tb).unwrap()))
    });
    g.bench_function("ours_gemm_matmul2", |x| {
        x.iter(|| black_box(matmul2(&a.view(), &b.view(), Threads::All).unwrap()))
    });
    g.bench_function("ndarray_dot", |x| x.iter(|| black_box(a.dot(&b))));
    g.bench_function("gemm_crate", |x| {
        x.iter(|| black_box(gemm_crate(&a, &b, gemm::Parallelism::Rayon(threads))))
    });
    g.bench_function("faer", |x| {
        x.iter(|| black_box(faer_matmul(&a, &b, faer::Par::rayon(threads))))
    });
    g.finish();
}

/// `batch` independent products `(m, k) @ (k, n)`. The baselines split the batch over rayon
/// with single-threaded kernels (as ours does when the batch outnumbers the threads); ndarray's
/// `dot` runs the batch in order with its own threads.
fn bench_batched(c: &mut Criterion, batch: usize, m: usize, k: usize, n: usize) {
    let mut gen_ = Generator::seeded(3);
    let a = Array3::from_shape_simple_fn((batch, m, k), || gen_.normal());
    let b = Array3::from_shape_simple_fn((batch, k, n), || gen_.normal());
    let (ta, tb) = (
        Tensor::new(a.clone().into_dyn()),
        Tensor::new(b.clone().into_dyn()),
    );
    let a2: Vec<Array2<f32>> = a.outer_iter().map(|x| x.to_owned()).collect();
    let b2: Vec<Array2<f32>> = b.outer_iter().map(|x| x.to_owned()).collect();
    let mut g = configure(
        c,
        &format!("matmul_{batch}x({m}x{k}x{n})"),
        2 * (batch * m * k * n) as u64,
    );
    g.bench_function("ours_tensor_matmul", |x| {
        x.iter(|| black_box(ta.matmul(&tb).unwrap()))
    });
    g.bench_function("ours_batched_matmul", |x| {
        x.iter(|| black_box(batched_matmul(&a.view().into_dyn(), &b.view().into_dyn()).unwrap()))
    });
    g.bench_function("ndarray_dot", |x| {
        x.iter(|| {
            let mut c = Array3::<f32>::zeros((batch, m, n));
            for (i, mut ci) in c.axis_iter_mut(Axis(0)).enumerate() {
                ndarray::linalg::general_mat_mul(1.0, &a2[i], &b2[i], 0.0, &mut ci);
            }
            black_box(c)
        })
    });
    g.bench_function("gemm_crate", |x| {
        x.iter(|| {
            let out: Vec<Array2<f32>> = (0..batch)
                .into_par_iter()
                .map(|i| gemm_crate(&a2[i], &b2[i], gemm::Parallelism::None))
                .collect();
            black_box(out)
        })
    });
    g.bench_function("faer", |x| {
        x.iter(|| {
            let out: Vec<faer::Mat<f32>> = (0..batch)
                .into_par_iter()
                .map(|i| faer_matmul(&a2[i], &b2[i], faer::Par::Seq))
                .collect();
            black_box(out)
        })
    });
    g.finish();
}

fn matmul(c: &mut Criterion) {
    bench_2d(c, 4096, 512, 2048);
    bench_2d(c, 4096, 2048, 512);
    bench_batched(c, 8, 4096, 64, 256);
}

criterion_group!(benches, matmul);
criterion_main!(benches);
