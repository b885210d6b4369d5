//! Every kernel source compiles under NVRTC for sm_80 and sm_90 (PTX and CUBIN), with every
//! kernel the crate launches present in the output. Runs without a GPU; needs libnvrtc, which
//! the crate finds on the loader path, in $PERFORMER_CUDA_LIB_DIR, $CUDA_PATH, /usr/local/cuda
//! or in python3's `nvidia` packages (`pip install nvidia-cuda-nvrtc==13.*`).

use performer_cuda::kernel_sources::{self, CHECKED_ARCHES, SOURCES};

fn nvrtc_or_skip(test: &str) -> bool {
    if performer_cuda::nvrtc_available() {
        return true;
    }
    // Fail instead of skipping where NVRTC is required (CI sets this after installing it).
    if std::env::var_os("PERFORMER_CUDA_REQUIRE_NVRTC").is_some() {
        panic!(
            "{test}: PERFORMER_CUDA_REQUIRE_NVRTC is set but libnvrtc.so.13 was not found; searched {:?}",
            performer_cuda::search_dirs()
        );
    }
    skip_note(format!(
        "SKIPPED {test}: libnvrtc.so.13 not found (pip install nvidia-cuda-nvrtc==13.*); searched {:?}",
        performer_cuda::search_dirs()
    ));
    false
}

#[test]
fn every_kernel_compiles_to_ptx_and_cubin() {
    if !nvrtc_or_skip("every_kernel_compiles_to_ptx_and_cubin") {
        return;
    }
    for src in SOURCES {
        for arch in CHECKED_ARCHES {
            let ptx = kernel_sources::compile_ptx(src, arch).unwrap_or_else(|e| panic!("{e}"));
            let text = String::from_utf8(ptx.image).expect("PTX is text");
            for f in src.functions {
                assert!(
                    text.contains(&format!(".entry {f}(")),
                    "{} for {arch}: kernel {f} missing from the PTX",
                    src.name
                );
            }
            let cubin = kernel_sources::compile_cubin(src, arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                cubin.image.starts_with(b"\x7fELF"),
                "{} {arch}: CUBIN is not an ELF image",
                src.name
            );
            if !ptx.log.is_empty() || !cubin.log.is_empty() {
                println!("{} {arch} NVRTC log:\n{}\n{}", src.name, ptx.log, cubin.log);
            }
            println!(
                "compiled {} for {arch}: {} kernels",
                src.name,
                src.functions.len()
            );
        }
    }
}

/// The TF32 causal kernels really use tensor cores where they can (sm_80, sm_90: TF32 `mma.sync`
/// and `cvt.rna.tf32.f32` in the PTX, no trap), and still compile for an older architecture
/// (every source is loaded on every device), where they trap instead; the host refuses TF32
/// there.
#[test]
fn tf32_kernels_use_tensor_cores_from_sm_80_and_compile_below() {
    if !nvrtc_or_skip("tf32_kernels_use_tensor_cores_from_sm_80_and_compile_below") {
        return;
    }
    const MMA: &str = "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32";
    const CVT: &str = "cvt.rna.tf32.f32";
    let src = &kernel_sources::CAUSAL_TF32;
    for arch in CHECKED_ARCHES {
        let ptx = kernel_sources::compile_ptx(src, arch).unwrap_or_else(|e| panic!("{e}"));
        let text = String::from_utf8(ptx.image).expect("PTX is text");
        for f in src.functions {
            let body = kernel_body(&text, f);
            assert!(body.contains(MMA), "{arch} {f}: no TF32 mma.sync");
            assert!(
                !body.contains("trap;"),
                "{arch} {f}: trap in the sm_80+ path"
            );
        }
        assert!(text.contains(CVT), "{arch}: no cvt.rna.tf32.f32");
        println!(
            "{arch} {}: {} TF32 mma.sync, {} cvt.rna.tf32",
            src.name,
            text.matches(MMA).count(),
            text.matches(CVT).count()
        );
    }
    let ptx = kernel_sources::compile_ptx(src, "sm_75").unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8(ptx.image).expect("PTX is text");
    assert!(!text.contains(MMA), "sm_75 has no TF32 mma");
    for f in src.functions {
        assert!(
            kernel_body(&text, f).contains("trap;"),
            "sm_75 {f}: no trap"
        );
    }
    kernel_sources::compile_cubin(src, "sm_75").unwrap_or_else(|e| panic!("{e}"));
    println!("sm_75 {}: compiles, kernels trap", src.name);
}

/// The PTX text of kernel `name`: from its `.entry` to the next one (or the end).
fn kernel_body<'a>(ptx: &'a str, name: &str) -> &'a str {
    let start = ptx
        .find(&format!(".entry {name}("))
        .unwrap_or_else(|| panic!("kernel {name} missing from the PTX"));
    let rest = &ptx[start + 1..];
    let end = rest.find(".entry ").map_or(ptx.len(), |i| start + 1 + i);
    &ptx[start..end]
}

#[test]
fn a_broken_kernel_is_rejected_with_the_log() {
    if !nvrtc_or_skip("a_broken_kernel_is_rejected_with_the_log") {
        return;
    }
    let broken = kernel_sources::KernelSource {
        name: "broken.cu",
        source: "extern \"C\" __global__ void broken(float* x) { x[0] = undefined_name; }",
        functions: &["broken"],
    };
    let err = kernel_sources::compile_ptx(&broken, "sm_90").unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("broken.cu") && msg.contains("undefined_name"),
        "{msg}"
    );
    let err = kernel_sources::compile_cubin(&broken, "not_an_arch").unwrap_err();
    assert!(
        err.to_string().contains("unsupported architecture"),
        "{err}"
    );
}

/// The crate embeds no precompiled PTX: kernels are compiled from the embedded .cu sources at
/// run time, so there is nothing that can be stale. If PTX is ever embedded, this test must
/// learn to compare it with a fresh NVRTC compile.
#[test]
fn embedded_ptx_is_fresh() {
    assert!(
        kernel_sources::EMBEDDED_PTX.is_empty(),
        "performer-cuda now embeds PTX; extend this test to compare it with a fresh compile"
    );
    println!("no PTX embedded: kernels are compiled by NVRTC at run time from kernels/*.cu");
}

/// The embedded sources are the files on disk (include_str! is resolved at build time, this
/// catches a stale build directory in a bundle built from other sources).
#[test]
fn embedded_sources_match_files() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    if !dir.is_dir() {
        skip_note(format!(
            "SKIPPED embedded_sources_match_files: {} not present (bundled binary)",
            dir.display()
        ));
        return;
    }
    for src in SOURCES {
        let on_disk = std::fs::read_to_string(dir.join(src.name)).expect("kernel source readable");
        assert_eq!(
            on_disk, src.source,
            "{} differs from the embedded copy",
            src.name
        );
    }
    let common = std::fs::read_to_string(dir.join("common.cuh")).expect("common.cuh readable");
    assert_eq!(common, kernel_sources::COMMON_HEADER);
}

/// Prints a skip notice past libtest's output capture (which hides `eprintln!` of passing
/// tests), so a skipped GPU/NVRTC test is visible in a plain `cargo test` log.
fn skip_note(msg: String) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{msg}");
}
