//! Device tensors (feature `cuda`): storage in a [`DeviceBuffer`](performer_cuda::DeviceBuffer)
//! on a real GPU or on the emulated device, the transfers between host and device, the
//! autograd glue for ops whose gradients live on a device, and ([`ops`]) the ops that have a
//! device implementation.
//!
//! A device tensor is always contiguous and row-major; views (reshape) share the buffer,
//! permutations copy on the device. Every op checks that its operands share one device and
//! returns [`Error::DeviceMismatch`] otherwise. CPU code never comes here: each op that has a
//! device implementation starts with one early branch (`on_device!`) that returns `None` for
//! host operands.

pub(crate) mod autograd;
pub mod model_ops;
pub(crate) mod ops;
pub(crate) mod optim;
pub(crate) mod row_ops;
pub(crate) mod select_ops;
pub(crate) mod shape_ops;

use std::sync::Arc;

pub(crate) use crate::device_memory::{DeviceStorage, full, map_err, upload};
use crate::tensor::{GradLink, Node, Storage, TensorId};
use crate::{Device, Error, Result, Tensor};

/// The value of a `Result`, or an early `return Some(Err(e))` (for the `on_device!` entry
/// points, which return `Option<Result<_>>`).
macro_rules! try_some_impl {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        }
    };
}
pub(crate) use try_some_impl as try_some;

/// The device all of `tensors` live on: `None` when they are all on the host, an
/// [`Error::DeviceMismatch`] naming `op` and both devices when they differ.
pub(crate) fn common_device(op: &str, tensors: &[&Tensor]) -> Result<Option<Device>> {
    let first = tensors[0].device();
    for t in &tensors[1..] {
        if t.device() != first {
            return Err(Error::DeviceMismatch {
                op: op.to_string(),
                left: first.to_string(),
                right: t.device().to_string(),
            });
        }
    }
    Ok((!first.is_cpu()).then_some(first))
}

/// The device storage of a tensor known to be on a device, as it is stored (f32 or bf16): for
/// the ops that handle bf16 themselves (matmul, element-wise ops, reshape, conversions).
pub(crate) fn stored(t: &Tensor) -> &DeviceStorage {
    match t.storage() {
        Storage::Device(s) => s,
        Storage::Host(_) => unreachable!("checked to be on a device by common_device"),
    }
}

/// The f32 storage of a tensor known to be on a device: its own, or an f32 copy of bf16
/// storage. Every op with only f32 kernels reads its operands through this.
pub(crate) fn storage_of(t: &Tensor) -> Result<DeviceStorage> {
    stored(t).as_f32("to_f32")
}

/// `t` stored as `dtype` on its device, differentiably (the gradient, f32, passes through).
/// A host tensor is f32 only.
pub(crate) fn to_dtype(t: &Tensor, dtype: crate::DType) -> Result<Tensor> {
    let Storage::Device(s) = t.storage() else {
        return match dtype {
            crate::DType::F32 => Ok(t.clone()),
            crate::DType::BF16 => Err(Error::Unsupported {
                op: "to_dtype".to_string(),
                device: t.device().to_string(),
                detail: "host tensors are f32; bf16 storage is for device tensors".into(),
            }),
        };
    };
    if s.dtype() == dtype {
        return Ok(t.clone());
    }
    let out = s.as_dtype("to_dtype", dtype)?;
    Ok(record1("to_dtype", &[t], out, |g, _| {
        Ok(vec![Some(g.clone())])
    }))
}

/// The outputs of an op with a device backward: recorded in the graph when gradients are
/// enabled and some input is tracked, constants otherwise.
pub(crate) fn record(
    name: &'static str,
    inputs: &[&Tensor],
    outputs: Vec<Storage>,
    backward: impl Fn(Vec<Option<Tensor>>, &[bool]) -> Result<Vec<Option<Tensor>>>
    + Send
    + Sync
    + 'static,
) -> Vec<Tensor> {
    if !(crate::is_grad_enabled() && inputs.iter().any(|t| t.is_tracked())) {
        return outputs
            .into_iter()
            .map(|s| Tensor::from_storage(TensorId::fresh(), s, None))
            .collect();
    }
    let ids: Vec<TensorId> = outputs.iter().map(|_| TensorId::fresh()).collect();
    let node = Arc::new(Node {
        name,
        inputs: inputs.iter().map(|t| (*t).clone()).collect(),
        outputs: ids
            .iter()
            .zip(&outputs)
            .map(|(id, s)| (*id, shape_of(s).to_vec()))
            .collect(),
        backward: None,
        slice_of_input: None,
        device_backward: Some(Box::new(backward)),
    });
    outputs
        .into_iter()
        .zip(ids)
        .enumerate()
        .map(|(output, (s, id))| {
            Tensor::from_storage(
                id,
                s,
                Some(GradLink {
                    node: node.clone(),
                    output,
                }),
            )
        })
        .collect()
}

/// [`record`] for an op with one device output whose backward takes one gradient.
pub(crate) fn record1(
    name: &'static str,
    inputs: &[&Tensor],
    output: DeviceStorage,
    backward: impl Fn(&DeviceStorage, &[bool]) -> Result<Vec<Option<DeviceStorage>>>
    + Send
    + Sync
    + 'static,
) -> Tensor {
    record(
        name,
        inputs,
        vec![Storage::Device(output)],
        move |grads, needs| match grads.into_iter().next().flatten() {
            Some(g) => Ok(backward(&storage_of(&g)?, needs)?
                .into_iter()
                .map(|g| g.map(constant))
                .collect()),
            None => Ok(vec![None; needs.len()]),
        },
    )
    .pop()
    .expect("one output")
}

/// An untracked tensor over device storage.
pub(crate) fn constant(s: DeviceStorage) -> Tensor {
    Tensor::from_storage(TensorId::fresh(), Storage::Device(s), None)
}

fn shape_of(s: &Storage) -> &[usize] {
    match s {
        Storage::Host(d) => d.shape(),
        Storage::Device(d) => &d.shape,
    }
}

/// `tensor` moved to `device`, differentiably (the gradient moves back).
pub(crate) fn to_device(t: &Tensor, device: Device) -> Result<Tensor> {
    let from = t.device();
    if from == device {
        return Ok(t.clone());
    }
    let storage = match t.storage() {
        Storage::Host(d) => Storage::Device(upload("to_device", &d.to_owned(), device)?),
        Storage::Device(s) if device.is_cpu() => Storage::Host(s.to_array()?.into_shared()),
        Storage::Device(s) => Storage::Device(upload("to_device", &s.to_array()?, device)?),
    };
    let name = if device.is_cpu() {
        "to_host"
    } else {
        "to_device"
    };
    Ok(record(name, &[t], vec![storage], move |grads, _| {
        Ok(vec![match grads.into_iter().next().flatten() {
            Some(g) => Some(to_device(&g, from)?),
            None => None,
        }])
    })
    .pop()
    .expect("one output"))
}
