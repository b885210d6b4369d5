//! A count of the copies between host and device memory, across every launcher of the process
//! (a GPU's and the emulator's): [`transfers`] reads it. It exists so that tests can check a
//! claim like "a decoding step copies no tensor data but its tokens and its logits": take a
//! reading before and after, and compare [`Transfers::since`].
//!
//! The kernels of [`tensor_ops`](crate::tensor_ops) that index through shapes and strides
//! upload that small description with each launch; those uploads are counted apart
//! ([`Transfers::meta_copies`]), as they carry no tensor values. Copies on the device (device
//! to device) are not counted. The counters are process-wide, so a test that reads them must
//! not run beside other device work of the same process.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

static H2D_COPIES: AtomicU64 = AtomicU64::new(0);
static H2D_BYTES: AtomicU64 = AtomicU64::new(0);
static META_COPIES: AtomicU64 = AtomicU64::new(0);
static D2H_COPIES: AtomicU64 = AtomicU64::new(0);
static D2H_BYTES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Whether this thread's uploads are launch metadata (inside [`as_metadata`]).
    static METADATA: Cell<bool> = const { Cell::new(false) };
}

/// Copies between host and device since the process started (or between two readings, from
/// [`Transfers::since`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfers {
    /// Host-to-device copies of values (tensors, token ids, masks).
    pub h2d_copies: u64,
    /// Bytes of those copies.
    pub h2d_bytes: u64,
    /// Host-to-device copies of launch metadata (the shapes and strides of a strided kernel).
    pub meta_copies: u64,
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
            meta_copies: self.meta_copies - earlier.meta_copies,
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
        meta_copies: META_COPIES.load(Ordering::SeqCst),
        d2h_copies: D2H_COPIES.load(Ordering::SeqCst),
        d2h_bytes: D2H_BYTES.load(Ordering::SeqCst),
    }
}

/// Runs `upload`, counting the uploads it makes on this thread as launch metadata.
pub(crate) fn as_metadata<T>(upload: impl FnOnce() -> T) -> T {
    let outer = METADATA.with(|m| m.replace(true));
    let out = upload();
    METADATA.with(|m| m.set(outer));
    out
}

/// Counts one host-to-device copy of `bytes` (called by every launcher's `copy_h2d`).
pub(crate) fn count_h2d(bytes: usize) {
    if METADATA.with(Cell::get) {
        META_COPIES.fetch_add(1, Ordering::SeqCst);
    } else {
        H2D_COPIES.fetch_add(1, Ordering::SeqCst);
        H2D_BYTES.fetch_add(bytes as u64, Ordering::SeqCst);
    }
}

/// Counts one device-to-host copy of `bytes` (called by every launcher's `copy_d2h`).
pub(crate) fn count_d2h(bytes: usize) {
    D2H_COPIES.fetch_add(1, Ordering::SeqCst);
    D2H_BYTES.fetch_add(bytes as u64, Ordering::SeqCst);
}
