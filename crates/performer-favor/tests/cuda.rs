//! FastAttention on a CUDA device (feature `cuda`) against the CPU path: forward and input
//! gradients within 1e-4 of the largest magnitude, at GPU.md's shapes (lengths not a multiple of
//! the chunk, m in {64, 256, 266}, d in {32, 64, 128}). Without a driver the device tests say so
//! and the selection must fail with a clear error.
#![cfg(feature = "cuda")]

use ndarray::{ArrayD, IxDyn};
use performer_favor::{FastAttention, FastAttentionConfig};
use performer_tensor::Tensor;
use performer_tensor::rng::Generator;
use performer_tensor::testing::{assert_close, relative_error};

fn randn(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut g = Generator::seeded(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || 0.5 * g.normal())
}

#[test]
fn cuda_matches_the_cpu_path_or_reports_no_device() {
    let probe = FastAttention::new(FastAttentionConfig {
        nb_features: Some(64),
        ..FastAttentionConfig::new(32)
    })
    .unwrap();
    if !performer_cuda::driver_available() {
        let err = probe.use_cuda(0).unwrap_err();
        assert!(err.to_string().contains("driver"), "{err}");
        // performer-cuda's typed error is kept as the source, not flattened into a string.
        let source = std::error::Error::source(&err).expect("the CUDA error as the source");
        assert!(
            matches!(
                source.downcast_ref::<performer_cuda::Error>(),
                Some(performer_cuda::Error::DriverUnavailable { .. })
            ),
            "{source:?}"
        );
        assert!(!probe.uses_cuda());
        println!("SKIPPED: no CUDA driver on this machine; use_cuda fails with: {err}");
        return;
    }
    for (i, &(n, m, d, causal)) in [
        (100, 64, 32, true),
        (200, 256, 64, true),
        (130, 266, 128, false),
        (77, 256, 64, false),
        (1000, 266, 64, true),
    ]
    .iter()
    .enumerate()
    {
        performer_tensor::rng::manual_seed(i as u64);
        let fa = FastAttention::new(FastAttentionConfig {
            nb_features: Some(m),
            causal,
            ..FastAttentionConfig::new(d)
        })
        .unwrap();
        let shape = [2, 3, n, d];
        let (qa, ka, va) = (
            randn(&shape, 10 + i as u64),
            randn(&shape, 20 + i as u64),
            randn(&shape, 30 + i as u64),
        );
        let probe = Tensor::new(randn(&shape, 40 + i as u64));
        let run = || {
            let (q, k, v) = (
                Tensor::var(qa.clone()),
                Tensor::var(ka.clone()),
                Tensor::var(va.clone()),
            );
            let out = fa.forward(&q, &k, &v).unwrap();
            let g = out.mul(&probe).unwrap().sum_all().backward().unwrap();
            (
                out.to_array(),
                g.get(&q).unwrap().clone(),
                g.get(&k).unwrap().clone(),
                g.get(&v).unwrap().clone(),
            )
        };
        let cpu = run();
        fa.use_cuda(0).unwrap();
        let gpu = run();
        fa.use_cpu();
        let label = format!("n {n} m {m} d {d} causal {causal}");
        let errs = [
            relative_error(&gpu.0, &cpu.0),
            relative_error(&gpu.1, &cpu.1),
            relative_error(&gpu.2, &cpu.2),
            relative_error(&gpu.3, &cpu.3),
        ];
        println!("{label}: out/dq/dk/dv relative errors {errs:?}");
        for (what, g, c) in [
            ("out", &gpu.0, &cpu.0),
            ("dq", &gpu.1, &cpu.1),
            ("dk", &gpu.2, &cpu.2),
            ("dv", &gpu.3, &cpu.3),
        ] {
            assert_close(&format!("{label}: {what}"), g, c, 1e-4);
        }
    }
}
