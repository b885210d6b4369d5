//! When to split element-wise work over rayon's threads.

/// Element counts at or above this are processed in parallel; below it the cost of waking
/// threads exceeds the work.
pub const PAR_THRESHOLD: usize = 1 << 15;

/// Number of threads rayon will use.
pub fn num_threads() -> usize {
    rayon::current_num_threads()
}
