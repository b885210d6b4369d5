//! The CUDA C sources of the crate and their compilation by NVRTC.
//!
//! Sources live in `kernels/*.cu` and are embedded with `include_str!`; nothing precompiled is
//! embedded (see [`EMBEDDED_PTX`]). At run time each source is compiled by NVRTC to a CUBIN for
//! the device's exact architecture (`sm_XY`), once per process and device. A CUBIN rather than
//! PTX because a CUBIN does not depend on the driver being at least as new as NVRTC: PTX from a
//! newer NVRTC is refused by an older driver's JIT, machine code is not.

use std::ffi::{CStr, CString, c_char};

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};

use crate::error::{Error, Result};
use crate::libs;

/// Helpers shared by every source; prepended to each before compilation.
pub const COMMON_HEADER: &str = include_str!("../kernels/common.cuh");

/// One kernel source file and the `extern "C"` kernels it defines.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// File name under `kernels/`.
    pub name: &'static str,
    /// The file's text (without [`COMMON_HEADER`]).
    pub source: &'static str,
    /// Names of the `extern "C" __global__` functions in it.
    pub functions: &'static [&'static str],
}

/// FAVOR+ softmax feature map, forward and backward.
pub const FAVOR: KernelSource = KernelSource {
    name: "favor.cu",
    source: include_str!("../kernels/favor.cu"),
    functions: &["favor_project", "favor_exp", "favor_backward"],
};

/// Causal linear attention (chunkwise), forward and backward, and the shared gradient prep.
pub const CAUSAL: KernelSource = KernelSource {
    name: "causal.cu",
    source: include_str!("../kernels/causal.cu"),
    functions: &[
        "chunk_state_fwd",
        "chunk_state_rev",
        "chunk_output_fwd",
        "chunk_output_rev",
        "chunk_grad_feat_fwd",
        "chunk_grad_feat_rev",
        "attention_grad_prep",
    ],
};

/// Causal linear attention (chunkwise) with the inner products on TF32 tensor cores (sm_80+),
/// f32 accumulation: the same kernels as [`CAUSAL`] with a `_tf32` suffix and the same
/// arguments. The gradient prep stays in [`CAUSAL`] (it has no product to speed up).
pub const CAUSAL_TF32: KernelSource = KernelSource {
    name: "causal_tf32.cu",
    source: include_str!("../kernels/causal_tf32.cu"),
    functions: &[
        "chunk_state_fwd_tf32",
        "chunk_state_rev_tf32",
        "chunk_output_fwd_tf32",
        "chunk_output_rev_tf32",
        "chunk_grad_feat_fwd_tf32",
        "chunk_grad_feat_rev_tf32",
    ],
};

/// Element-wise helpers: non-causal linear attention (its products are cuBLAS GEMMs) and fill.
pub const LINEAR: KernelSource = KernelSource {
    name: "linear.cu",
    source: include_str!("../kernels/linear.cu"),
    functions: &["augment_ones", "normalize_rows", "fill_f32"],
};

/// The general tensor kernels of the device path (element-wise, reductions, softmax, norms,
/// embedding, loss, dropout, rotary, token shift, optimizers).
pub const TENSOR: KernelSource = KernelSource {
    name: "tensor.cu",
    source: include_str!("../kernels/tensor.cu"),
    functions: &[
        "unary_f32",
        "unary_backward_f32",
        "binary_f32",
        "binary_backward_f32",
        "strided_copy_f32",
        "sum_to_f32",
        "strided_scatter_f32",
        "gather_f32",
        "gather_backward_f32",
        "where_f32",
        "where_backward_f32",
        "max_rows_backward_f32",
        "norm_rows_backward_f32",
        "reduce_rows_f32",
        "sum_cols_f32",
        "softmax_rows_f32",
        "softmax_rows_backward_f32",
        "layer_norm_rows_f32",
        "layer_norm_rows_backward_f32",
        "scale_norm_rows_f32",
        "scale_norm_rows_backward_f32",
        "embedding_f32",
        "embedding_backward_f32",
        "cross_entropy_f32",
        "cross_entropy_backward_f32",
        "ratio_f32",
        "dropout_f32",
        "rotary_f32",
        "token_shift_f32",
        "adam_f32",
        "sgd_f32",
        "clip_scale_f32",
        "f32_to_bf16",
        "bf16_to_f32",
    ],
};

