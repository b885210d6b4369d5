//! Comparisons for tests, strict where a hand-written `zip` and `fold(0.0, f32::max)` is not.
//!
//! That fold drops NaN (`f32::max(0.0, NaN)` is `0.0`), and `zip` stops at the shorter side, so
//! an all-NaN or a truncated output scores a perfect 0. The functions here refuse both: the
//! error is `max |actual - expected| / max |expected|` (absolute where `expected` is all zeros,
//! the measure of the parity fixtures), and it is an error, never a small number, when the
//! shapes or lengths differ or either side holds a NaN or an infinity.
//!
//! ```
//! use performer_tensor::ndarray::arr1;
//! use performer_tensor::testing::{assert_close, relative_error};
//!
//! assert_close("out", &arr1(&[1.0, 2.0]), &arr1(&[1.0, 2.0 + 1e-7]), 1e-6);
//! assert!(relative_error(&arr1(&[f32::NAN, 2.0]), &arr1(&[1.0, 2.0])).is_err());
//! assert!(relative_error(&[1.0f32, 2.0][..], &[1.0f32, 2.0, 3.0][..]).is_err());
//! ```

use ndarray::{ArrayD, ArrayViewD, AsArray, Dimension};

use crate::{Gradients, Tensor};

/// `max |actual - expected| / max |expected|` over arrays of one shape (absolute where
/// `expected` is all zeros). `Err` says why the two cannot be compared: different shapes, or a
/// NaN or infinity on either side (with its index).
pub fn relative_error<'a, 'b, D1: Dimension, D2: Dimension>(
    actual: impl AsArray<'a, f32, D1>,
    expected: impl AsArray<'b, f32, D2>,
) -> Result<f32, String> {
    let (actual, expected) = (actual.into().into_dyn(), expected.into().into_dyn());
    compare(&actual, &expected).map(|c| c.error)
}

/// `max |actual - expected|` over arrays of one shape, with [`relative_error`]'s refusals.
pub fn absolute_error<'a, 'b, D1: Dimension, D2: Dimension>(
    actual: impl AsArray<'a, f32, D1>,
    expected: impl AsArray<'b, f32, D2>,
) -> Result<f32, String> {
    let (actual, expected) = (actual.into().into_dyn(), expected.into().into_dyn());
    compare(&actual, &expected).map(|c| c.difference)
}

/// The worst element of a comparison.
struct Comparison {
    error: f32,
    difference: f32,
    scale: f32,
    worst: Option<(Vec<usize>, f32, f32)>,
}

fn compare(actual: &ArrayViewD<f32>, expected: &ArrayViewD<f32>) -> Result<Comparison, String> {
    if actual.shape() != expected.shape() {
        return Err(format!(
            "shape {:?} where {:?} is expected",
            actual.shape(),
            expected.shape()
        ));
    }
    let mut scale = 0.0f32;
    for (pos, &e) in expected.indexed_iter() {
        if !e.is_finite() {
            return Err(format!("the expected value at {:?} is {e}", pos.slice()));
        }
        scale = scale.max(e.abs());
    }
    let mut diff = 0.0f32;
    let mut worst = None;
    for ((pos, &a), &e) in actual.indexed_iter().zip(expected.iter()) {
        if !a.is_finite() {
            return Err(format!("{a} at {:?} (expected {e})", pos.slice()));
        }
        let d = (a - e).abs();
        if d > diff || worst.is_none() {
            diff = d.max(diff);
            worst = Some((pos.slice().to_vec(), a, e));
        }
    }
    let error = if scale > 0.0 { diff / scale } else { diff };
    Ok(Comparison {
        error,
        difference: diff,
        scale,
        worst,
    })
}

/// Panics unless `actual` and `expected` have one shape, hold only finite values and agree to
/// [`relative_error`] `<= tolerance`; the message names `what`, the error and the worst element.
/// Returns the error, for a report.
#[track_caller]
pub fn assert_close<'a, 'b, D1: Dimension, D2: Dimension>(
    what: &str,
    actual: impl AsArray<'a, f32, D1>,
    expected: impl AsArray<'b, f32, D2>,
    tolerance: f32,
) -> f32 {
    let (actual, expected) = (actual.into().into_dyn(), expected.into().into_dyn());
    match compare(&actual, &expected) {
        Err(why) => panic!("{what}: not comparable: {why}"),
        Ok(c) if c.error <= tolerance => c.error,
        Ok(c) => {
            let (pos, a, e) = c.worst.unwrap_or_default();
            panic!(
                "{what}: relative error {:.3e} above the tolerance {tolerance:.1e} (worst at {pos:?}: \
                 {a} where {e} is expected; scale {:.3e})",
                c.error, c.scale
            )
        }
    }
}

