//! The causal CUDA kernels, f32 and TF32, executed on the CPU: tests/host_emulation/driver.cpp
//! compiles kernels/causal.cu and kernels/causal_tf32.cu as C++ with one OS thread per CUDA
//! thread, block barriers, warp shuffles and an emulated TF32 `mma.sync.m16n8k8` (fragment
//! layout of the PTX ISA, operands checked to be TF32), and runs the launch sequence of
//! `ops::causal_linear_attention` and its backward on NaN-poisoned buffers. The outputs are
//! compared with the f64 reference: f32 within 1e-4, TF32 within 1e-3. This checks the kernels'
//! indexing, masks, tiling, fragment layouts and TF32 rounding on a machine without a GPU; what
//! it cannot check (timing, the real instructions' rounding, races a real GPU would expose) is
//! left to tests/gpu_parity.rs on a GPU.
//!
//! Needs a C++20 compiler (`c++`); skips with a note without one (fails instead when
//! PERFORMER_CUDA_REQUIRE_CXX is set). Skips where a CUDA driver is present: there the real
//! kernels run (gpu_parity), and the minute this takes would come out of a short GPU session.

use std::path::{Path, PathBuf};
use std::process::Command;

use performer_cuda::reference::{self as r, Dims, Rng};

fn note(msg: String) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// Builds the driver into a fresh folder; None (with a note) where there is no compiler.
fn build_driver(dir: &Path) -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("tests/host_emulation/driver.cpp");
    if !src.is_file() {
        note(format!(
            "SKIPPED host emulation: {} not present (bundled binary)",
            src.display()
        ));
        return None;
    }
    let exe = dir.join("driver");
    let status = Command::new("c++")
        .args(["-std=c++20", "-O2", "-pthread", "-Wno-unknown-pragmas"])
        .arg(format!("-I{}", root.join("kernels").display()))
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .status();
    match status {
        Ok(s) if s.success() => Some(exe),
        Ok(s) => panic!("compiling {} failed: {s}", src.display()),
        Err(e) => {
            assert!(
                std::env::var_os("PERFORMER_CUDA_REQUIRE_CXX").is_none(),
                "PERFORMER_CUDA_REQUIRE_CXX is set but c++ did not run: {e}"
            );
            note(format!(
                "SKIPPED host emulation: no C++ compiler (c++: {e})"
            ));
            None
        }
    }
}

fn write_f32(path: &Path, x: &[f64]) {
    let bytes: Vec<u8> = x.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn read_f32(path: &Path) -> Vec<f64> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
        .collect()
}

#[test]
fn causal_kernels_run_on_the_cpu_within_their_bounds() {
    if performer_cuda::driver_available() {
        note(
            "SKIPPED host emulation: a CUDA driver is present, gpu_parity runs the kernels".into(),
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("performer-cuda-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let Some(driver) = build_driver(&dir) else {
        let _ = std::fs::remove_dir_all(&dir);
        return;
    };
    // Lengths past a chunk boundary and mid-chunk, m and e not multiples of the 32-wide
    // reduction step or the 64-wide tiles, bh > 1; small enough for 256 OS threads per block.
    let cases = [(2usize, 100usize, 72usize, 40usize), (1, 64, 32, 70)];
    let mut failures = Vec::new();
    for (ci, &(bh, n, m, e)) in cases.iter().enumerate() {
        let dims = Dims { bh, n, d: 1, m, e };
        let mut rng = Rng::new(40 + ci as u64);
        // Positive features of the softmax map's range and spread.
        let scale = (m as f64).powf(-0.5);
        let qf: Vec<f64> = rng
            .normal_vec(bh * n * m, 0.5)
            .iter()
            .map(|x| scale * x.exp())
            .collect();
        let kf: Vec<f64> = rng
            .normal_vec(bh * n * m, 0.5)
            .iter()
            .map(|x| scale * x.exp())
            .collect();
        let v = rng.normal_vec(bh * n * e, 1.0);
        let g = rng.normal_vec(bh * n * e, 1.0);
        // The reference sees exactly the f32 inputs the kernels see.
        let round = |x: &[f64]| x.iter().map(|&v| v as f32 as f64).collect::<Vec<_>>();
        let (qf, kf, v, g) = (round(&qf), round(&kf), round(&v), round(&g));
        for (name, x) in [("qf", &qf), ("kf", &kf), ("v", &v), ("g", &g)] {
            write_f32(&dir.join(format!("{name}.bin")), x);
        }
        let (want_out, want_den) = r::causal_linear_attention(&qf, &kf, &v, dims);
        let (wdqf, wdkf, wdv) = r::causal_linear_attention_backward(&qf, &kf, &v, &g, dims);
        for (suffix, tol) in [("", 1e-4), ("_tf32", 1e-3)] {
            let t0 = std::time::Instant::now();
            let status = Command::new(&driver)
                .arg(&dir)
                .args([bh, n, m, e].map(|x| x.to_string()))
                .arg(suffix)
                .status()
                .expect("run driver");
            assert!(
                status.success(),
                "driver{suffix} bh{bh} n{n} m{m} e{e}: {status}"
            );
            let mut line = format!(
                "emulated{suffix:<5} bh{bh} n{n} m{m} e{e} ({:.1}s):",
                t0.elapsed().as_secs_f64()
            );
            for (what, want) in [
                ("out", &want_out),
                ("den", &want_den),
                ("dqf", &wdqf),
                ("dkf", &wdkf),
                ("dv", &wdv),
            ] {
                let got = read_f32(&dir.join(format!("{what}{suffix}.bin")));
                // NaN (an unwritten element) reads as infinite error.
                let err = r::max_rel_err(&got, want);
                line += &format!(" {what} {err:.2e}");
                if err.is_nan() || err > tol {
                    failures.push(format!("{suffix} bh{bh} n{n} m{m} e{e} {what}: {err:.3e}"));
                }
            }
            println!("{line}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "above bound:\n{}", failures.join("\n"));
}
