//! Moving tensors between devices: [`crate::Tensor::to_device`], [`crate::Tensor::to_host`] and
//! [`crate::Tensor::full_on`] (allocated where asked).

use crate::device::Device;
#[cfg(not(feature = "cuda"))]
use crate::error::Error;

impl crate::Tensor {
    /// This tensor on `device` (a copy; the same tensor when it is already there). The move
    /// is differentiable: the gradient comes back to where this tensor lives. Without the
    /// `cuda` feature every device other than [`Device::Cpu`] is [`crate::Error::Unsupported`].
    pub fn to_device(&self, device: Device) -> crate::Result<crate::Tensor> {
        #[cfg(feature = "cuda")]
        return crate::cuda::to_device(self, device);
        #[cfg(not(feature = "cuda"))]
        if device == self.device() {
            Ok(self.clone())
        } else {
            Err(no_cuda("to_device", device))
        }
    }

    /// This tensor stored as `dtype` (a device copy rounded to nearest even for bf16, widened
    /// exactly for f32; itself when it already is), differentiably: the gradient passes
    /// through unchanged, in f32. Host tensors are f32 only: bf16 on the host is
    /// [`crate::Error::Unsupported`].
    pub fn to_dtype(&self, dtype: crate::DType) -> crate::Result<crate::Tensor> {
        #[cfg(feature = "cuda")]
        {
            crate::cuda::to_dtype(self, dtype)
        }
        #[cfg(not(feature = "cuda"))]
        match dtype {
            crate::DType::F32 => Ok(self.clone()),
            crate::DType::BF16 => Err(crate::Error::Unsupported {
                op: "to_dtype".to_string(),
                device: self.device().to_string(),
                detail: "host tensors are f32; bf16 storage is for device tensors".into(),
            }),
        }
    }

    /// This tensor in host memory ([`Tensor::to_device`] with [`Device::Cpu`]).
    ///
    /// [`Tensor::to_device`]: crate::Tensor::to_device
    pub fn to_host(&self) -> crate::Result<crate::Tensor> {
        self.to_device(Device::Cpu)
    }

    /// A constant tensor of `shape` filled with `value`, allocated on `device` (nothing is
    /// copied from the host). Out of device memory is [`crate::Error::OutOfMemory`].
    pub fn full_on(shape: &[usize], value: f32, device: Device) -> crate::Result<crate::Tensor> {
        if device.is_cpu() {
            return crate::Tensor::try_full(shape, value);
        }
        #[cfg(feature = "cuda")]
        return crate::cuda::ops::full_on(shape, value, device);
        #[cfg(not(feature = "cuda"))]
        Err(no_cuda("full_on", device))
    }
}

#[cfg(not(feature = "cuda"))]
fn no_cuda(op: &str, device: Device) -> Error {
    Error::Unsupported {
        op: op.to_string(),
        device: device.to_string(),
        detail: "performer-tensor was built without its `cuda` feature".into(),
    }
}
