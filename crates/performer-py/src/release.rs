//! Where the extension's compute runs: off the GIL, on one of rayon's threads.

use pyo3::prelude::*;

/// Runs `f` with the GIL released, on one of rayon's threads
/// (`performer_tensor::team::on_pool`, which carries this thread's generator, gradient mode,
/// autocast and bf16 products' mode over): from the Python thread itself every parallel op
/// would hand its loop to the pool and sleep, and the cores would run three threads. Measured
/// on the 2-core Zen 4, the main job's model (dim 128, depth 3, batch 4 x 256), alternating
/// processes (means of 100 and 50 calls): `loss = wrapper(x); loss.backward()` 47.5 / 47.8 /
/// 46.7 ms -> 44.3 / 43.4 / 45.2 ms, `lm(x)` 13.8 / 15.4 / 14.8 ms -> 14.1 / 13.6 / 13.3 ms.
/// (`Trainer.step` and `generate` already ran on the pool.)
pub(crate) fn run_released<R: Send>(py: Python<'_>, f: impl FnOnce() -> R + Send) -> R {
    py.detach(|| performer_tensor::team::on_pool(f))
}
