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
