//! The one narrow interface every device operation goes through: allocate, free, copy, launch a
//! kernel by name, and cuBLAS's strided-batched SGEMM.
//!
//! Two implementations: [`GpuLauncher`](crate::GpuLauncher) on cudarc for a real GPU, and
//! [`EmulatedLauncher`](crate::EmulatedLauncher), which runs the same `.cu` sources compiled as
//! C++ on the CPU and replaces cuBLAS by a CPU GEMM with cuBLAS's own argument conventions.
//! Code written against [`Launcher`] runs unchanged on both, so the emulator tests it on
//! machines without a GPU.
//!
//! Device addresses are plain `u64`s ([`DevicePtr`]); [`DeviceBuffer`](crate::DeviceBuffer) is the
//! owning handle most callers want.

use std::ffi::c_void;
use std::fmt;

use crate::error::Result;
use crate::strided_index::StridedIndex;

/// An address in a launcher's device memory (a `CUdeviceptr` on a GPU). 0 is null.
pub type DevicePtr = u64;

/// One kernel argument, typed as the kernel's parameter is (`float*`, `int`, `long long`, ...,
/// or the strided kernels' `StridedIndex` struct, passed by value).
// The index map makes every argument 272 bytes. Argument lists are short-lived arrays of a
// dozen entries on the caller's stack, so that costs a few kilobytes of stack per launch,
// while boxing it would allocate on every strided launch and lose `Copy`.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KernelArg {
    /// A device pointer (any pointee type), or 0 for null.
    Ptr(DevicePtr),
    /// `int`.
    I32(i32),
    /// `long long` (`i64` in the sources).
    I64(i64),
    /// `float`.
    F32(f32),
    /// `unsigned`.
    U32(u32),
    /// `unsigned long long`.
    U64(u64),
    /// `StridedIndex` (by value).
    Index(StridedIndex),
}

impl KernelArg {
    /// The kind code shared with the emulator's entry points (`emu::Kind` in
    /// `emulator/runtime.h`).
    pub(crate) fn kind(&self) -> u8 {
        match self {
            KernelArg::Ptr(_) => 0,
            KernelArg::I32(_) => 1,
            KernelArg::I64(_) => 2,
            KernelArg::F32(_) => 3,
            KernelArg::U32(_) => 4,
            KernelArg::U64(_) => 5,
            KernelArg::Index(_) => 6,
        }
    }

    /// Where the argument's value is, as cuLaunchKernel and the emulator read a parameter:
    /// a scalar or pointer is written into `slot` (its low bytes, little-endian, which is what
    /// a parameter of its size reads), an index map is read in place (the pointer borrows
    /// `self`). Both must outlive the launch call.
    pub(crate) fn param_ptr(&self, slot: &mut u64) -> *mut c_void {
        *slot = match *self {
            KernelArg::Index(ref map) => return map as *const StridedIndex as *mut c_void,
            KernelArg::Ptr(p) => p,
            KernelArg::I32(v) => v as u32 as u64,
            KernelArg::I64(v) => v as u64,
            KernelArg::F32(v) => v.to_bits() as u64,
            KernelArg::U32(v) => v as u64,
            KernelArg::U64(v) => v,
        };
        slot as *mut u64 as *mut c_void
    }
}

