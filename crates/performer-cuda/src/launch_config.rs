//! Grid and block shapes of the kernel launches.

use cudarc::driver::LaunchConfig;

/// Threads per block of the tiled kernels.
pub(crate) const THREADS: u32 = 256;

/// A grid of `threads`-wide blocks over `total` elements, for the grid-stride kernels.
pub(crate) fn grid_1d(total: usize, threads: u32) -> LaunchConfig {
    // Grid-stride kernels: cap the grid, the loop covers the rest.
    let blocks = total.div_ceil(threads as usize).clamp(1, 1 << 20) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}
