//! The emulated device: the crate's `.cu` sources compiled as C++ and run on the CPU, with a
//! CPU GEMM in cuBLAS's place, behind the same [`Launcher`] as a real GPU.
//!
//! What it checks that a plain CPU implementation would not: the kernels' own indexing,
//! barriers and warp collectives (threads run in a random, seeded order; a barrier not reached
//! by every thread is an error), argument lists (number and kinds checked against each
//! kernel's signature; every pointer must point into a live allocation), reads of memory no
//! kernel wrote (fresh allocations are NaN), writes or reads past a buffer's end (a guard page
//! after every allocation faults), cuBLAS's column-major conventions, and running out of
//! memory (a capacity, [`Error::OutOfMemory`]). What it cannot check: timing, real rounding of
//! the GPU's instructions, and races between blocks (blocks run one at a time).
//!
//! The thread order comes from a seed: `PERFORMER_CUDA_EMU_SEED` (default 0x5eed), advanced by
//! every launch; a failing launch reports its seed.

mod build;
mod gemm;
mod memory;

use std::ffi::{CString, c_char, c_int, c_uint, c_ulonglong, c_void};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use crate::error::{Error, Result};
use crate::launcher::{DevicePtr, GemmStridedBatched, KernelArg, LaunchDims, Launcher};

pub use build::RUNTIME_HEADER;
use memory::Memory;

/// Default capacity of an emulated device: 4 GiB.
pub const DEFAULT_CAPACITY: usize = 4 << 30;

type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    *mut *mut c_void,
    *const u8,
    c_int,
    *const c_uint,
    *const c_uint,
    c_ulonglong,
    *mut c_char,
    usize,
) -> c_int;

/// The loaded kernel library, shared by every emulated device of the process. The emulator's
/// scheduler state is global in the library, hence the lock around every launch.
struct Library {
    _lib: libloading::Library,
    launch: LaunchFn,
    path: PathBuf,
}

fn library() -> Result<&'static Library> {
    static LIB: OnceLock<std::result::Result<Library, String>> = OnceLock::new();
    let r = LIB.get_or_init(|| {
        let path = build::library().map_err(|e| e.to_string())?;
        // SAFETY: the library is ours (built above from the crate's sources); loading it runs
        // only C++ static initialisers of plain data.
        let lib = unsafe { libloading::Library::new(&path) }
            .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
        // SAFETY: `performer_emu_launch` is defined in the generated translation unit with
        // exactly the signature of `LaunchFn`.
        let launch = unsafe { lib.get::<LaunchFn>(b"performer_emu_launch\0") }
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let launch = *launch;
        Ok(Library {
            _lib: lib,
            launch,
            path,
        })
    });
    r.as_ref().map_err(|detail| Error::Emulator {
        op: "emulated device",
        detail: detail.clone(),
    })
}

/// Whether the emulator's kernel library can be built here (a C++20 compiler is present) and
/// loaded. Builds it on first call.
pub fn emulator_available() -> Result<()> {
    build::library()?;
    library().map(|_| ())
}

fn scheduler_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // A panic while holding it leaves no state the next launch depends on.
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A device emulated on the CPU (see the module docs). Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct EmulatedLauncher {
    memory: Mutex<Memory>,
    seed: AtomicU64,
    capacity: usize,
}

impl EmulatedLauncher {
    /// An emulated device of [`DEFAULT_CAPACITY`], building the kernel library if needed.
    /// Fails with [`Error::CompilerUnavailable`] where there is no C++ compiler.
    pub fn new() -> Result<Self> {
        Self::with_capacity(DEFAULT_CAPACITY)
    }

