//! The crate's error type: every failure names the operation and, where shapes are involved,
//! the shapes, so a caller several layers up can tell what was asked of which kernel.

/// Errors of performer-cuda. No public function panics on bad input; it returns one of these.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CUDA driver library (libcuda) could not be loaded: no NVIDIA driver on this machine.
    #[error("{op}: the CUDA driver library (libcuda.so) is not present on this machine")]
    DriverUnavailable {
        /// The operation that needed the driver.
        op: &'static str,
    },
    /// The driver is present but there is no device with the requested ordinal.
    #[error("{op}: no CUDA device with ordinal {ordinal} ({count} device(s) present)")]
    NoDevice {
        /// The operation that needed the device.
        op: &'static str,
        /// The ordinal asked for.
        ordinal: usize,
        /// How many devices the driver reports.
        count: usize,
    },
    /// A CUDA library loaded at run time (NVRTC or cuBLAS) was not found.
    #[error("{op}: {library} could not be loaded; searched LD_LIBRARY_PATH and {searched}")]
    LibraryUnavailable {
        /// The operation that needed the library.
        op: &'static str,
        /// The library's file name, e.g. `libnvrtc.so.13`.
        library: &'static str,
        /// The folders that were tried besides the loader's default search path.
        searched: String,
    },
    /// NVRTC rejected a kernel source.
    #[error("{op}: NVRTC failed to compile {source_name} for {arch}: {message}\n{log}")]
    Compile {
        /// The operation that compiled.
        op: &'static str,
        /// The kernel source file name.
        source_name: &'static str,
        /// Target architecture, e.g. `sm_90`.
        arch: String,
        /// NVRTC's status.
        message: String,
        /// NVRTC's compile log.
        log: String,
    },
    /// No kernel of this name was loaded: the names are fixed in
    /// [`SOURCES`](crate::kernel_sources::SOURCES), so this is a bug in performer-cuda, not bad
    /// input.
    #[error("kernel lookup: no kernel named {name} in the compiled sources (a performer-cuda bug)")]
    KernelNotFound {
        /// The kernel asked for.
        name: String,
    },
    /// Inputs whose shapes or lengths do not fit the operation.
    #[error("{op}: shape mismatch: {detail}")]
    Shape {
        /// The operation that checked the shapes.
        op: &'static str,
        /// What did not match, with the shapes.
        detail: String,
    },
    /// A size beyond what the kernels index (32-bit sizes, 65535 grid rows).
    #[error("{op}: size out of range: {detail}")]
    TooLarge {
        /// The operation that checked the sizes.
        op: &'static str,
        /// Which size, and the limit.
        detail: String,
    },
    /// The device cannot run what was asked of it (e.g. TF32 tensor cores before sm_80).
    #[error("{op}: not supported on this device: {detail}")]
    Unsupported {
        /// The operation that was asked for.
        op: &'static str,
        /// What is missing, with the device's architecture.
        detail: String,
    },
    /// A device allocation past the device's free memory (the emulator's capacity, or what the
    /// driver reports as out of memory).
    #[error(
        "{op}: out of device memory: {requested} bytes requested, {in_use} of {capacity} in use"
    )]
    OutOfMemory {
        /// The operation that allocated.
        op: &'static str,
        /// Bytes asked for.
        requested: usize,
        /// Bytes already allocated on the device.
        in_use: usize,
        /// The device's capacity in bytes (0 where the driver does not say).
        capacity: usize,
    },
    /// Operands of one operation live on different devices.
    #[error("{op}: operands on different devices: {detail}")]
    DeviceMismatch {
        /// The operation.
        op: &'static str,
        /// Which operands, on which devices.
        detail: String,
    },
    /// The emulated device found a fault: a bad launch (argument list, divergent barrier), an
    /// access outside live allocations, an invalid cuBLAS argument, or a failed build.
    #[error("{op}: emulated device: {detail}")]
    Emulator {
        /// The operation.
        op: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// No C++ compiler to build the emulated device's kernels with.
    #[error("{op}: the emulated device needs a C++20 compiler; {compiler} could not run: {detail}")]
    CompilerUnavailable {
        /// The operation.
        op: &'static str,
        /// The compiler tried (`$CXX` or `c++`).
        compiler: String,
        /// The OS error.
        detail: String,
    },
    /// An error reported by the CUDA driver (allocation, copy, launch, module load).
    #[error("{op}: CUDA driver error: {source}")]
    Driver {
        /// The operation that called the driver.
        op: &'static str,
        /// The driver's error.
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// An error reported by cuBLAS.
    #[error("{op}: cuBLAS error: {source}")]
    Cublas {
        /// The operation that called cuBLAS.
        op: &'static str,
        /// cuBLAS's error.
        #[source]
        source: cudarc::cublas::result::CublasError,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds the operation's name to a driver error.
pub(crate) trait DriverContext<T> {
    fn op(self, op: &'static str) -> Result<T>;
}

impl<T> DriverContext<T> for std::result::Result<T, cudarc::driver::DriverError> {
    fn op(self, op: &'static str) -> Result<T> {
        self.map_err(|source| Error::Driver { op, source })
    }
}

impl<T> DriverContext<T> for std::result::Result<T, cudarc::cublas::result::CublasError> {
    fn op(self, op: &'static str) -> Result<T> {
        self.map_err(|source| Error::Cublas { op, source })
    }
}
