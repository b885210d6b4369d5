//! Output buffers for large results.
//!
//! A fresh buffer of tens of megabytes comes straight from the kernel (glibc maps every block
//! of 32 MiB and more anew), and each of its 4 KiB pages faults on first write: on the virtual machines
//! measured here that cost as much as the matrix product that filled it (8192 faults for a
//! 32 MB output). Large buffers are therefore advised to the kernel as candidates for
//! transparent huge pages (2 MiB, 512 times fewer faults), where the kernel offers them in
//! `madvise` mode (PyTorch's CPU allocator does the same when `THP_MEM_ALLOC_ENABLE` is set).
//! Buffers are handed out
//! uninitialized: every caller writes each element before reading any.

use std::mem::MaybeUninit;

use ndarray::{ArrayD, IxDyn};

/// Buffers at least this large (in bytes) are advised for huge pages: glibc serves them with
/// a fresh mapping every time (its mmap threshold stops rising at 32 MiB), while smaller
/// blocks are recycled from the heap once warm and fault no more (advising those only cost a
/// little time in measurements).
const HUGE_PAGE_MIN_BYTES: usize = 32 << 20;

/// A vector of `len` uninitialized floats (capacity `len`, length `len`).
pub(crate) fn uninit_vec(len: usize) -> Vec<MaybeUninit<f32>> {
    let mut v: Vec<MaybeUninit<f32>> = Vec::with_capacity(len);
    // SAFETY: MaybeUninit needs no initialization; the capacity is `len`.
    unsafe { v.set_len(len) };
    advise_huge_pages(&mut v);
    v
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(v: &mut [MaybeUninit<f32>]) {
    const HUGE: usize = 2 << 20;
    let bytes = std::mem::size_of_val(v);
    if bytes < HUGE_PAGE_MIN_BYTES {
        return;
    }
    let start = v.as_mut_ptr() as usize;
    let (lo, hi) = (
        (start + HUGE - 1) & !(HUGE - 1),
        (start + bytes) & !(HUGE - 1),
    );
    if hi > lo {
        // SAFETY: [lo, hi) lies inside the vector's allocation; MADV_HUGEPAGE only changes how
        // the kernel backs the pages, never their contents. A failure (THP disabled) is harmless.
        unsafe {
            libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_: &mut [MaybeUninit<f32>]) {}

/// An uninitialized array of the given shape (standard layout).
pub(crate) fn uninit_array(shape: &[usize]) -> ndarray::Array<MaybeUninit<f32>, IxDyn> {
    let len = shape.iter().product();
    ndarray::Array::from_shape_vec(IxDyn(shape), uninit_vec(len)).expect("length matches the shape")
}

/// An uninitialized array of `x`'s shape whose axes lie in memory in the same order as `x`'s
/// (so that element-wise loops over both walk memory in step, e.g. for a transposed `x`).
pub(crate) fn uninit_in_layout_of(
    x: &ndarray::ArrayViewD<f32>,
) -> ndarray::Array<MaybeUninit<f32>, IxDyn> {
    let broadcast = x
        .shape()
        .iter()
        .zip(x.strides())
        .any(|(&d, &s)| d > 1 && s == 0);
    if x.is_standard_layout() || broadcast {
        return uninit_array(x.shape());
    }
    let order = memory_order(x);
    let shape: Vec<usize> = order.iter().map(|&i| x.shape()[i]).collect();
    uninit_array(&shape).permuted_axes(IxDyn(&inverse(&order)))
}

/// `x`'s axes from the largest stride to the smallest.
pub(crate) fn memory_order(x: &ndarray::ArrayViewD<f32>) -> Vec<usize> {
    let mut order: Vec<usize> = (0..x.ndim()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(x.strides()[i].unsigned_abs()));
    order
}

/// The inverse of a permutation.
pub(crate) fn inverse(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (k, &i) in perm.iter().enumerate() {
        inv[i] = k;
    }
    inv
}

/// The array once every element has been written.
///
/// # Safety
/// Every element of `a` must have been initialized.
pub(crate) unsafe fn assume_init(a: ndarray::Array<MaybeUninit<f32>, IxDyn>) -> ArrayD<f32> {
    // SAFETY: forwarded to the caller.
    unsafe { a.assume_init() }
}