/// [`assert_close`] with an absolute tolerance: `max |actual - expected| <= tolerance`.
#[track_caller]
pub fn assert_abs_close<'a, 'b, D1: Dimension, D2: Dimension>(
    what: &str,
    actual: impl AsArray<'a, f32, D1>,
    expected: impl AsArray<'b, f32, D2>,
    tolerance: f32,
) -> f32 {
    let (actual, expected) = (actual.into().into_dyn(), expected.into().into_dyn());
    match compare(&actual, &expected) {
        Err(why) => panic!("{what}: not comparable: {why}"),
        Ok(c) if c.difference <= tolerance => c.difference,
        Ok(c) => {
            let (pos, a, e) = c.worst.unwrap_or_default();
            panic!(
                "{what}: absolute error {:.3e} above the tolerance {tolerance:.1e} (worst at {pos:?}: \
                 {a} where {e} is expected)",
                c.difference
            )
        }
    }
}

/// [`assert_close`] of two tensors.
#[track_caller]
pub fn assert_tensors_close(what: &str, actual: &Tensor, expected: &Tensor, tolerance: f32) -> f32 {
    assert_close(what, &actual.view(), &expected.view(), tolerance)
}

/// The gradient of `t` in `grads`; panics naming `what` when there is none (a gradient that
/// never arrived must fail a test, not compare as zeros or be skipped).
#[track_caller]
pub fn gradient<'g>(grads: &'g Gradients, t: &Tensor, what: &str) -> &'g ArrayD<f32> {
    match grads.get(t) {
        Some(g) => g,
        None => panic!("{what}: no gradient reached it"),
    }
}

/// Whether the emulated device can run here (it needs a C++ compiler), for device tests that
/// skip without one: prints why and returns false. With `PERFORMER_CUDA_REQUIRE_CXX=1` (as
/// `.ci/run` sets it) a device that does not start panics instead, so CI fails rather than
/// skips.
#[cfg(feature = "cuda")]
pub fn emulated_device_available() -> bool {
    match Tensor::full_on(&[1], 0.0, crate::Device::Emulated) {
        Ok(_) => true,
        Err(e) if std::env::var("PERFORMER_CUDA_REQUIRE_CXX").as_deref() != Ok("1") => {
            eprintln!("skipped: no emulated device here: {e}");
            false
        }
        Err(e) => panic!("PERFORMER_CUDA_REQUIRE_CXX=1 and the emulated device fails: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, arr1};

    #[test]
    fn nan_infinity_length_and_shape_are_errors() {
        let one = arr1(&[1.0f32, 2.0, 3.0]);
        assert_eq!(relative_error(&one, &one), Ok(0.0));
        let nan = arr1(&[f32::NAN; 3]);
        assert!(relative_error(&nan, &one).unwrap_err().contains("NaN"));
        assert!(relative_error(&one, &nan).is_err());
        let inf = arr1(&[1.0, f32::INFINITY, 3.0]);
        assert!(relative_error(&inf, &one).unwrap_err().contains("[1]"));
        assert!(relative_error(&one.slice(ndarray::s![..2]), &one).is_err());
        assert!(relative_error(&Array2::<f32>::zeros((3, 1)), &one).is_err());
        // A fold of f32::max over a zip scores both of these 0.
        let folded =
            |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert_eq!(folded(&[f32::NAN; 3], &[1.0, 2.0, 3.0]), 0.0);
        assert_eq!(folded(&[1.0], &[1.0, 2.0, 3.0]), 0.0);
    }

    #[test]
    fn relative_to_the_largest_expected_magnitude() {
        let e = relative_error(&arr1(&[1.0f32, 4.5]), &arr1(&[1.0f32, 5.0])).unwrap();
        assert!((e - 0.1).abs() < 1e-6, "{e}");
        // All zeros expected: the absolute difference.
        let e = relative_error(&arr1(&[0.25f32, 0.0]), &arr1(&[0.0f32, 0.0])).unwrap();
        assert_eq!(e, 0.25);
    }

    #[test]
    #[should_panic(expected = "out: not comparable")]
    fn assert_close_refuses_nan() {
        assert_close("out", &arr1(&[f32::NAN]), &arr1(&[1.0]), 1.0);
    }

    #[test]
    #[should_panic(expected = "relative error")]
    fn assert_close_refuses_a_large_error() {
        assert_close("out", &arr1(&[1.0f32, 2.0]), &arr1(&[1.0f32, 2.5]), 1e-3);
    }

    #[test]
    #[should_panic(expected = "x: no gradient reached it")]
    fn a_missing_gradient_fails() {
        let x = Tensor::var(arr1(&[1.0f32]).into_dyn());
        let y = Tensor::var(arr1(&[2.0f32]).into_dyn());
        let grads = x.sum_all().backward().unwrap();
        gradient(&grads, &x, "x");
        gradient(&grads, &y, "x");
    }
}