/// Every kernel source of the crate.
pub const SOURCES: &[KernelSource] = &[FAVOR, CAUSAL, CAUSAL_TF32, LINEAR, TENSOR];

/// The architectures CI compiles every kernel for.
pub const CHECKED_ARCHES: &[&str] = &["sm_80", "sm_90"];

/// Precompiled PTX embedded in the crate, as (source name, arch, PTX). Empty on purpose: the
/// kernels are compiled at run time by NVRTC, so there is nothing that could go stale. The
/// freshness test asserts this stays empty unless it also learns to compare.
pub const EMBEDDED_PTX: &[(&str, &str, &str)] = &[];

/// What NVRTC produced: the image (PTX text or CUBIN bytes) and its log (warnings).
#[derive(Debug, Clone)]
pub struct Compiled {
    /// PTX text (NUL-free) or CUBIN bytes.
    pub image: Vec<u8>,
    /// NVRTC's log; empty when there was nothing to say.
    pub log: String,
}

/// The text handed to NVRTC for `src`: the common header, then the file.
pub fn full_source(src: &KernelSource) -> String {
    // #line keeps NVRTC's error positions relative to the .cu file, not the concatenation.
    format!("{COMMON_HEADER}\n#line 1 \"{}\"\n{}", src.name, src.source)
}

/// NVRTC options used for every compile. No fast-math: expf and IEEE division keep the
/// kernels within 1e-4 of the f64 reference.
fn options(arch_flag: String) -> Vec<String> {
    vec![
        arch_flag,
        "--std=c++17".to_string(),
        "-lineinfo".to_string(),
        "--fmad=true".to_string(),
    ]
}

/// Compiles `src` to PTX for a virtual architecture (`arch` like `sm_90` is mapped to `compute_90`).
pub fn compile_ptx(src: &KernelSource, arch: &str) -> Result<Compiled> {
    let virt = arch.replacen("sm_", "compute_", 1);
    let mut out = compile(
        src,
        arch,
        options(format!("--gpu-architecture={virt}")),
        false,
    )?;
    // NVRTC's PTX ends with a NUL; keep it text.
    while out.image.last() == Some(&0) {
        out.image.pop();
    }
    Ok(out)
}

/// Compiles `src` to a CUBIN for a real architecture such as `sm_90`.
pub fn compile_cubin(src: &KernelSource, arch: &str) -> Result<Compiled> {
    compile(
        src,
        arch,
        options(format!("--gpu-architecture={arch}")),
        true,
    )
}

fn compile(src: &KernelSource, arch: &str, opts: Vec<String>, cubin: bool) -> Result<Compiled> {
    const OP: &str = "compile kernels";
    libs::ensure_nvrtc(OP)?;
    let fail = |message: String, log: String| Error::Compile {
        op: OP,
        source_name: src.name,
        arch: arch.to_string(),
        message,
        log,
    };
    if !arch.starts_with("sm_")
        || arch.len() < 5
        || !arch[3..].bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(fail(
            format!("unsupported architecture name {arch:?}"),
            String::new(),
        ));
    }
    let text = CString::new(full_source(src))
        .map_err(|_| fail("source contains a NUL byte".into(), String::new()))?;
    let name = CString::new(src.name).map_err(|_| fail("bad source name".into(), String::new()))?;
    let prog = nvrtc::create_program(&text, Some(&name))
        .map_err(|e| fail(e.to_string(), String::new()))?;
    // Owns the program so it is destroyed on every path.
    struct Prog(nvrtc_sys::nvrtcProgram);
    impl Drop for Prog {
        fn drop(&mut self) {
            // SAFETY: created by create_program and destroyed only here.
            let _ = unsafe { nvrtc::destroy_program(self.0) };
        }
    }
    let prog = Prog(prog);
    // SAFETY: prog is a live program; options are NUL-free ASCII.
    let status = unsafe { nvrtc::compile_program(prog.0, &opts) };
    // SAFETY: as above.
    let log = unsafe { nvrtc::get_program_log(prog.0) }
        .map(|raw| c_chars_to_string(&raw))
        .unwrap_or_default();
    if let Err(e) = status {
        return Err(fail(e.to_string(), log));
    }
    let image = if cubin {
        let mut size = 0usize;
        // SAFETY: prog compiled successfully; the buffer has the size NVRTC reported.
        unsafe {
            nvrtc_sys::nvrtcGetCUBINSize(prog.0, &mut size)
                .result()
                .map_err(|e| fail(e.to_string(), log.clone()))?;
            let mut buf = vec![0u8; size];
            nvrtc_sys::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr().cast::<c_char>())
                .result()
                .map_err(|e| fail(e.to_string(), log.clone()))?;
            buf
        }
    } else {
        // SAFETY: prog compiled successfully.
        let raw =
            unsafe { nvrtc::get_ptx(prog.0) }.map_err(|e| fail(e.to_string(), log.clone()))?;
        raw.iter().map(|&c| c as u8).collect()
    };
    Ok(Compiled { image, log })
}

