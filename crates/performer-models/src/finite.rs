//! Detecting non-finite numbers in training: a loss, gradients or parameters holding NaN or
//! infinity, reported as [`Error::NonFinite`] with the step and the parameters' names, so a
//! trainer can stop (keeping its last good checkpoint) or skip the step, as mixed-precision
//! trainers skip steps whose gradients overflowed.

use performer_tensor::{Entry, Error, Gradients, Module, Result, Visitor};

/// Names of `model`'s parameters whose gradient in `grads` holds a NaN or an infinity
/// (parameters that received no gradient are not listed).
pub fn non_finite_gradients(model: &dyn Module, grads: &Gradients) -> Vec<String> {
    model
        .named_parameters()
        .into_iter()
        .filter(|(_, p)| {
            grads
                .get_param(p)
                .is_some_and(|g| g.iter().any(|x| !x.is_finite()))
        })
        .map(|(name, _)| name)
        .collect()
}

/// Names of `model`'s parameters and float buffers holding a NaN or an infinity.
pub fn non_finite_parameters(model: &dyn Module) -> Vec<String> {
    let mut out = Vec::new();
    let mut f = |name: &str, e: Entry<'_>| {
        let bad = match e {
            Entry::Param(p) => p.value().iter().any(|x| !x.is_finite()),
            Entry::Buffer(b) => match b.get() {
                performer_tensor::StateValue::F32(a) => a.iter().any(|x| !x.is_finite()),
                performer_tensor::StateValue::I64(_) => false,
            },
            Entry::Training(_) => false,
        };
        if bad && !out.iter().any(|n: &String| n == name) {
            out.push(name.to_string());
        }
    };
    model.visit(&mut Visitor::new(&mut f));
    out
}

/// Checks one training step before the optimizer applies it: `Ok(())` when the loss and every
/// gradient are finite, otherwise [`Error::NonFinite`] naming the step, the loss and (up to
/// five of) the parameters whose gradients are not finite.
pub fn check_finite_step(
    step: u64,
    loss: f32,
    model: &dyn Module,
    grads: &Gradients,
) -> Result<()> {
    if !loss.is_finite() {
        return Err(Error::NonFinite(format!(
            "step {step}: the loss is {loss} (a NaN or infinite loss; lower the learning rate, \
             clip gradients, or skip such steps)"
        )));
    }
    if grads.all_finite() {
        return Ok(());
    }
    let bad = non_finite_gradients(model, grads);
    let shown = bad.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    let more = if bad.len() > 5 {
        format!(" and {} more", bad.len() - 5)
    } else {
        String::new()
    };
    Err(Error::NonFinite(format!(
        "step {step}: the loss is {loss} but gradients are not finite in {}{more}",
        if shown.is_empty() {
            "tensors outside the model".to_string()
        } else {
            shown
        }
    )))
}
