//! The README's "performer-tensor in a few lines": a linear classifier trained with Adam, run
//! without a graph and saved with PyTorch's parameter names.

use performer_tensor::io::{TensorData, save_safetensors};
use performer_tensor::ndarray::arr1;
use performer_tensor::optim::{Adam, Optimizer};
use performer_tensor::{Module, Param, Result, Tensor, Visitor, no_grad};

/// A linear classifier: logits = x W + b.
struct Classifier {
    weight: Param,
    bias: Param,
}

impl Module for Classifier {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.param("weight", &self.weight);
        v.param("bias", &self.bias);
    }
}

fn main() -> Result<()> {
    performer_tensor::rng::manual_seed(0);
    let model = Classifier {
        weight: Param::new(Tensor::randn(&[4, 3]).mul_scalar(0.1).to_array()),
        bias: Param::new(Tensor::zeros(&[3]).to_array()),
    };
    let x = Tensor::randn(&[8, 4]);
    let target = arr1(&[0i64, 1, 2, 0, 1, 2, 0, 1]).into_dyn();

    let mut opt = Adam::new(model.named_parameters(), 0.05);
    for step in 0..50 {
        let logits = x
            .matmul(&model.weight.tensor())?
            .add(&model.bias.tensor())?;
        let loss = logits.cross_entropy(&target.view(), None)?;
        let grads = loss.backward()?; // gradients of every parameter, by id
        opt.step(&grads)?;
        if step % 10 == 0 {
            println!("step {step:2}: loss {:.4}", loss.item()?);
        }
    }

    // Inference records no graph; state dicts use PyTorch's dotted names.
    let probs = no_grad(|| -> Result<Tensor> {
        x.matmul(&model.weight.tensor())?
            .add(&model.bias.tensor())?
            .softmax(-1)
    })?;
    println!(
        "class probabilities of the first sample: {:?}",
        probs.select(0, 0)?.to_vec()
    );
    let state = model
        .state_dict()
        .into_iter()
        .map(|(k, v)| (k, TensorData::from(v)))
        .collect();
    save_safetensors(
        std::env::temp_dir().join("classifier.safetensors"),
        &state,
        None,
    )?;
    Ok(())
}
