//! bf16 autocast for the device path, performer-pytorch's `amp_enabled` (PyTorch's
//! `torch.autocast(dtype=torch.bfloat16)`), opt-in per thread like [`crate::no_grad`].
//!
//! Inside [`autocast_bf16`], device tensors' activations are stored in bf16, following PyTorch
//! autocast's rules. A matrix product of device tensors ([`crate::Tensor::matmul`], and a linear
//! layer's product and bias, [`crate::Tensor::matmul_add`]) reads bf16 operands (f32 ones cast
//! to temporaries), accumulates in f32 (cuBLAS `CUBLAS_COMPUTE_32F` on `CUDA_R_16BF` matrices)
//! and writes bf16; the two products of its backward read bf16 operands and write f32
//! gradients, whenever the backward runs. Element-wise ops, activations, dropout and layout
//! copies of bf16 inputs write bf16; a binary op of bf16 and f32 writes f32. Everything else
//! reads its inputs through f32 copies and writes f32: softmax, norms, reductions, the loss,
//! the FAVOR+ kernels (feature maps, causal running sums and normalizer). Parameters (the
//! master weights), every gradient and the optimizer's state stay f32. On the CPU autocast
//! changes nothing.

use std::cell::Cell;

thread_local! {
    static AUTOCAST_BF16: Cell<bool> = const { Cell::new(false) };
}

/// Whether device matrix products on this thread run in bf16 (see the module's docs).
pub fn is_autocast_bf16() -> bool {
    AUTOCAST_BF16.with(|a| a.get())
}

/// Sets this thread's autocast mode; returns the previous one.
pub(crate) fn set_autocast_bf16(enabled: bool) -> bool {
    AUTOCAST_BF16.with(|a| a.replace(enabled))
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
