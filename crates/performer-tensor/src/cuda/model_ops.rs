//! Device ops for the crates above this one (feature `cuda`, public as
//! `performer_tensor::device_ops`): the door for fused device kernels that live elsewhere (the
//! FAVOR+ kernels of performer-favor), in the manner of [`crate::CustomOp`] but on device
//! buffers with no host copy, and the layers' own kernels (rotary embedding, token shift) at
//! the tensor level.
//!
//! A device op reads its inputs' buffers ([`buffer`]), launches kernels through the device's
//! launcher ([`launcher`]), wraps its results as tensors ([`from_buffer`]) and records them
//! with a backward over tensors ([`record`]).

use std::sync::Arc;

use performer_cuda::tensor_ops as k;
use performer_cuda::{DeviceBuffer, SharedLauncher};

use super::{DeviceStorage, common_device, constant, map_err, record1, storage_of};
use crate::tensor::Storage;
use crate::{Device, Error, Result, Tensor};

/// The device buffer of `t` as f32 (contiguous, row-major, `t.numel()` values): its own, or an
/// f32 copy of bf16 storage (so a fused kernel never reads bf16 bits as f32); `None` on the
/// host.
pub fn buffer(t: &Tensor) -> Result<Option<Arc<DeviceBuffer>>> {
    match t.storage() {
        Storage::Device(s) => Ok(Some(s.as_f32("device_ops::buffer")?.buf)),
        Storage::Host(_) => Ok(None),
    }
}

/// An untracked tensor of `shape` over `buf` on `device`; the lengths must agree.
pub fn from_buffer(op: &str, buf: DeviceBuffer, shape: &[usize], device: Device) -> Result<Tensor> {
    if crate::shape::checked_numel(shape) != Some(buf.len()) {
        return Err(Error::shape(
            op,
            format!(
                "a buffer of {} values cannot have shape {shape:?}",
                buf.len()
            ),
        ));
    }
    Ok(constant(DeviceStorage::new(buf, shape.to_vec(), device)))
}

/// The launcher of `device` (shared by every tensor there).
pub fn launcher(device: Device) -> Result<SharedLauncher> {
    crate::device_memory::launcher(device)
}

/// Device memory of `device` in bytes: `(in use now, the peak since the last
/// [`reset_peak_memory`])`, what a training step's memory is measured by.
pub fn memory(device: Device) -> Result<(usize, usize)> {
    let l = launcher(device)?;
    Ok((l.bytes_in_use(), l.peak_bytes()))
}

/// Starts a new peak of `device`'s memory at the bytes in use now.
pub fn reset_peak_memory(device: Device) -> Result<()> {
    launcher(device)?.reset_peak_bytes();
    Ok(())
}

/// The device layer's error `e` in `op` on `device` as ours: out of memory stays
/// [`Error::OutOfMemory`], shape errors stay shape errors.
pub fn error(op: &str, device: Device, e: performer_cuda::Error) -> Error {
    map_err(op, device, e)
}

/// The device all of `tensors` live on (`None` on the host), or [`Error::DeviceMismatch`].
pub fn device_of(op: &str, tensors: &[&Tensor]) -> Result<Option<Device>> {
    common_device(op, tensors)
}

/// Records `outputs` (device tensors computed from `inputs`, untracked) as one op of the graph
/// when gradients are enabled and some input is tracked; returns them, tracked. `backward`
/// gets the outputs' gradients (`None` where none reached an output) and which inputs need
/// one, and returns the inputs' gradients, each on its input's device and of its shape.
pub fn record(
    name: &'static str,
    inputs: &[&Tensor],
    outputs: Vec<Tensor>,
    backward: impl Fn(Vec<Option<Tensor>>, &[bool]) -> Result<Vec<Option<Tensor>>>
    + Send
    + Sync
    + 'static,
) -> Vec<Tensor> {
    let storages = outputs.iter().map(|t| t.storage().clone()).collect();
    super::record(name, inputs, storages, backward)
}

/// performer-pytorch's `apply_rotary_pos_emb` on a device: `x` `(..., n, d)` rotated by the
/// table `sinu_pos` `(1, n, d)` holding `[sin | cos]`, each frequency repeated for a pair of
/// features: `x cos + rotate_every_two(x) sin`. The backward applies the adjoint rotation.
pub fn rotary(x: &Tensor, sinu_pos: &Tensor) -> Result<Tensor> {
    const OP: &str = "apply_rotary_pos_emb";
    let Some(device) = common_device(OP, &[x, sinu_pos])? else {
        return Err(Error::invalid(
            OP,
            "x",
            "on the host",
            "device_ops take device tensors",
        ));
    };
    let (n, d) = match sinu_pos.shape() {
        [1, n, d] if d % 2 == 0 => (*n, *d),
        other => {
            return Err(Error::shape(
                OP,
                format!("sinu_pos must be (1, n, even d), got {other:?}"),
            ));
        }
    };
    let shape = x.shape().to_vec();
    let r = shape.len();
    if r < 2 || shape[r - 2] != n || shape[r - 1] != d {
        return Err(Error::shape(
            OP,
            format!("{shape:?} does not end in (n, d) = ({n}, {d})"),
        ));
    }
    let err = move |e| map_err(OP, device, e);
    let table = storage_of(sinu_pos)?;
    // Pair i of every row reads sin_i (cos_i) twice: a copy with stride 0 over the pair.
    let half = (d / 2) as i64;
    let expand = |offset: usize| {
        k::strided_copy(&table.buf, offset, &[n, d / 2, 2], &[d as i64, 1, 0]).map_err(err)
    };
    let (sin, cos) = (Arc::new(expand(0)?), Arc::new(expand(half as usize)?));
    let groups = x.numel() / (n * d).max(1);
    let sx = storage_of(x)?;
    let y = k::rotary(&sx.buf, &sin, &cos, groups, n, d, false).map_err(err)?;
    Ok(record1(
        OP,
        &[x],
        DeviceStorage::new(y, shape.clone(), device),
        move |g, _| {
            let gx = k::rotary(&g.buf, &sin, &cos, groups, n, d, true).map_err(err)?;
            Ok(vec![Some(DeviceStorage::new(gx, shape.clone(), device))])
        },
    ))
}

/// Token shift on a device: `x` `(b, n, d)` with features `cols` moved `shift` positions along
/// the sequence (zeros enter), the other features copied. The backward shifts back.
pub fn token_shift(x: &Tensor, cols: std::ops::Range<usize>, shift: i32) -> Result<Tensor> {
    const OP: &str = "token_shift";
    let Some(device) = common_device(OP, &[x])? else {
        return Err(Error::invalid(
            OP,
            "x",
            "on the host",
            "device_ops take device tensors",
        ));
    };
    let [b, n, d] = *x.shape() else {
        return Err(Error::shape(
            OP,
            format!("x must be (b, n, d), got {:?}", x.shape()),
        ));
    };
    let err = move |e| map_err(OP, device, e);
    let sx = storage_of(x)?;
    let y = k::token_shift(&sx.buf, b, n, d, cols.clone(), shift).map_err(err)?;
    Ok(record1(
        OP,
        &[x],
        DeviceStorage::new(y, vec![b, n, d], device),
        move |g, _| {
            let gx = k::token_shift(&g.buf, b, n, d, cols.clone(), -shift).map_err(err)?;
            Ok(vec![Some(DeviceStorage::new(gx, vec![b, n, d], device))])
        },
    ))
}
