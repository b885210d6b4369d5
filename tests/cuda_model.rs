//! A CPU-built PerformerLM with its attention moved to a CUDA device (`use_cuda`, feature
//! `cuda`): the loss and every parameter gradient match the CPU run within 1e-4 of their largest
//! magnitude. Without a driver, `use_cuda` fails with a clear error, every layer stays on the CPU
//! and the model still runs.
#![cfg(feature = "cuda")]

use ndarray::{Array2, ArrayD};
use performer::tensor::Module;
use performer::tensor::testing::assert_close;
use performer::{AutoregressiveWrapper, PerformerLM, PerformerLMConfig, SeqInputs};

/// Loss and the gradient of every parameter, by name.
fn loss_and_grads(
    model: &AutoregressiveWrapper,
    x: &Array2<i64>,
) -> (f32, Vec<(String, ArrayD<f32>)>) {
    let loss = model.loss(&x.view(), &SeqInputs::default()).unwrap();
    let grads = loss.backward().unwrap();
    let named = model
        .named_parameters()
        .into_iter()
        .map(|(name, p)| {
            // A parameter no gradient reached fails here rather than comparing as empty.
            let g = grads
                .get_param(&p)
                .unwrap_or_else(|| panic!("{name}: no gradient reached it"))
                .clone();
            (name, g)
        })
        .collect();
    (loss.item().unwrap(), named)
}

#[test]
fn model_attention_on_cuda_matches_the_cpu() {
    performer::tensor::rng::manual_seed(3);
    let model = AutoregressiveWrapper::new(
        PerformerLM::new(PerformerLMConfig {
            num_tokens: 64,
            max_seq_len: 300,
            dim: 128,
            depth: 2,
            heads: 2,
            dim_head: 64,
            causal: true,
            nb_features: Some(128),
            ..Default::default()
        })
        .unwrap(),
    );
    model.net.fix_projection_matrices();
    let x = Array2::from_shape_fn((2, 257), |(b, i)| ((b * 31 + i * 7) % 64) as i64);
    let (cpu_loss, cpu_grads) = loss_and_grads(&model, &x);

    if let Err(e) = model.net.use_cuda(0) {
        let mut any = false;
        model
            .net
            .for_each_fast_attention(&mut |fa| any |= fa.uses_cuda());
        assert!(!any, "a failed use_cuda must leave every layer on the CPU");
        let (again, _) = loss_and_grads(&model, &x);
        assert_eq!(again, cpu_loss);
        println!("SKIPPED: no usable CUDA device; use_cuda fails with: {e}");
        return;
    }
    let (gpu_loss, gpu_grads) = loss_and_grads(&model, &x);
    println!("loss: CPU {cpu_loss}, CUDA attention {gpu_loss}");
    assert!((gpu_loss - cpu_loss).abs() <= 1e-4 * cpu_loss.abs());
    assert_eq!(cpu_grads.len(), gpu_grads.len());
    for ((name, a), (gpu_name, b)) in cpu_grads.iter().zip(&gpu_grads) {
        assert_eq!(name, gpu_name);
        assert_close(&format!("{name}: CUDA gradient"), b, a, 1e-4);
    }
    model.net.use_cpu();
}
