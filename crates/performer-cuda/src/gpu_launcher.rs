//! [`Launcher`] on a real GPU: cudarc's driver API for memory and launches (kernels compiled by
//! NVRTC, see [`kernel_sources`](crate::kernel_sources)), cuBLAS for the GEMMs, all on one stream.

use std::ffi::c_void;

use cudarc::cublas::sys as cublas_sys;
use cudarc::driver::{result as drv, sys as drv_sys};

use crate::device::CudaDevice;
use crate::error::{DriverContext, Error, Result};
use crate::launcher::{DevicePtr, GemmStridedBatched, KernelArg, LaunchDims, Launcher, Transpose};

/// A CUDA device behind the [`Launcher`] interface.
#[derive(Debug)]
pub struct GpuLauncher {
    dev: CudaDevice,
    allow_tf32: bool,
    poison: bool,
    in_use: std::sync::Mutex<std::collections::HashMap<DevicePtr, usize>>,
    peak: std::sync::atomic::AtomicUsize,
}

impl GpuLauncher {
    /// Opens device `ordinal` (compiling the kernels on first use). cuBLAS GEMMs run in full
    /// f32 unless `allow_tf32` (TF32 tensor cores: about 1e-3 relative error).
    pub fn new(ordinal: usize, allow_tf32: bool) -> Result<Self> {
        Ok(Self {
            dev: CudaDevice::new(ordinal)?,
            allow_tf32,
            poison: false,
            in_use: std::sync::Mutex::new(std::collections::HashMap::new()),
            peak: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// A testing aid: every allocation starts filled with NaN (as on the emulator), so an
    /// element no kernel writes shows up in a comparison instead of passing as leftover data.
    pub fn with_nan_poison(mut self) -> Self {
        self.poison = true;
        self
    }

    /// The underlying device handle.
    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    fn bind(&self, op: &'static str) -> Result<()> {
        self.dev.context().bind_to_thread().op(op)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<DevicePtr, usize>> {
        self.in_use.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn op_flag(t: Transpose) -> cublas_sys::cublasOperation_t {
    match t {
        Transpose::No => cublas_sys::cublasOperation_t::CUBLAS_OP_N,
        Transpose::Yes => cublas_sys::cublasOperation_t::CUBLAS_OP_T,
    }
}

impl Launcher for GpuLauncher {
    fn describe(&self) -> String {
        format!(
            "{} ({})",
            self.dev.name().unwrap_or_else(|_| "CUDA device".into()),
            self.dev.arch()
        )
    }

    fn arch(&self) -> String {
        self.dev.arch().to_string()
    }

    fn alloc(&self, bytes: usize) -> Result<DevicePtr> {
        const OP: &str = "alloc";
        self.bind(OP)?;
        let stream = self.dev.stream().cu_stream();
        // SAFETY: the stream belongs to this device's context, bound above; the memory is only
        // used through this launcher, whose work is all on that stream.
        match unsafe { drv::malloc_async(stream, bytes.max(1)) } {
            Ok(ptr) => {
                let now = {
                    let mut table = self.table();
                    table.insert(ptr, bytes);
                    table.values().sum::<usize>()
                };
                self.peak
                    .fetch_max(now, std::sync::atomic::Ordering::Relaxed);
                if self.poison && bytes >= 4 {
                    let len = bytes / 4;
                    // SAFETY: fill_f32(float* x, i64 len, float value) writes x[0..len), inside
                    // the allocation just made.
                    unsafe {
                        self.launch(
                            "fill_f32",
                            LaunchDims::cover(len, 256),
                            &[
                                KernelArg::Ptr(ptr),
                                KernelArg::I64(len as i64),
                                KernelArg::F32(f32::from_bits(crate::launcher::POISON_BITS)),
                            ],
                        )?;
                    }
                }
                Ok(ptr)
            }
            Err(e) if e.0 == drv_sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                Err(Error::OutOfMemory {
                    op: OP,
                    requested: bytes,
                    in_use: self.bytes_in_use(),
                    capacity: 0,
                })
            }
            Err(e) => Err(Error::Driver { op: OP, source: e }),
        }
    }

    fn free(&self, ptr: DevicePtr) -> Result<()> {
        const OP: &str = "free";
        if self.table().remove(&ptr).is_none() {
            return Err(Error::Shape {
                op: OP,
                detail: format!("{ptr:#x} is not a live allocation of this device"),
            });
        }
        self.bind(OP)?;
        // SAFETY: ptr came from malloc_async on this stream and is freed once (removed from the
        // table above); work using it was queued earlier on the same stream.
        unsafe { drv::free_async(ptr, self.dev.stream().cu_stream()) }.op(OP)
    }

    fn copy_h2d(&self, dst: DevicePtr, src: &[u8]) -> Result<()> {
        const OP: &str = "copy_h2d";
        crate::transfers::count_h2d(src.len());
        self.bind(OP)?;
        // SAFETY: dst is device memory of this context; the copy from pageable host memory
        // completes (is staged) before the call returns, so `src` may go away after it.
        unsafe { drv::memcpy_htod_async(dst, src, self.dev.stream().cu_stream()) }.op(OP)?;
        self.dev.synchronize()
    }

    fn copy_d2h(&self, src: DevicePtr, dst: &mut [u8]) -> Result<()> {
        const OP: &str = "copy_d2h";
        crate::transfers::count_d2h(dst.len());
        self.bind(OP)?;
        // SAFETY: src is device memory of this context; the stream is synchronised before
        // returning, so `dst` is fully written when the caller sees it.
        unsafe { drv::memcpy_dtoh_async(dst, src, self.dev.stream().cu_stream()) }.op(OP)?;
        self.dev.synchronize()
    }

    fn copy_d2d(&self, dst: DevicePtr, src: DevicePtr, bytes: usize) -> Result<()> {
        const OP: &str = "copy_d2d";
        self.bind(OP)?;
        // SAFETY: both are device memory of this context, used only on this stream.
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.dev.stream().cu_stream()) }.op(OP)
    }

    unsafe fn launch(&self, name: &str, dims: LaunchDims, args: &[KernelArg]) -> Result<()> {
        const OP: &str = "launch";
        self.bind(OP)?;
        let func = self.dev.kernel_by_name(name)?;
        let mut slots = vec![0u64; args.len()];
        let mut params = crate::launcher::param_ptrs(args, &mut slots);
        // SAFETY: each parameter pointer points at the argument's value: a slot holding a
        // scalar or pointer in its first bytes (little-endian), which is what cuLaunchKernel
        // reads for a parameter of that size, or an index map laid out as the kernel's
        // `StridedIndex` (repr(C), size asserted on both sides); `slots` and `args` outlive the
        // call, and the driver copies the parameters before returning. The argument list and
        // the memory it points to are the caller's contract (this fn's safety section).
        unsafe {
            drv::launch_kernel(
                func.cu_function(),
                dims.grid,
                dims.block,
                dims.shared_bytes,
                self.dev.stream().cu_stream(),
                &mut params,
            )
        }
        .op(OP)
    }

    unsafe fn gemm_strided_batched(&self, g: &GemmStridedBatched) -> Result<()> {
        const OP: &str = "gemm_strided_batched";
        g.validate()
            .map_err(|detail| Error::Shape { op: OP, detail })?;
        self.bind(OP)?;
        let blas = self.dev.blas(OP)?;
        let handle = *blas.handle();
        let mode = if self.allow_tf32 {
            cublas_sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
        } else {
            cublas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH
        };
        // SAFETY: the handle is this device's, bound to its stream; alpha and beta are host
        // scalars that outlive the call; the matrices are the caller's contract.
        unsafe {
            cublas_sys::cublasSetMathMode(handle, mode)
                .result()
                .op(OP)?;
            cudarc::cublas::result::sgemm_strided_batched(
                handle,
                op_flag(g.transa),
                op_flag(g.transb),
                g.m,
                g.n,
                g.k,
                &g.alpha,
                g.a as *const f32,
                g.lda,
                g.stride_a,
                g.b as *const f32,
                g.ldb,
                g.stride_b,
                &g.beta,
                g.c as *mut f32,
                g.ldc,
                g.stride_c,
                g.batch,
            )
            .op(OP)
        }
    }

    unsafe fn gemm_strided_batched_bf16_storage(
        &self,
        g: &GemmStridedBatched,
        c_bf16: bool,
    ) -> Result<()> {
        const OP: &str = "gemm_strided_batched_bf16_storage";
        g.validate()
            .map_err(|detail| Error::Shape { op: OP, detail })?;
        self.bind(OP)?;
        let blas = self.dev.blas(OP)?;
        let handle = *blas.handle();
        let bf16_type = cublas_sys::cudaDataType::CUDA_R_16BF;
        let c_type = if c_bf16 {
            bf16_type
        } else {
            cublas_sys::cudaDataType::CUDA_R_32F
        };
        // SAFETY: as in gemm_strided_batched: this device's handle on its stream, host f32
        // scalars alpha and beta (CUBLAS_COMPUTE_32F's scale type), A and B bf16 and C f32 or
        // bf16 in live allocations by the caller's contract.
        unsafe {
            cublas_sys::cublasSetMathMode(handle, cublas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH)
                .result()
                .op(OP)?;
            cublas_sys::cublasGemmStridedBatchedEx(
                handle,
                op_flag(g.transa),
                op_flag(g.transb),
                g.m,
                g.n,
                g.k,
                (&g.alpha as *const f32).cast::<c_void>(),
                g.a as *const c_void,
                bf16_type,
                g.lda,
                g.stride_a,
                g.b as *const c_void,
                bf16_type,
                g.ldb,
                g.stride_b,
                (&g.beta as *const f32).cast::<c_void>(),
                g.c as *mut c_void,
                c_type,
                g.ldc,
                g.stride_c,
                g.batch,
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
            .result()
            .op(OP)
        }
    }

    fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()
    }

    fn bytes_in_use(&self) -> usize {
        self.table().values().sum()
    }

    fn peak_bytes(&self) -> usize {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn reset_peak_bytes(&self) {
        self.peak
            .store(self.bytes_in_use(), std::sync::atomic::Ordering::Relaxed);
    }
}
