//! [`ReversibleSequence`](crate::ReversibleSequence) on device tensors (feature `cuda`): the
//! same coupling `y1 = x1 + f(x2)`, `y2 = x2 + g(y1)` and the same memory-free backward as the
//! host op (`sequence.rs`), with every activation and gradient kept on the device. The forward
//! runs without a graph and keeps only the last layer's two halves and the generator's state
//! before each branch; the backward walks the layers in reverse, reconstructs each layer's
//! input from its output, recomputes `f` and `g` with the recorded generator states (so
//! dropout draws the same masks) and accumulates the parameters' gradients.

use performer_tensor::rng::{self, RngState};
use performer_tensor::{Gradients, Param, Result, Tensor, device_ops, enable_grad, no_grad};

use crate::block::BlockInputs;
use crate::layer::Layer;

/// `acc += g` (device tensors; no graph).
fn add_into(slot: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    *slot = Some(match slot.take() {
        Some(acc) => no_grad(|| acc.add(&g))?,
        None => g,
    });
    Ok(())
}

/// The vector-Jacobian product of `out` with `seed` (same shape), as the gradients of
/// `sum(out * seed)`: the seed never leaves the device.
fn vjp(out: &Tensor, seed: &Tensor) -> Result<Gradients> {
    enable_grad(|| out.mul(seed)?.sum_all().backward())
}

/// The reversible stack over device input `x` `(b, n, dim)`.
pub(crate) fn forward(
    layers: &[Layer],
    params: Vec<Param>,
    x: &Tensor,
    inputs: &BlockInputs<'_>,
) -> Result<Tensor> {
    let mut states: Vec<(RngState, RngState)> = Vec::with_capacity(layers.len());
    let (y1, y2) = no_grad(|| -> Result<(Tensor, Tensor)> {
        let (mut x1, mut x2) = (x.detach(), x.detach());
        for l in layers {
            let sf = rng::get_state();
            let y1 = x1.add(&l.f.forward(&x2, &l.f_inputs(inputs))?)?;
            let sg = rng::get_state();
            let y2 = x2.add(&l.g.forward(&y1, &BlockInputs::none())?)?;
            states.push((sf, sg));
            (x1, x2) = (y1, y2);
        }
        Ok((x1, x2))
    })?;
    let out = no_grad(|| y1.add(&y2))?;
    let mut op_inputs = vec![x.clone()];
    let context = inputs.context.cloned();
    op_inputs.extend(context.iter().cloned());
    op_inputs.extend(params.iter().map(Param::tensor));
    let refs: Vec<&Tensor> = op_inputs.iter().collect();
    let layers = layers.to_vec();
    let mask = inputs.mask.map(|m| m.to_owned());
    let context_mask = inputs.context_mask.map(|m| m.to_owned());
    let pos_emb = inputs.pos_emb.map(Tensor::detach);
    let n_inputs = refs.len();
    Ok(device_ops::record(
        "ReversibleSequence",
        &refs,
        vec![out],
        move |grads, needs| {
            let Some(g) = grads.into_iter().next().flatten() else {
                return Ok(vec![None; n_inputs]);
            };
            let ctx_var = context.as_ref().map(Tensor::to_var);
            let block_inputs = BlockInputs {
                mask: mask.as_ref().map(|m| m.view()),
                pos_emb: pos_emb.as_ref(),
                context: ctx_var.as_ref(),
                context_mask: context_mask.as_ref().map(|m| m.view()),
            };
            backward(
                &layers,
                &params,
                &states,
                (y1.clone(), y2.clone()),
                &g,
                &block_inputs,
                ctx_var.as_ref(),
                needs,
            )
        },
    )
    .remove(0))
}

/// The inputs' gradients `[x, context?, params...]` from the output's `g`.
#[allow(clippy::too_many_arguments)]
fn backward(
    layers: &[Layer],
    params: &[Param],
    states: &[(RngState, RngState)],
    (mut y1, mut y2): (Tensor, Tensor),
    g: &Tensor,
    inputs: &BlockInputs<'_>,
    context: Option<&Tensor>,
    needs: &[bool],
) -> Result<Vec<Option<Tensor>>> {
    let resume = rng::get_state();
    let (mut dy1, mut dy2) = (g.clone(), g.clone());
    let mut dparams: Vec<Option<Tensor>> = vec![None; params.len()];
    let mut dcontext: Option<Tensor> = None;
    let mut collect = |grads: &Gradients| -> Result<()> {
        for (slot, p) in dparams.iter_mut().zip(params) {
            if let Some(dp) = grads.tensor(p.id()) {
                add_into(slot, dp)?;
            }
        }
        if let Some(c) = context
            && let Some(dc) = grads.tensor(c.id())
        {
            add_into(&mut dcontext, dc)?;
        }
        Ok(())
    };
    for (l, (sf, sg)) in layers.iter().zip(states).rev() {
        // g: recompute g(y1), take its gradient, reconstruct x2 = y2 - g(y1).
        rng::set_state(*sg);
        let y1v = y1.to_var();
        let gy1 = enable_grad(|| l.g.forward(&y1v, &BlockInputs::none()))?;
        let grads_g = vjp(&gy1, &dy2)?;
        collect(&grads_g)?;
        let x2 = no_grad(|| y2.sub(&gy1.detach()))?;
        let dx1 = match grads_g.tensor(y1v.id()) {
            Some(d) => no_grad(|| dy1.add(&d))?,
            None => dy1,
        };
        // f: recompute f(x2), take its gradient, reconstruct x1 = y1 - f(x2).
        rng::set_state(*sf);
        let x2v = x2.to_var();
        let fx2 = enable_grad(|| l.f.forward(&x2v, &l.f_inputs(inputs)))?;
        let grads_f = vjp(&fx2, &dx1)?;
        collect(&grads_f)?;
        let x1 = no_grad(|| y1.sub(&fx2.detach()))?;
        let dx2 = match grads_f.tensor(x2v.id()) {
            Some(d) => no_grad(|| dy2.add(&d))?,
            None => dy2,
        };
        (y1, y2) = (x1, x2);
        (dy1, dy2) = (dx1, dx2);
    }
    rng::set_state(resume);
    // x entered both halves.
    let dx = no_grad(|| dy1.add(&dy2))?;
    let mut out = vec![needs[0].then_some(dx)];
    if context.is_some() {
        out.push(dcontext.filter(|_| needs[1]));
    }
    out.extend(dparams);
    Ok(out)
}