/// The parameter pointers of one launch (CUDA's `void** kernelParams`): `slots` holds the
/// scalars' values (one per argument, filled here), index maps are read from `args` itself.
pub(crate) fn param_ptrs(args: &[KernelArg], slots: &mut [u64]) -> Vec<*mut c_void> {
    // A shorter `slots` would silently drop the last arguments from the launch.
    assert_eq!(slots.len(), args.len(), "one parameter slot per argument");
    args.iter()
        .zip(slots.iter_mut())
        .map(|(a, slot)| a.param_ptr(slot))
        .collect()
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchDims {
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block in x, y, z.
    pub block: (u32, u32, u32),
    /// Bytes of dynamic shared memory (`extern __shared__`).
    pub shared_bytes: u32,
}

impl LaunchDims {
    /// A 1-D grid of `threads`-wide blocks covering `total` elements, capped at 65535 blocks
    /// (the kernels that take it loop with a grid stride).
    pub fn cover(total: usize, threads: u32) -> Self {
        let blocks = total.div_ceil(threads as usize).clamp(1, 65535) as u32;
        Self {
            grid: (blocks, 1, 1),
            block: (threads, 1, 1),
            shared_bytes: 0,
        }
    }

    /// A `(x, y, z)` grid of `threads`-wide blocks.
    pub fn grid3(x: usize, y: usize, z: usize, threads: u32) -> Self {
        Self {
            grid: (x as u32, y as u32, z as u32),
            block: (threads, 1, 1),
            shared_bytes: 0,
        }
    }
}

/// cuBLAS's transpose flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transpose {
    /// `CUBLAS_OP_N`: the operand as stored (column-major).
    No,
    /// `CUBLAS_OP_T`: its transpose.
    Yes,
}

/// The arguments of `cublasSgemmStridedBatched`, in cuBLAS's column-major convention:
/// for each batch `i < batch`, `C_i = alpha * op(A_i) op(B_i) + beta * C_i` with `op(A_i)`
/// `m x k`, `op(B_i)` `k x n`, `C_i` `m x n`, where `X_i` starts at `x + i * stride_x` elements
/// and element `(r, c)` of a stored matrix is at `r + c * ld`. With `beta == 0`, `C` is not read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GemmStridedBatched {
    /// Transpose flag of A.
    pub transa: Transpose,
    /// Transpose flag of B.
    pub transb: Transpose,
    /// Rows of `op(A)` and `C`.
    pub m: i32,
    /// Columns of `op(B)` and `C`.
    pub n: i32,
    /// Columns of `op(A)`, rows of `op(B)`.
    pub k: i32,
    /// Scale of the product.
    pub alpha: f32,
    /// A's first element.
    pub a: DevicePtr,
    /// A's leading dimension.
    pub lda: i32,
    /// Elements between consecutive A matrices.
    pub stride_a: i64,
    /// B's first element.
    pub b: DevicePtr,
    /// B's leading dimension.
    pub ldb: i32,
    /// Elements between consecutive B matrices.
    pub stride_b: i64,
    /// Scale of the old C (0: C is write-only).
    pub beta: f32,
    /// C's first element.
    pub c: DevicePtr,
    /// C's leading dimension.
    pub ldc: i32,
    /// Elements between consecutive C matrices.
    pub stride_c: i64,
    /// Number of products.
    pub batch: i32,
}

impl GemmStridedBatched {
    /// Checks the sizes as cuBLAS does (`CUBLAS_STATUS_INVALID_VALUE` there): non-negative
    /// sizes, leading dimensions at least the stored rows (and at least 1).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let (m, n, k) = (self.m, self.n, self.k);
        if m < 0 || n < 0 || k < 0 || self.batch < 0 {
            return Err(format!(
                "negative size: m={m} n={n} k={k} batch={}",
                self.batch
            ));
        }
        let a_rows = if self.transa == Transpose::No { m } else { k };
        let b_rows = if self.transb == Transpose::No { k } else { n };
        for (what, ld, rows) in [
            ("lda", self.lda, a_rows),
            ("ldb", self.ldb, b_rows),
            ("ldc", self.ldc, m),
        ] {
            if ld < rows.max(1) {
                return Err(format!(
                    "{what}={ld} is less than the {rows} stored rows (m={m} n={n} k={k}, \
                     transa={:?} transb={:?})",
                    self.transa, self.transb
                ));
            }
        }
        Ok(())
    }
}

/// A device that runs performer-cuda's kernels: a real GPU or the emulator.
///
/// All work is ordered as on one CUDA stream: a launch or copy sees the effects of every call
/// made before it through the same launcher. Copies to the host wait for that work.
pub trait Launcher: Send + Sync + fmt::Debug {
    /// A short description, e.g. `NVIDIA H100 (sm_90)` or `emulated`.
    fn describe(&self) -> String;