fn c_chars_to_string(raw: &[c_char]) -> String {
    let bytes: Vec<u8> = raw.iter().map(|&c| c as u8).collect();
    match CStr::from_bytes_until_nul(&bytes) {
        Ok(s) => s.to_string_lossy().trim().to_string(),
        Err(_) => String::from_utf8_lossy(&bytes).trim().to_string(),
    }
}

/// Register, spill and shared-memory use of one kernel as `ptxas -v` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelResources {
    /// Kernel (function) name.
    pub name: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of local-memory spill stores.
    pub spill_stores: u32,
    /// Bytes of local-memory spill loads.
    pub spill_loads: u32,
    /// Bytes of stack frame (local memory other than spills).
    pub stack_frame: u32,
    /// Bytes of static shared memory.
    pub shared: u32,
}

/// `ptxas` from `$PATH`, `$CUDA_PATH/bin`, `$CUDA_HOME/bin`, `/usr/local/cuda/bin`, or the `bin`
/// folder beside one of the library folders of [`crate::search_dirs`] (PyPI's
/// `nvidia-cuda-nvcc` puts it in `nvidia/cu13/bin`).
pub fn find_ptxas() -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    for var in ["CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = std::env::var_os(var) {
            candidates.push(PathBuf::from(root).join("bin"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin"));
    for lib in crate::search_dirs() {
        if let Some(parent) = lib.parent() {
            candidates.push(parent.join("bin"));
        }
    }
    candidates
        .into_iter()
        .map(|d| d.join("ptxas"))
        .find(|p| p.is_file())
}

/// Assembles `ptx` with `ptxas -arch=<arch> -v` and parses its per-kernel resource report.
pub fn ptxas_resources(
    ptxas: &std::path::Path,
    ptx: &[u8],
    arch: &str,
) -> std::result::Result<Vec<KernelResources>, String> {
    let dir = std::env::temp_dir().join(format!("performer-cuda-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let input = dir.join(format!("kernel-{arch}.ptx"));
    std::fs::write(&input, ptx).map_err(|e| format!("{}: {e}", input.display()))?;
    let output = std::process::Command::new(ptxas)
        .arg(format!("-arch={arch}"))
        .arg("-v")
        .arg(&input)
        .arg("-o")
        .arg(dir.join(format!("kernel-{arch}.cubin")))
        .output()
        .map_err(|e| format!("running {}: {e}", ptxas.display()))?;
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&output.stderr).to_string()
        + &String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!("ptxas failed ({}):\n{text}", output.status));
    }
    Ok(parse_ptxas(&text))
}

/// Parses `ptxas -v` output: a "Compiling entry function 'NAME'" line opens a kernel, the
/// following "bytes stack frame" and "Used N registers" lines fill it.
pub fn parse_ptxas(text: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    let num_before = |line: &str, key: &str| -> Option<u32> {
        let idx = line.find(key)?;
        line[..idx].split_whitespace().last()?.parse().ok()
    };
    for line in text.lines() {
        if let Some(start) = line.find("entry function '") {
            let rest = &line[start + "entry function '".len()..];
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            out.push(KernelResources {
                name,
                ..Default::default()
            });
            continue;
        }
        let Some(cur) = out.last_mut() else { continue };
        if line.contains("bytes stack frame") {
            cur.stack_frame = num_before(line, "bytes stack frame").unwrap_or(0);
            cur.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
            cur.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
        }
        if line.contains("Used") && line.contains("registers") {
            cur.registers = num_before(line, "registers").unwrap_or(0);
            cur.shared = num_before(line, "bytes smem").unwrap_or(0);
        }
    }
    out
}
