//! Device memory for tensors (feature `cuda`): [`DeviceStorage`], the process-wide launcher of
//! each device, uploads and fills, and the translation of the device layer's errors into ours.
//! A leaf below `tensor`: it knows nothing of tensors or graphs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ndarray::{ArrayD, IxDyn};
use performer_cuda::{DeviceBuffer, Elem, EmulatedLauncher, GpuLauncher, SharedLauncher};

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// The values of a device tensor: a shared, immutable, contiguous row-major buffer and its
/// shape. Cloning shares the buffer. The buffer holds f32 or (autocast's activations) bf16:
/// [`DeviceStorage::dtype`]. Code that hands `buf` to an f32 kernel takes the storage through
/// [`DeviceStorage::as_f32`] (`cuda::storage_of` does), and performer-cuda's f32 kernels refuse
/// a bf16 buffer with a typed error, so bf16 bits are never read as f32.
#[derive(Clone)]
pub struct DeviceStorage {
    pub(crate) buf: Arc<DeviceBuffer>,
    pub(crate) shape: Vec<usize>,
    pub(crate) device: Device,
}

impl DeviceStorage {
    pub(crate) fn new(buf: DeviceBuffer, shape: Vec<usize>, device: Device) -> Self {
        debug_assert_eq!(buf.len(), shape.iter().product::<usize>());
        DeviceStorage {
            buf: Arc::new(buf),
            shape,
            device,
        }
    }

    /// How the values are stored.
    pub(crate) fn dtype(&self) -> DType {
        match self.buf.elem() {
            Elem::Bf16 => DType::BF16,
            _ => DType::F32,
        }
    }

    /// The values as f32 storage: this storage, or an f32 copy (exact) of bf16 storage.
    pub(crate) fn as_f32(&self, op: &str) -> Result<DeviceStorage> {
        self.as_dtype(op, DType::F32)
    }

    /// The values as `dtype` storage: this storage when it is already so, otherwise a
    /// converted copy (to bf16: rounded to nearest even).
    pub(crate) fn as_dtype(&self, op: &str, dtype: DType) -> Result<DeviceStorage> {
        if self.dtype() == dtype {
            return Ok(self.clone());
        }
        let buf = match dtype {
            DType::F32 => performer_cuda::tensor_ops::to_f32(&self.buf),
            DType::BF16 => performer_cuda::tensor_ops::to_bf16(&self.buf),
        }
        .map_err(|e| map_err(op, self.device, e))?;
        Ok(DeviceStorage::new(buf, self.shape.clone(), self.device))
    }

    pub(crate) fn numel(&self) -> usize {
        self.buf.len()
    }

    /// The same buffer under another shape of as many elements.
    pub(crate) fn reshaped(&self, shape: Vec<usize>) -> Self {
        DeviceStorage {
            buf: self.buf.clone(),
            shape,
            device: self.device,
        }
    }

    /// The values on the host, as f32 (bf16 values widened exactly).
    pub(crate) fn to_vec(&self) -> Result<Vec<f32>> {
        let err = |e| map_err("to_host", self.device, e);
        match self.dtype() {
            DType::F32 => self.buf.to_f32().map_err(err),
            DType::BF16 => Ok(self
                .buf
                .to_bf16_bits()
                .map_err(err)?
                .into_iter()
                .map(|b| f32::from_bits((b as u32) << 16))
                .collect()),
        }
    }

    pub(crate) fn to_array(&self) -> Result<ArrayD<f32>> {
        Ok(ArrayD::from_shape_vec(IxDyn(&self.shape), self.to_vec()?).expect("length of shape"))
    }

    pub(crate) fn host_access_panic(&self) -> ! {
        panic!(
            "Tensor::data: the tensor (shape {:?}) lives on {}; this op has no device \
             implementation: call to_host() first",
            self.shape, self.device
        )
    }
}

/// Our error for a device failure in `op`: out of memory and mismatched devices keep their
/// own typed variants, shape errors stay shape errors, the rest keeps the backend's error.
pub(crate) fn map_err(op: &str, device: Device, e: performer_cuda::Error) -> Error {
    match e {
        performer_cuda::Error::OutOfMemory {
            requested,
            in_use,
            capacity,
            ..
        } => Error::OutOfMemory {
            op: op.to_string(),
            device: device.to_string(),
            requested,
            in_use,
            capacity,
        },
        performer_cuda::Error::Shape { detail, .. } => Error::shape(op, detail),
        other => Error::backend(op, other),
    }
}

/// Host values to `device` (contiguous, row-major).
pub(crate) fn upload(op: &str, values: &ArrayD<f32>, device: Device) -> Result<DeviceStorage> {
    let dev = launcher(device)?;
    let std = values.as_standard_layout();
    let slice = std.as_slice().expect("standard layout");
    let buf = DeviceBuffer::from_f32(&dev, slice).map_err(|e| map_err(op, device, e))?;
    Ok(DeviceStorage::new(buf, values.shape().to_vec(), device))
}

/// A constant of `shape` filled with `value` on `device`.
pub(crate) fn full(shape: &[usize], value: f32, device: Device) -> Result<DeviceStorage> {
    let dev = launcher(device)?;
    let numel = crate::shape::checked_numel(shape)
        .ok_or_else(|| Error::shape("full", format!("{shape:?} is too large to allocate")))?;
    let buf = performer_cuda::tensor_ops::full(&dev, numel, value)
        .map_err(|e| map_err("full", device, e))?;
    Ok(DeviceStorage::new(buf, shape.to_vec(), device))
}

/// The launcher of `device` (created on first use; TF32 off: GEMMs in full f32).
pub fn launcher(device: Device) -> Result<SharedLauncher> {
    static LAUNCHERS: Mutex<Option<HashMap<Device, SharedLauncher>>> = Mutex::new(None);
    let mut map = LAUNCHERS.lock().unwrap_or_else(|e| e.into_inner());
    let map = map.get_or_insert_with(HashMap::new);
    if let Some(l) = map.get(&device) {
        return Ok(l.clone());
    }
    let op = format!("to_device({device})");
    let launcher: SharedLauncher = match device {
        Device::Cpu => {
            return Err(Error::invalid(
                "launcher",
                "device",
                device,
                "the host has no launcher",
            ));
        }
        Device::Cuda(n) => {
            Arc::new(GpuLauncher::new(n, false).map_err(|e| map_err(&op, device, e))?)
        }
        Device::Emulated => Arc::new(EmulatedLauncher::new().map_err(|e| map_err(&op, device, e))?),
    };
    map.insert(device, launcher.clone());
    Ok(launcher)
}
