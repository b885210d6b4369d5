//! `cargo xtask kernels [--out DIR]`: writes the PTX of every CUDA kernel source for sm_80 and
//! sm_90 (NVRTC, exactly what the crate compiles at run time; plus nvcc's when nvcc is found),
//! then prints `ptxas -v`'s registers, shared memory and spills per kernel and fails on any
//! local-memory use. The PTX is not embedded in the crate (it compiles at run time), so these
//! files are for reading and for ptxas, under `target/kernels/` by default.

use std::path::{Path, PathBuf};
use std::process::Command;

use performer_cuda::kernel_sources::{self, CHECKED_ARCHES, SOURCES};

/// Command line of `cargo xtask kernels`.
#[derive(clap::Parser, Debug)]
#[command(
    about = "Write NVRTC (and nvcc) PTX of the CUDA kernels for sm_80/sm_90 and print ptxas register and spill use"
)]
struct Args {
    /// Where to write the PTX (default: target/kernels).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Entry point.
pub fn run(args: &[String]) -> Result<(), String> {
    let args: Args = crate::cli::parse("kernels", args)?;
    let out = args.out.unwrap_or_else(|| {
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::workspace::root().join("target"))
            .join("kernels")
    });
    if !performer_cuda::nvrtc_available() {
        return Err(format!(
            "libnvrtc.so.13 not found (pip install nvidia-cuda-nvrtc==13.*); searched {:?}",
            performer_cuda::search_dirs()
        ));
    }
    let ptxas = kernel_sources::find_ptxas();
    let nvcc = ptxas
        .as_ref()
        .and_then(|p| p.parent())
        .map(|d| d.join("nvcc"))
        .filter(|p| p.is_file());
    let mut local_memory = Vec::new();
    for arch in CHECKED_ARCHES {
        let dir = out.join(arch);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for src in SOURCES {
            let ptx = kernel_sources::compile_ptx(src, arch).map_err(|e| e.to_string())?;
            let path = dir.join(src.name.replace(".cu", ".ptx"));
            std::fs::write(&path, &ptx.image).map_err(|e| format!("{}: {e}", path.display()))?;
            println!("wrote {}", path.display());
            if let Some(nvcc) = &nvcc {
                nvcc_ptx(nvcc, src, arch, &dir)?;
            }
            let Some(ptxas) = &ptxas else { continue };
            for r in kernel_sources::ptxas_resources(ptxas, &ptx.image, arch)? {
                println!(
                    "  {arch} {:<22} {:>3} registers {:>6} B smem {:>4} B stack {:>4} B spill stores {:>4} B spill loads",
                    r.name, r.registers, r.shared, r.stack_frame, r.spill_stores, r.spill_loads
                );
                if r.stack_frame + r.spill_stores + r.spill_loads > 0 {
                    local_memory.push(format!("{arch} {}", r.name));
                }
            }
        }
    }
    if ptxas.is_none() {
        println!("ptxas not found (pip install nvidia-cuda-nvcc==13.*): no register report");
    }
    if local_memory.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "kernels using local memory: {}",
            local_memory.join(", ")
        ))
    }
}

/// nvcc's PTX of the same text, for comparison with NVRTC's (`<name>.nvcc.ptx`).
fn nvcc_ptx(
    nvcc: &Path,
    src: &kernel_sources::KernelSource,
    arch: &str,
    dir: &Path,
) -> Result<(), String> {
    let cu = dir.join(format!("{}.full.cu", src.name.trim_end_matches(".cu")));
    std::fs::write(&cu, kernel_sources::full_source(src))
        .map_err(|e| format!("{}: {e}", cu.display()))?;
    let out = dir.join(src.name.replace(".cu", ".nvcc.ptx"));
    let status = Command::new(nvcc)
        .args(["-ptx", "-std=c++17", "-lineinfo"])
        .arg(format!("-arch={}", arch.replacen("sm_", "compute_", 1)))
        .arg(&cu)
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => println!("wrote {} (nvcc)", out.display()),
        // nvcc needs a host compiler even for -ptx; NVRTC's PTX above is the one that matters.
        Ok(s) => println!("nvcc -ptx {} failed ({s}); NVRTC PTX written", src.name),
        Err(e) => println!("nvcc not runnable ({e}); NVRTC PTX written"),
    }
    Ok(())
}
