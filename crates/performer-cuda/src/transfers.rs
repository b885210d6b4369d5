//! A count of the copies between host and device memory, across every launcher of the process
//! (a GPU's and the emulator's): [`transfers`] reads it. It exists so that tests can check a
//! claim like "a decoding step copies no tensor data but its tokens and its logits": take a
//! reading before and after, and compare [`Transfers::since`].
//!
//! Every upload counts, launch arguments aside: the strided kernels of
//! [`tensor_ops`](crate::tensor_ops) take their shapes and strides as a parameter
//! ([`StridedIndex`](crate::strided_index::StridedIndex)), not as an uploaded array. Copies on
//! the device (device to device) are not counted. The counters are process-wide, so a test that reads them must
//! not run beside other device work of the same process.

use std::sync::atomic::{AtomicU64, Ordering};

static H2D_COPIES: AtomicU64 = AtomicU64::new(0);
static H2D_BYTES: AtomicU64 = AtomicU64::new(0);
static D2H_COPIES: AtomicU64 = AtomicU64::new(0);
static D2H_BYTES: AtomicU64 = AtomicU64::new(0);

/// Copies between host and device since the process started (or between two readings, from
/// [`Transfers::since`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfers {
    /// Host-to-device copies (tensors, token ids, masks).
    pub h2d_copies: u64,
    /// Bytes of those copies.
    pub h2d_bytes: u64,
    /// Device-to-host copies.
    pub d2h_copies: u64,
    /// Bytes copied device to host.
    pub d2h_bytes: u64,
}

impl Transfers {
    /// The copies made between `earlier` and this reading.
    pub fn since(&self, earlier: &Transfers) -> Transfers {
        Transfers {
            h2d_copies: self.h2d_copies - earlier.h2d_copies,
            h2d_bytes: self.h2d_bytes - earlier.h2d_bytes,
            d2h_copies: self.d2h_copies - earlier.d2h_copies,
            d2h_bytes: self.d2h_bytes - earlier.d2h_bytes,
        }
    }
}

/// The copies counted so far.
pub fn transfers() -> Transfers {
    Transfers {
        h2d_copies: H2D_COPIES.load(Ordering::SeqCst),
        h2d_bytes: H2D_BYTES.load(Ordering::SeqCst),
        d2h_copies: D2H_COPIES.load(Ordering::SeqCst),
        d2h_bytes: D2H_BYTES.load(Ordering::SeqCst),
    }
}

/// Counts one host-to-device copy of `bytes` (called by every launcher's `copy_h2d`).
pub(crate) fn count_h2d(bytes: usize) {
    H2D_COPIES.fetch_add(1, Ordering::SeqCst);
    H2D_BYTES.fetch_add(bytes as u64, Ordering::SeqCst);
}

/// Counts one device-to-host copy of `bytes` (called by every launcher's `copy_d2h`).
pub(crate) fn count_d2h(bytes: usize) {
    D2H_COPIES.fetch_add(1, Ordering::SeqCst);
    D2H_BYTES.fetch_add(bytes as u64, Ordering::SeqCst);
}
