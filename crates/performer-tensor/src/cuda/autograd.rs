//! The backward of nodes recorded by device ops ([`super::record`]): their gradients are
//! tensors (on a device, or on the host for the host side of a transfer), kept in a second map
//! beside the host gradients' arrays.

use std::collections::HashMap;

use ndarray::ArrayD;

use super::DeviceBackwardFn;
use crate::tensor::{Node, TensorId};
use crate::{Error, Result, Tensor};

/// Gradients that live on a device, by tensor id.
pub(crate) type DeviceGrads = HashMap<TensorId, Tensor>;

/// Runs one device node's backward: takes its outputs' gradients out of either map and adds
/// its inputs' gradients into the map of the device each input lives on.
pub(crate) fn run_device_node(
    node: &Node,
    backward: &DeviceBackwardFn,
    grads: &mut HashMap<TensorId, ArrayD<f32>>,
    dgrads: &mut DeviceGrads,
) -> Result<()> {
    let out_grads: Vec<Option<Tensor>> = node
        .outputs
        .iter()
        .map(|(id, _)| {
            dgrads
                .remove(id)
                .or_else(|| grads.remove(id).map(Tensor::new))
        })
        .collect();
    if out_grads.iter().all(Option::is_none) {
        return Ok(());
    }
    let needs: Vec<bool> = node.inputs.iter().map(Tensor::is_tracked).collect();
    let in_grads = backward(out_grads, &needs)?;
    if in_grads.len() != node.inputs.len() {
        return Err(Error::Backward(format!(
            "op `{}` returned {} input gradients for {} inputs",
            node.name,
            in_grads.len(),
            node.inputs.len()
        )));
    }
    for (input, g) in node.inputs.iter().zip(in_grads) {
        let Some(g) = g else { continue };
        if !input.is_tracked() {
            continue;
        }
        if g.shape() != input.shape() || g.device() != input.device() {
            return Err(Error::Backward(format!(
                "op `{}` returned a gradient of shape {:?} on {} for an input of shape {:?} on {}",
                node.name,
                g.shape(),
                g.device(),
                input.shape(),
                input.device()
            )));
        }
        if input.device().is_cpu() {
            crate::autograd::accumulate(grads, input.id(), g.to_array());
        } else {
            accumulate(dgrads, input.id(), g)?;
        }
    }
    Ok(())
}

/// `dgrads[id] += g` on the device.
pub(crate) fn accumulate(dgrads: &mut DeviceGrads, id: TensorId, g: Tensor) -> Result<()> {
    let sum = match dgrads.remove(&id) {
        Some(acc) => crate::no_grad(|| acc.add(&g))?,
        None => g,
    };
    dgrads.insert(id, sum);
    Ok(())
}
