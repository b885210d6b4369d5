//! LocalAttention's memory is O(n * window): the peak of live heap bytes during a forward and
//! backward, measured by a counting global allocator (this test binary holds only this test,
//! so nothing else allocates meanwhile), grows linearly with the sequence and stays far below
//! one (n, n) score matrix.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use ndarray::{ArrayD, IxDyn};
use performer_layers::LocalAttention;
use performer_tensor::Tensor;
use performer_tensor::rng::Generator;

/// The system allocator, counting live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to `System` unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on to System.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(live, Ordering::SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak live heap bytes above the starting level during a forward + backward at length `n`.
fn peak_bytes(n: usize, window: usize) -> usize {
    let (heads, d) = (2, 16);
    let la = LocalAttention::new(window, true, 0.0, d).unwrap();
    let mut g = Generator::seeded(n as u64);
    let mut input = || {
        Tensor::var(ArrayD::from_shape_simple_fn(
            IxDyn(&[1, heads, n, d]),
            || g.normal(),
        ))
    };
    let (q, k, v) = (input(), input(), input());
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let out = la.forward(&q, &k, &v, None).unwrap();
    let grads = out.sum_all().backward().unwrap();
    assert!(grads.get(&q).is_some());
    drop((out, grads));
    PEAK.load(Ordering::SeqCst) - base
}

#[test]
fn local_attention_memory_is_linear_in_length() {
    let window = 256;
    let small = peak_bytes(4096, window);
    let large = peak_bytes(16384, window);
    let scores_nn: u64 = 2 * 16384 * 16384 * 4; // one (n, n) f32 score matrix per head
    println!(
        "peak heap above the inputs, forward + backward, 2 heads, window {window}: n 4096 {:.1} MiB, n 16384 {:.1} MiB (an (n, n) score matrix: {} MiB)",
        small as f64 / 1048576.0,
        large as f64 / 1048576.0,
        scores_nn / 1048576
    );
    // Linear: 4x the length, at most 4.5x the memory (quadratic would be 16x).
    assert!(large * 2 <= small * 9, "{large} vs {small}: not linear");
    // O(n * window): a few window-wide blocks per query, never (n, n).
    let per_query_window = 2 * 16384 * window * 4 * 3;
    assert!(
        large <= per_query_window,
        "{large} bytes > 3 windows of scores per query"
    );
}
