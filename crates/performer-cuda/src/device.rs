//! A CUDA device with the crate's kernels loaded: context, stream, compiled modules, cuBLAS.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, PushKernelArg};
use cudarc::nvrtc::Ptx;

use crate::error::{DriverContext, Error, Result};
use crate::kernel_sources::{self, KernelSource};
use crate::launch_config::{THREADS, grid_1d};
use crate::libs;

/// The loaded kernels of one device, by function name.
pub(crate) struct Kernels {
    functions: HashMap<&'static str, CudaFunction>,
}

impl Kernels {
    fn load(ctx: &Arc<CudaContext>, arch: &str) -> Result<Self> {
        let mut functions = HashMap::new();
        for src in kernel_sources::SOURCES {
            Self::load_source(ctx, arch, src, &mut functions)?;
        }
        Ok(Self { functions })
    }

    fn load_source(
        ctx: &Arc<CudaContext>,
        arch: &str,
        src: &KernelSource,
        functions: &mut HashMap<&'static str, CudaFunction>,
    ) -> Result<()> {
        const OP: &str = "load kernels";
        let cubin = kernel_sources::compile_cubin(src, arch)?;
        let module = ctx.load_module(Ptx::from_binary(cubin.image)).op(OP)?;
        for &name in src.functions {
            functions.insert(name, module.load_function(name).op(OP)?);
        }
        Ok(())
    }

    /// The kernel `name`; the names are fixed in [`kernel_sources::SOURCES`], so a miss is a bug here,
    /// reported as an error rather than a panic all the same.
    pub(crate) fn get(&self, name: &str) -> Result<&CudaFunction> {
        self.functions
            .get(name)
            .ok_or_else(|| Error::KernelNotFound {
                name: name.to_string(),
            })
    }
}

/// What is shared by every [`CudaDevice`] handle of one ordinal in this process.
struct Shared {
    ctx: Arc<CudaContext>,
    arch: String,
    kernels: Kernels,
}

/// Per process and device: compiling the kernels takes NVRTC a second or two, so it is done
/// once per ordinal, on first use.
fn shared(ordinal: usize) -> Result<Arc<Shared>> {
    static CACHE: OnceLock<Mutex<HashMap<usize, Arc<Shared>>>> = OnceLock::new();
    const OP: &str = "open CUDA device";
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    // A poisoned lock only means another thread panicked while compiling; the map is still valid.
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = map.get(&ordinal) {
        return Ok(s.clone());
    }
    libs::ensure_driver(OP)?;
    cudarc::driver::result::init().op(OP)?;
    let count = CudaContext::device_count().op(OP)?.max(0) as usize;
    if ordinal >= count {
        return Err(Error::NoDevice {
            op: OP,
            ordinal,
            count,
        });
    }
    let ctx = CudaContext::new(ordinal).op(OP)?;
    let (major, minor) = ctx.compute_capability().op(OP)?;
    let arch = format!("sm_{major}{minor}");
    let kernels = Kernels::load(&ctx, &arch)?;
    let s = Arc::new(Shared { ctx, arch, kernels });
    map.insert(ordinal, s.clone());
    Ok(s)
}

/// A CUDA device ready to run the crate's kernels. Cheap to clone.
///
/// All work is issued on one stream per handle; the host-side helpers synchronise it.
#[derive(Clone)]
pub struct CudaDevice {
    shared: Arc<Shared>,
    stream: Arc<CudaStream>,
    blas: Arc<OnceLock<std::result::Result<Arc<CudaBlas>, String>>>,
    poison: Option<f32>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.shared.ctx.ordinal())
            .field("arch", &self.shared.arch)
            .finish()
    }
}

impl CudaDevice {
    /// Opens device `ordinal`, compiling the kernels for it on first use in this process.
    ///
    /// Fails with [`Error::DriverUnavailable`] where there is no NVIDIA driver,
    /// [`Error::NoDevice`] where the ordinal does not exist and [`Error::LibraryUnavailable`]
    /// where NVRTC cannot be found.
    pub fn new(ordinal: usize) -> Result<Self> {
        let shared = shared(ordinal)?;
        let stream = shared.ctx.default_stream();
        Ok(Self {
            shared,
            stream,
            blas: Arc::new(OnceLock::new()),
            poison: None,
        })
    }