    /// The architecture the kernels run as, as NVRTC names it (`sm_90`). The emulated device
    /// reports `sm_90`: it emulates the instructions the kernels use there (TF32 `mma.sync`).
    fn arch(&self) -> String;

    /// `bytes` of device memory, uninitialised on a GPU, NaN-filled on the emulator. A request
    /// past the device's capacity is [`Error::OutOfMemory`](crate::Error::OutOfMemory).
    fn alloc(&self, bytes: usize) -> Result<DevicePtr>;

    /// Releases memory from [`Launcher::alloc`]. Freeing an address that is not a live
    /// allocation is an error on the emulator (and is ignored by the driver on a GPU).
    fn free(&self, ptr: DevicePtr) -> Result<()>;

    /// Copies host bytes to `dst`.
    fn copy_h2d(&self, dst: DevicePtr, src: &[u8]) -> Result<()>;

    /// Copies device bytes at `src` into `dst`, after all earlier work.
    fn copy_d2h(&self, src: DevicePtr, dst: &mut [u8]) -> Result<()>;

    /// Copies `bytes` from `src` to `dst` on the device.
    fn copy_d2d(&self, dst: DevicePtr, src: DevicePtr, bytes: usize) -> Result<()>;

    /// Launches the kernel `name` of [`kernel_sources::SOURCES`](crate::kernel_sources::SOURCES).
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number, order and type (the emulator checks
    /// number and kinds, a GPU does not), and every pointer must point into live allocations of
    /// this launcher large enough for everything the kernel reads and writes with these
    /// arguments and this grid.
    unsafe fn launch(&self, name: &str, dims: LaunchDims, args: &[KernelArg]) -> Result<()>;

    /// `cublasSgemmStridedBatched` (see [`GemmStridedBatched`]). TF32 only where the launcher
    /// was built to allow it.
    ///
    /// # Safety
    /// Every matrix the arguments describe must lie inside live allocations of this launcher
    /// (the emulator checks this; a GPU does not).
    unsafe fn gemm_strided_batched(&self, g: &GemmStridedBatched) -> Result<()>;

    /// [`Launcher::gemm_strided_batched`] on bf16 *storage* (autocast with bf16 activations):
    /// A and B hold bf16 values (2 bytes each; element offsets, leading dimensions and strides
    /// count bf16 elements), products accumulate in f32, and C is written as f32 or, with
    /// `c_bf16`, rounded to bf16 (nearest even). On a GPU this is `cublasGemmStridedBatchedEx`
    /// with `CUDA_R_16BF` A and B, `CUDA_R_32F` or `CUDA_R_16BF` C and `CUBLAS_COMPUTE_32F`;
    /// the emulator widens the stored values exactly and runs its cuBLAS-convention GEMM.
    ///
    /// # Safety
    /// As [`Launcher::gemm_strided_batched`], with A and B measured in 2-byte elements and C in
    /// 2 or 4.
    unsafe fn gemm_strided_batched_bf16_storage(
        &self,
        g: &GemmStridedBatched,
        c_bf16: bool,
    ) -> Result<()>;

    /// Waits for all work issued so far.
    fn synchronize(&self) -> Result<()>;

    /// Bytes allocated and not yet freed.
    fn bytes_in_use(&self) -> usize;

    /// The largest [`Launcher::bytes_in_use`] since the device was made or since the last
    /// [`Launcher::reset_peak_bytes`] (what a step's memory is measured by).
    fn peak_bytes(&self) -> usize;

    /// Starts a new peak at the bytes in use now.
    fn reset_peak_bytes(&self);
}

/// The bits every fresh allocation is filled with where allocations are poisoned (always on
/// the emulator): a quiet NaN read as f32, and read as two bf16 values a quiet NaN in each half
/// (a plain f32 NaN, 0x7fc00000, would read as a bf16 zero in its low half).
pub const POISON_BITS: u32 = 0x7fc0_7fc0;
