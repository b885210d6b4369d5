//! Limits every configuration checks: probabilities, and sizes that could not be allocated.

use performer_tensor::{Error, Result};

pub(super) fn check_prob(op: &str, name: &str, p: f32) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(op, name, p, "must lie in [0, 1)"));
    }
    Ok(())
}

/// The most scalars a model may hold: more than this many f32 values cannot be addressed
/// (`isize::MAX` bytes), so larger sizes are refused before anything is allocated.
pub const MAX_ELEMENTS: u128 = (isize::MAX as u128) / 4;

/// `a * b * ...` for the size check: `None` once it passes [`MAX_ELEMENTS`].
pub(super) fn elements(factors: &[usize]) -> Option<u128> {
    factors.iter().try_fold(1u128, |acc, &f| {
        acc.checked_mul(f as u128).filter(|&p| p <= MAX_ELEMENTS)
    })
}

/// An error for a size `arg` = `value` whose tables would exceed [`MAX_ELEMENTS`].
pub(super) fn too_large(op: &str, arg: &str, value: impl std::fmt::Display, what: String) -> Error {
    Error::invalid(
        op,
        arg,
        value,
        format!("{what} would exceed {MAX_ELEMENTS} elements (more than isize::MAX bytes)"),
    )
}