    /// An emulated device whose allocations may total at most `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Result<Self> {
        build::library()?;
        library()?;
        let seed = std::env::var("PERFORMER_CUDA_EMU_SEED")
            .ok()
            .and_then(|s| {
                let s = s.trim();
                s.strip_prefix("0x")
                    .map_or_else(|| s.parse().ok(), |h| u64::from_str_radix(h, 16).ok())
            })
            .unwrap_or(0x5eed);
        Ok(Self {
            memory: Mutex::new(Memory::new(capacity)),
            seed: AtomicU64::new(seed),
            capacity,
        })
    }

    /// The capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Where the compiled kernel library is.
    pub fn library_path() -> Result<PathBuf> {
        Ok(library()?.path.clone())
    }

    fn mem(&self) -> MutexGuard<'_, Memory> {
        // Memory's map stays consistent across a panic in a caller (every update is one insert
        // or remove), so a poisoned lock is still usable.
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Launcher for EmulatedLauncher {
    fn describe(&self) -> String {
        "emulated".to_string()
    }

    fn arch(&self) -> String {
        "sm_90".to_string()
    }

    fn alloc(&self, bytes: usize) -> Result<DevicePtr> {
        self.mem().alloc(bytes)
    }

    fn free(&self, ptr: DevicePtr) -> Result<()> {
        self.mem().free(ptr)
    }

    fn copy_h2d(&self, dst: DevicePtr, src: &[u8]) -> Result<()> {
        crate::transfers::count_h2d(src.len());
        let mem = self.mem();
        mem.check_range("copy_h2d", "destination", dst, src.len())?;
        // SAFETY: the destination range lies in a live allocation (checked above, under the lock
        // that also guards frees), which cannot overlap the host slice.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    fn copy_d2h(&self, src: DevicePtr, dst: &mut [u8]) -> Result<()> {
        crate::transfers::count_d2h(dst.len());
        let mem = self.mem();
        mem.check_range("copy_d2h", "source", src, dst.len())?;
        // SAFETY: as in copy_h2d, with the roles swapped.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn copy_d2d(&self, dst: DevicePtr, src: DevicePtr, bytes: usize) -> Result<()> {
        let mem = self.mem();
        mem.check_range("copy_d2d", "source", src, bytes)?;
        mem.check_range("copy_d2d", "destination", dst, bytes)?;
        // SAFETY: both ranges lie in live allocations (checked above); `copy` allows overlap.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }

    unsafe fn launch(&self, name: &str, dims: LaunchDims, args: &[KernelArg]) -> Result<()> {
        const OP: &str = "launch";
        let lib = library()?;
        let mem = self.mem();
        if dims.shared_bytes != 0 {
            return Err(Error::Emulator {
                op: OP,
                detail: format!(
                    "kernel {name}: dynamic shared memory is not emulated ({} bytes asked)",
                    dims.shared_bytes
                ),
            });
        }
        for (i, a) in args.iter().enumerate() {
            if let KernelArg::Ptr(p) = *a
                && p != 0
                && mem.containing(p).is_none()
            {
                return Err(Error::Emulator {
                    op: OP,
                    detail: format!(
                        "kernel {name}: argument {i} ({p:#x}) is not inside a live allocation"
                    ),
                });
            }
        }
        let mut slots = vec![0u64; args.len()];
        let mut ptrs = crate::launcher::param_ptrs(args, &mut slots);
        let kinds: Vec<u8> = args.iter().map(KernelArg::kind).collect();
        let grid = [dims.grid.0, dims.grid.1, dims.grid.2];
        let block = [dims.block.0, dims.block.1, dims.block.2];
        let seed = self.seed.fetch_add(1, Ordering::Relaxed);
        let cname = CString::new(name).map_err(|_| Error::Emulator {
            op: OP,
            detail: format!("kernel name {name:?} has a NUL byte"),
        })?;
        let mut err = vec![0u8; 1024];
        let _sched = scheduler_lock();
        // SAFETY: `performer_emu_launch` reads `nargs` arguments, each as the parameter's type
        // after its kind was checked against the signature: an 8-byte slot (little-endian) for
        // a scalar or pointer, an index map in place (repr(C), laid out as the kernels'
        // `StridedIndex`, whose size both sides assert); `slots` and `args` outlive the call.
        // It also reads the 3-element grid and block arrays, and writes at most `err.len()` bytes
        // of message. The kernel's own memory accesses are the caller's contract (this fn's
        // safety section); every pointer argument was checked to point into a live allocation,
        // the memory lock keeps them alive, and the scheduler lock serialises the library's
        // global scheduler.
        let rc = unsafe {
            (lib.launch)(
                cname.as_ptr(),
                ptrs.as_mut_ptr(),
                kinds.as_ptr(),
                args.len() as c_int,
                grid.as_ptr(),
                block.as_ptr(),
                seed,
                err.as_mut_ptr() as *mut c_char,
                err.len(),
            )
        };
        drop(mem);
        if rc != 0 {
            let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
            return Err(Error::Emulator {
                op: OP,
                detail: format!(
                    "{} (seed {seed:#x}; PERFORMER_CUDA_EMU_SEED={seed:#x} replays it)",
                    String::from_utf8_lossy(&err[..end])
                ),
            });
        }
        Ok(())
    }

    unsafe fn gemm_strided_batched(&self, g: &GemmStridedBatched) -> Result<()> {
        let mem = self.mem();
        gemm::run(&mem, g, gemm::Operands::F32)
    }

    unsafe fn gemm_strided_batched_bf16_storage(
        &self,
        g: &GemmStridedBatched,
        c_bf16: bool,
    ) -> Result<()> {
        let mem = self.mem();
        let out = if c_bf16 {
            gemm::Operands::Bf16StoredToBf16
        } else {
            gemm::Operands::Bf16Stored
        };
        gemm::run(&mem, g, out)
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn bytes_in_use(&self) -> usize {
        self.mem().in_use()
    }

    fn peak_bytes(&self) -> usize {
        self.mem().peak()
    }

    fn reset_peak_bytes(&self) {
        self.mem().reset_peak()
    }
}
