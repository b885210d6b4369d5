//! [`DeviceBuffer`]: an owned allocation on a [`Launcher`], freed on drop.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::launcher::{DevicePtr, KernelArg, Launcher};

/// A shared handle to a device: a real GPU ([`GpuLauncher`](crate::GpuLauncher)) or the emulator
/// ([`EmulatedLauncher`](crate::EmulatedLauncher)).
pub type SharedLauncher = Arc<dyn Launcher>;

/// Element type of a [`DeviceBuffer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    /// `float`.
    F32,
    /// `long long` (token ids, targets).
    I64,
    /// bfloat16, held as the upper 16 bits of an f32 (`unsigned short` in the kernels):
    /// activations stored under autocast.
    Bf16,
}

impl Elem {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::I64 => 8,
            Elem::Bf16 => 2,
        }
    }
}

/// `len` elements of one type in one device allocation; freed when dropped.
pub struct DeviceBuffer {
    launcher: SharedLauncher,
    ptr: DevicePtr,
    len: usize,
    elem: Elem,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceBuffer({:?} x {} at {:#x} on {})",
            self.elem,
            self.len,
            self.ptr,
            self.launcher.describe()
        )
    }
}

impl DeviceBuffer {
    /// An uninitialised buffer of `len` elements (NaN on the emulator).
    pub fn alloc(launcher: &SharedLauncher, len: usize, elem: Elem) -> Result<Self> {
        let bytes = len
            .checked_mul(elem.size())
            .ok_or_else(|| Error::TooLarge {
                op: "alloc",
                detail: format!("{len} elements of {elem:?}"),
            })?;
        let ptr = launcher.alloc(bytes)?;
        Ok(Self {
            launcher: launcher.clone(),
            ptr,
            len,
            elem,
        })
    }

    /// A copy of host f32 values.
    pub fn from_f32(launcher: &SharedLauncher, values: &[f32]) -> Result<Self> {
        let buf = Self::alloc(launcher, values.len(), Elem::F32)?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        launcher.copy_h2d(buf.ptr, &bytes)?;
        Ok(buf)
    }

    /// A copy of host i64 values.
    pub fn from_i64(launcher: &SharedLauncher, values: &[i64]) -> Result<Self> {
        let buf = Self::alloc(launcher, values.len(), Elem::I64)?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        launcher.copy_h2d(buf.ptr, &bytes)?;
        Ok(buf)
    }

    /// A copy of host bf16 values, given as their bits (`half::bf16::to_bits`).
    pub fn from_bf16_bits(launcher: &SharedLauncher, bits: &[u16]) -> Result<Self> {
        let buf = Self::alloc(launcher, bits.len(), Elem::Bf16)?;
        let bytes: Vec<u8> = bits.iter().flat_map(|v| v.to_le_bytes()).collect();
        launcher.copy_h2d(buf.ptr, &bytes)?;
        Ok(buf)
    }

    /// The bf16 values' bits, copied to the host (waits for earlier work).
    pub fn to_bf16_bits(&self) -> Result<Vec<u16>> {
        self.expect("to_bf16_bits", Elem::Bf16)?;
        let mut bytes = vec![0u8; self.len * 2];
        self.launcher.copy_d2h(self.ptr, &mut bytes)?;
        Ok(bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect())
    }

    fn expect(&self, op: &'static str, elem: Elem) -> Result<()> {
        if self.elem == elem {
            Ok(())
        } else {
            Err(Error::Shape {
                op,
                detail: format!("the buffer holds {:?}, not {elem:?}", self.elem),
            })
        }
    }

    /// The values, copied to the host (waits for earlier work).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        self.expect("to_f32", Elem::F32)?;
        let mut bytes = vec![0u8; self.len * 4];
        self.launcher.copy_d2h(self.ptr, &mut bytes)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// The values, copied to the host (waits for earlier work).
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        self.expect("to_i64", Elem::I64)?;
        let mut bytes = vec![0u8; self.len * 8];
        self.launcher.copy_d2h(self.ptr, &mut bytes)?;
        Ok(bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    /// A new buffer with the same contents.
    pub fn duplicate(&self) -> Result<Self> {
        let out = Self::alloc(&self.launcher, self.len, self.elem)?;
        self.launcher
            .copy_d2d(out.ptr, self.ptr, self.len * self.elem.size())?;
        Ok(out)
    }

    /// The device address of the first element.
    pub fn ptr(&self) -> DevicePtr {
        self.ptr
    }

    /// The device address of element `i` (no bounds check: the user's contract).
    pub fn ptr_at(&self, i: usize) -> DevicePtr {
        self.ptr + (i * self.elem.size()) as u64
    }

    /// The address as a kernel argument.
    pub fn arg(&self) -> KernelArg {
        KernelArg::Ptr(self.ptr)
    }

    /// The address of element `i` as a kernel argument (no bounds check: the kernel's contract).
    pub fn arg_at(&self, i: usize) -> KernelArg {
        KernelArg::Ptr(self.ptr + (i * self.elem.size()) as u64)
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The element type.
    pub fn elem(&self) -> Elem {
        self.elem
    }

    /// The device the buffer lives on.
    pub fn launcher(&self) -> &SharedLauncher {
        &self.launcher
    }

    /// Whether `other` lives on the same device (the same launcher instance).
    pub fn same_device(&self, other: &SharedLauncher) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.launcher), Arc::as_ptr(other))
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // A failed free (a driver already torn down at exit) leaks; nothing better to do in drop.
        let _ = self.launcher.free(self.ptr);
    }
}
