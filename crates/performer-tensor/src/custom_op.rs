//! The door for fused kernels: an op that computes on arrays and supplies its own backward.
//!
//! FAVOR+ feature maps, causal linear attention, local attention and reversible blocks are
//! `CustomOp`s. The backward may run a nested forward and [`crate::Tensor::backward`] of its
//! own (reversible blocks recompute their inputs this way): wrap that work in
//! [`crate::enable_grad`], since the outer backward runs with recording off.

use ndarray::ArrayD;

use crate::tensor::Data;
use crate::{Result, Tensor};

/// A fused operation with an analytic backward.
pub trait CustomOp: Send + Sync + 'static {
    /// What the forward keeps for the backward (activations, statistics, RNG states...).
    type Saved: Send + Sync + 'static;

    /// A short name for error messages.
    fn name(&self) -> &'static str;

    /// Computes the outputs. When `save_for_backward` is false no gradient will be asked
    /// for, and the op may skip keeping anything (the returned `Saved` is dropped at once).
    fn forward(
        &self,
        inputs: &[&Data],
        save_for_backward: bool,
    ) -> Result<(Vec<ArrayD<f32>>, Self::Saved)>;

    /// Gradients of the inputs (None where `needs_input_grad` is false or the gradient is
    /// zero) from the gradients of the outputs (None where no gradient reached an output).
    fn backward(
        &self,
        inputs: &[Data],
        saved: &Self::Saved,
        grad_outputs: &[Option<ArrayD<f32>>],
        needs_input_grad: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>>;
}

/// Runs `op` on tensors, recording it in the graph when some input is tracked.
pub fn apply_custom_op<O: CustomOp>(op: O, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
    // A custom op computes on host arrays: device operands make a (differentiable) round trip.
    #[cfg(feature = "cuda")]
    if let Some(device) = crate::cuda::common_device(op.name(), inputs)? {
        let host: Vec<Tensor> = inputs.iter().map(|t| t.to_host()).collect::<Result<_>>()?;
        let refs: Vec<&Tensor> = host.iter().collect();
        return apply_custom_op(op, &refs)?
            .iter()
            .map(|t| t.to_device(device))
            .collect();
    }
    let tracked = crate::is_grad_enabled() && inputs.iter().any(|t| t.is_tracked());
    let datas: Vec<&Data> = inputs.iter().map(|t| t.data()).collect();
    let (outputs, saved) = op.forward(&datas, tracked)?;
    let outputs: Vec<Data> = outputs.into_iter().map(ArrayD::into_shared).collect();
    if !tracked {
        crate::profile::op_done(op.name(), || {
            let n: usize = outputs.iter().map(|d| d.len()).sum::<usize>()
                + inputs.iter().map(|t| t.numel()).sum::<usize>();
            4 * n as u64
        });
        return Ok(outputs.into_iter().map(Tensor::new).collect());
    }
    let kept_inputs: Vec<Data> = datas.into_iter().cloned().collect();
    Ok(Tensor::from_multi_op(
        outputs,
        op.name(),
        inputs,
        move |grads, needs| op.backward(&kept_inputs, &saved, &grads, needs),
    ))
}
