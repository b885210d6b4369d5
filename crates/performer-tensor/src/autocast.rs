//! bf16 autocast for the device path, performer-pytorch's `amp_enabled` (PyTorch's
//! `torch.autocast(dtype=torch.bfloat16)`), opt-in per thread like [`crate::no_grad`].
//!
//! Inside [`autocast_bf16`], every matrix product of device tensors ([`crate::Tensor::matmul`]
//! on `Device::Cuda` or `Device::Emulated`) reads its operands as bf16 and accumulates in f32
//! (cuBLAS `CUBLAS_COMPUTE_32F_FAST_16BF`), and so do the two products of its backward, whenever
//! the backward runs. Everything else is unchanged and stays f32: tensors in memory (activations
//! are f32 values, rounded to bf16 only as GEMM operands), parameters (the master weights), the
//! optimizer's state, the FAVOR+ kernels (feature maps, causal running sums and normalizer),
//! softmax, norms and the loss. On the CPU autocast changes nothing.

use std::cell::Cell;

thread_local! {
    static AUTOCAST_BF16: Cell<bool> = const { Cell::new(false) };
}

/// Whether device matrix products on this thread run in bf16 (see the module's docs).
pub fn is_autocast_bf16() -> bool {
    AUTOCAST_BF16.with(|a| a.get())
}

/// Restores the previous autocast mode when dropped.
pub struct AutocastGuard {
    previous: bool,
}

impl AutocastGuard {
    /// Sets bf16 autocast on (or off) for this thread until the guard is dropped.
    pub fn new(enabled: bool) -> Self {
        let previous = AUTOCAST_BF16.with(|a| a.replace(enabled));
        AutocastGuard { previous }
    }
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        AUTOCAST_BF16.with(|a| a.set(self.previous));
    }
}

/// Runs `f` with bf16 autocast on the device path (`enabled` false: as it is).
pub fn autocast_bf16<R>(enabled: bool, f: impl FnOnce() -> R) -> R {
    let _guard = AutocastGuard::new(enabled);
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_restores_the_previous_mode() {
        assert!(!is_autocast_bf16());
        autocast_bf16(true, || {
            assert!(is_autocast_bf16());
            autocast_bf16(false, || assert!(!is_autocast_bf16()));
            assert!(is_autocast_bf16());
        });
        assert!(!is_autocast_bf16());
    }
}