    /// Number of CUDA devices, or 0 where there is no driver.
    pub fn count() -> usize {
        if !libs::driver_available() || cudarc::driver::result::init().is_err() {
            return 0;
        }
        CudaContext::device_count()
            .map(|c| c.max(0) as usize)
            .unwrap_or(0)
    }

    /// The device's architecture as NVRTC names it, e.g. `sm_90`.
    pub fn arch(&self) -> &str {
        &self.shared.arch
    }

    /// The device's name as the driver reports it.
    pub fn name(&self) -> Result<String> {
        self.shared.ctx.name().op("device name")
    }

    /// The CUDA context (shared by all handles of this ordinal).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.shared.ctx
    }

    /// The stream all of this handle's work runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Copies host data to a new device buffer.
    pub fn upload(&self, data: &[f32]) -> Result<CudaSlice<f32>> {
        self.stream.clone_htod(data).op("upload")
    }

    /// Copies a device buffer to a new host vector (waits for the stream).
    pub fn download(&self, buf: &CudaSlice<f32>) -> Result<Vec<f32>> {
        let v = self.stream.clone_dtoh(buf).op("download")?;
        // A copy to pageable memory already completes before returning; the explicit wait
        // keeps that guarantee if cudarc ever switches to a pinned staging buffer.
        self.synchronize()?;
        Ok(v)
    }

    /// A testing aid: a handle whose every buffer allocated by this crate (outputs and
    /// scratch) starts filled with `value` instead of zeros. With NaN, an output element that
    /// no kernel wrote shows up in a comparison instead of passing as a plausible zero.
    pub fn with_poison(mut self, value: f32) -> Self {
        self.poison = Some(value);
        self
    }

    /// A device buffer of `len` floats: zeros, or the poison value of [`Self::with_poison`].
    pub fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        let mut buf = self.stream.alloc_zeros::<f32>(len.max(1)).op("alloc")?;
        if let Some(value) = self.poison {
            self.fill("alloc", &mut buf, value)?;
        }
        Ok(buf)
    }

    /// Sets every element of `buf` to `value` (the `fill_f32` kernel).
    pub(crate) fn fill(
        &self,
        op: &'static str,
        buf: &mut CudaSlice<f32>,
        value: f32,
    ) -> Result<()> {
        let len = buf.len();
        let len_i = len as i64;
        // SAFETY: `fill_f32(float* x, i64 len, float value)` takes exactly these three
        // arguments, in this order and of these types; it writes `x[i]` for `i < len` only, and
        // `len` is the buffer's own length, so every write lands inside `buf`, which the
        // exclusive borrow keeps alive and unaliased until the launch is queued on this
        // handle's stream (later work on the buffer is ordered after it on the same stream).
        unsafe {
            self.stream
                .launch_builder(self.kernel("fill_f32")?)
                .arg(buf)
                .arg(&len_i)
                .arg(&value)
                .launch(grid_1d(len, THREADS))
                .op(op)?;
        }
        Ok(())
    }

    /// Waits for all work issued on this handle's stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().op("synchronize")
    }

    pub(crate) fn kernel(&self, name: &'static str) -> Result<&CudaFunction> {
        self.shared.kernels.get(name)
    }

    /// The kernel `name` of [`kernel_sources::SOURCES`], by a name known only at run time.
    pub(crate) fn kernel_by_name(&self, name: &str) -> Result<&CudaFunction> {
        self.shared.kernels.get(name)
    }

    /// cuBLAS on this handle's stream, created (and the library located) on first use.
    pub(crate) fn blas(&self, op: &'static str) -> Result<Arc<CudaBlas>> {
        let r = self.blas.get_or_init(|| {
            libs::ensure_cublas(op).map_err(|e| e.to_string())?;
            CudaBlas::new(self.stream.clone())
                .map(Arc::new)
                .map_err(|e| format!("cublasCreate failed: {e}"))
        });
        r.clone().map_err(|detail| Error::LibraryUnavailable {
            op,
            library: "libcublas.so.13",
            searched: detail,
        })
    }
}
