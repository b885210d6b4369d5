//! Shared by the emulator tests: the emulated device (or a skip), uploads and comparisons.

#![allow(dead_code)]

use std::sync::Arc;

use performer_cuda::reference::max_rel_err;
use performer_cuda::{
    CudaDevice, DeviceBuffer, EmulatedLauncher, Error, GpuLauncher, SharedLauncher,
};

/// Whether the tests run on a real GPU: where a CUDA device is present (the device bundle's
/// run), the same tests run there through [`GpuLauncher`], with NaN-filled allocations too.
pub fn on_gpu() -> bool {
    CudaDevice::count() > 0
}

/// The device the tests run on: GPU 0 where there is one, else the emulated device; None
/// (with a note) where no C++ compiler can build the emulator, which fails instead when
/// PERFORMER_CUDA_REQUIRE_CXX is set (CI).
pub fn emulated(test: &str) -> Option<SharedLauncher> {
    if on_gpu() {
        let gpu = GpuLauncher::new(0, false).unwrap_or_else(|e| panic!("{test}: {e}"));
        eprintln!("{test}: on {}", performer_cuda::Launcher::describe(&gpu));
        return Some(Arc::new(gpu.with_nan_poison()));
    }
    match EmulatedLauncher::new() {
        Ok(l) => Some(Arc::new(l)),
        Err(e @ Error::CompilerUnavailable { .. }) => {
            assert!(
                std::env::var_os("PERFORMER_CUDA_REQUIRE_CXX").is_none(),
                "{test}: PERFORMER_CUDA_REQUIRE_CXX is set but the emulator cannot be built: {e}"
            );
            eprintln!("SKIPPED {test}: {e}");
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

/// Uploads f64 values as f32.
pub fn up(dev: &SharedLauncher, x: &[f64]) -> DeviceBuffer {
    let v: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    DeviceBuffer::from_f32(dev, &v).unwrap_or_else(|e| panic!("{e}"))
}

/// Downloads as f64.
pub fn down(b: &DeviceBuffer) -> Vec<f64> {
    b.to_f32()
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(f64::from)
        .collect()
}

/// The values an f32 upload holds, as f64 (what the reference should see).
pub fn round(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| v as f32 as f64).collect()
}

/// Fails unless `got` matches `want` within `tol` relative to max |want| (NaN, infinities and
/// length mismatches fail).
pub fn close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    let err = max_rel_err(got, want);
    assert!(
        err <= tol,
        "{what}: max relative error {err:.3e} > {tol:.0e} (len {} vs {})",
        got.len(),
        want.len()
    );
}
