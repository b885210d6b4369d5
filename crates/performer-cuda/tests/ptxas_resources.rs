//! `ptxas -v` on the NVRTC PTX of every kernel for sm_80 and sm_90: no local-memory spills, no
//! stack frame (local arrays) in any kernel, the causal ones above all (f32 and TF32). Prints
//! the register table. Needs NVRTC and ptxas (`pip install nvidia-cuda-nvrtc==13.* nvidia-cuda-nvcc==13.*`);
//! skips with a note where either is missing (fails instead when PERFORMER_CUDA_REQUIRE_PTXAS
//! is set).

use performer_cuda::kernel_sources::{self, CHECKED_ARCHES, SOURCES};

#[test]
fn no_kernel_spills_to_local_memory() {
    let note = |msg: String| {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "{msg}");
    };
    if !performer_cuda::nvrtc_available() {
        note("SKIPPED no_kernel_spills_to_local_memory: libnvrtc.so.13 not found (pip install nvidia-cuda-nvrtc==13.*)".into());
        return;
    }
    let Some(ptxas) = kernel_sources::find_ptxas() else {
        // Fail instead of skipping where ptxas is required (CI sets this after installing it).
        assert!(
            std::env::var_os("PERFORMER_CUDA_REQUIRE_PTXAS").is_none(),
            "PERFORMER_CUDA_REQUIRE_PTXAS is set but ptxas was not found"
        );
        note("SKIPPED no_kernel_spills_to_local_memory: ptxas not found (pip install nvidia-cuda-nvcc==13.*)".into());
        return;
    };
    let mut bad = Vec::new();
    let mut tf32_checked = 0;
    for arch in CHECKED_ARCHES {
        for src in SOURCES {
            let ptx = kernel_sources::compile_ptx(src, arch).unwrap_or_else(|e| panic!("{e}"));
            let report = kernel_sources::ptxas_resources(&ptxas, &ptx.image, arch)
                .unwrap_or_else(|e| panic!("{e}"));
            for f in src.functions {
                let r = report.iter().find(|r| r.name == *f).unwrap_or_else(|| {
                    panic!("{arch} {}: ptxas reported nothing for {f}", src.name)
                });
                if src.name == kernel_sources::CAUSAL_TF32.name {
                    tf32_checked += 1;
                    // 256 threads of at most 128 registers leave room for two blocks per SM;
                    // more would halve the occupancy the tiling was sized for.
                    if r.registers > 128 {
                        bad.push(format!("{arch} {}: {} registers", r.name, r.registers));
                    }
                }
                println!(
                    "{arch} {:<26} {:>3} registers {:>6} B smem {:>4} B stack {:>4} B spill st {:>4} B spill ld",
                    r.name, r.registers, r.shared, r.stack_frame, r.spill_stores, r.spill_loads
                );
                if r.spill_stores + r.spill_loads + r.stack_frame > 0 {
                    bad.push(format!("{arch} {}: {r:?}", r.name));
                }
            }
        }
    }
    assert_eq!(
        tf32_checked,
        CHECKED_ARCHES.len() * kernel_sources::CAUSAL_TF32.functions.len(),
        "every TF32 kernel checked on every architecture"
    );
    assert!(
        bad.is_empty(),
        "kernels using local memory (or TF32 kernels over 128 registers):\n{}",
        bad.join("\n")
    );
}

#[test]
fn parses_ptxas_output() {
    let text = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'chunk_output_fwd' for 'sm_90'\n\
ptxas info    : Function properties for chunk_output_fwd\n\
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 96 registers, used 1 barriers, 33024 bytes smem, 432 bytes cmem[0]\n";
    let r = kernel_sources::parse_ptxas(text);
    assert_eq!(r.len(), 1);
    assert_eq!(
        r[0],
        kernel_sources::KernelResources {
            name: "chunk_output_fwd".into(),
            registers: 96,
            spill_stores: 4,
            spill_loads: 12,
            stack_frame: 8,
            shared: 33024,
        }
    );
}
