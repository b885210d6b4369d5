//! [`Device`]: where a tensor's values live. The host is always there; the CUDA devices (a real
//! GPU, or the emulated device that runs the same kernels on the CPU) need the `cuda` feature.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// Where a tensor's values live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// Host memory (an ndarray array): every op, always available.
    #[default]
    Cpu,
    /// The CUDA GPU with this ordinal (feature `cuda`; needs a driver at run time).
    Cuda(usize),
    /// The emulated CUDA device: the same kernels compiled as C++ and run on the CPU, with
    /// cuBLAS replaced by a CPU GEMM that keeps its conventions (feature `cuda`; needs a C++20
    /// compiler at run time). Slow; for testing the device path without a GPU.
    Emulated,
}

impl Device {
    /// Whether this is the host.
    pub fn is_cpu(self) -> bool {
        self == Device::Cpu
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::Emulated => write!(f, "emulated"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;

    /// `cpu`, `cuda` (ordinal 0), `cuda:N` or `emulated`, as [`Device`]'s `Display` writes them.
    fn from_str(s: &str) -> Result<Self, Error> {
        let t = s.trim();
        match t {
            "cpu" => return Ok(Device::Cpu),
            "cuda" => return Ok(Device::Cuda(0)),
            "emulated" => return Ok(Device::Emulated),
            _ => {}
        }
        if let Some(n) = t.strip_prefix("cuda:")
            && let Ok(n) = n.parse::<usize>()
        {
            return Ok(Device::Cuda(n));
        }
        Err(Error::invalid(
            "Device::from_str",
            "device",
            s,
            "expected cpu, cuda, cuda:N or emulated",
        ))
    }
}

impl crate::Tensor {
    /// This tensor on `device` (a copy; the same tensor when it is already there). The move
    /// is differentiable: the gradient comes back to where this tensor lives. Without the
    /// `cuda` feature every device other than [`Device::Cpu`] is [`Error::Unsupported`].
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

    /// This tensor in host memory ([`Tensor::to_device`] with [`Device::Cpu`]).
    ///
    /// [`Tensor::to_device`]: crate::Tensor::to_device
    pub fn to_host(&self) -> crate::Result<crate::Tensor> {
        self.to_device(Device::Cpu)
    }

    /// A constant tensor of `shape` filled with `value`, allocated on `device` (nothing is
    /// copied from the host). Out of device memory is [`Error::OutOfMemory`].
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_prints() {
        for d in [
            Device::Cpu,
            Device::Cuda(0),
            Device::Cuda(3),
            Device::Emulated,
        ] {
            assert_eq!(d.to_string().parse::<Device>().unwrap(), d);
        }
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let err = bad.parse::<Device>().unwrap_err();
            assert!(err.to_string().contains("cuda:N"), "{err}");
        }
    }
}
