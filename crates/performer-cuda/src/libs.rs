//! Finding the CUDA libraries that cudarc loads at run time.
//!
//! cudarc (`dynamic-loading`) opens `libnvrtc.so.13` and `libcublas.so.13` by name, so they must
//! be on the loader's path. PyPI's `nvidia-cuda-nvrtc` and `nvidia-cublas` wheels install them
//! inside Python's site-packages, which is not on that path, and `LD_LIBRARY_PATH` cannot be
//! changed from inside a running process. So when a library is not found by name we look for it
//! in the usual places and open it by full path first: the loader then matches the later
//! by-name open against the already loaded library's soname, and cudarc finds it.
//!
//! Searched, in order: the folders in `PERFORMER_CUDA_LIB_DIR` (colon-separated), `$CUDA_PATH`
//! and `$CUDA_HOME` (`lib64`, `lib`), `/usr/local/cuda/lib64`, and the `nvidia/*/lib` folders of
//! the Python packages that `python3` imports.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// A library we may preload, and how cudarc checks for it.
struct Lib {
    file: &'static str,
    /// Files opened before `file`, so that its dependencies resolve from the same folder.
    before: &'static [&'static str],
    present: fn() -> bool,
}

static NVRTC: Lib = Lib {
    file: "libnvrtc.so.13",
    before: &[],
    // SAFETY: only tries to dlopen libnvrtc by its usual names.
    present: || unsafe { cudarc::nvrtc::sys::is_culib_present() },
};

static CUBLAS: Lib = Lib {
    file: "libcublas.so.13",
    before: &["libcublasLt.so.13"],
    // SAFETY: only tries to dlopen libcublas by its usual names.
    present: || unsafe { cudarc::cublas::sys::is_culib_present() },
};

/// True when the CUDA driver library (libcuda) can be loaded, i.e. an NVIDIA driver is installed.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen libcuda by its usual names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// True when NVRTC can be loaded (from the loader's path or one of the searched folders).
pub fn nvrtc_available() -> bool {
    ensure_nvrtc("nvrtc_available").is_ok()
}

/// The folders searched for CUDA libraries besides the loader's own path (see the module docs).
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(v) = std::env::var_os("PERFORMER_CUDA_LIB_DIR") {
        dirs.extend(std::env::split_paths(&v));
    }
    for var in ["CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = std::env::var_os(var) {
            let root = PathBuf::from(root);
            dirs.push(root.join("lib64"));
            dirs.push(root.join("lib"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    dirs.extend(python_nvidia_lib_dirs());
    dirs
}

/// `nvidia/<pkg>/lib` folders of the `nvidia` namespace package that python3 imports.
fn python_nvidia_lib_dirs() -> Vec<PathBuf> {
    let script = "import nvidia, sys\nfor p in nvidia.__path__: print(p)";
    let mut out = Vec::new();
    for python in ["python3", "python"] {
        let Ok(res) = std::process::Command::new(python)
            .args(["-c", script])
            .stderr(std::process::Stdio::null())
            .output()
        else {
            continue;
        };
        if !res.status.success() {
            continue;
        }
        for root in String::from_utf8_lossy(&res.stdout).lines() {
            let root = Path::new(root.trim());
            // CUDA 13 wheels put everything in nvidia/cu13/lib; CUDA 12 ones in nvidia/<pkg>/lib.
            if let Ok(entries) = std::fs::read_dir(root) {
                for entry in entries.flatten() {
                    let lib = entry.path().join("lib");
                    if lib.is_dir() {
                        out.push(lib);
                    }
                }
            }
        }
        break;
    }
    out
}

/// Opens `lib` by full path from the first searched folder that has it; keeps it open forever.
fn preload(lib: &Lib) -> std::result::Result<(), String> {
    if (lib.present)() {
        return Ok(());
    }
    let dirs = search_dirs();
    for dir in &dirs {
        let path = dir.join(lib.file);
        if !path.is_file() {
            continue;
        }
        for dep in lib.before {
            let dep_path = dir.join(dep);
            if dep_path.is_file() {
                // SAFETY: loading a CUDA library runs only its own initialisers.
                if let Ok(handle) = unsafe { libloading::Library::new(&dep_path) } {
                    std::mem::forget(handle);
                }
            }
        }
        // SAFETY: as above. The handle is leaked on purpose: cudarc keeps using the library
        // for the life of the process, through its own by-name handle to the same object.
        match unsafe { libloading::Library::new(&path) } {
            Ok(handle) => {
                std::mem::forget(handle);
                if (lib.present)() {
                    return Ok(());
                }
            }
            Err(_) => continue,
        }
    }
    Err(dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", "))
}

fn ensure(
    op: &'static str,
    lib: &'static Lib,
    cell: &'static OnceLock<std::result::Result<(), String>>,
) -> Result<()> {
    cell.get_or_init(|| preload(lib))
        .clone()
        .map_err(|searched| Error::LibraryUnavailable {
            op,
            library: lib.file,
            searched,
        })
}

/// Makes sure cudarc can load NVRTC, preloading it from a searched folder if needed.
pub(crate) fn ensure_nvrtc(op: &'static str) -> Result<()> {
    static CELL: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    ensure(op, &NVRTC, &CELL)
}

/// Makes sure cudarc can load cuBLAS, preloading it from a searched folder if needed.
pub(crate) fn ensure_cublas(op: &'static str) -> Result<()> {
    static CELL: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    ensure(op, &CUBLAS, &CELL)
}

/// Makes sure the driver library is there, as a typed error instead of cudarc's panic.
pub(crate) fn ensure_driver(op: &'static str) -> Result<()> {
    if driver_available() {
        Ok(())
    } else {
        Err(Error::DriverUnavailable { op })
    }
}
