//! Learning-rate schedules: a pure function of the step, so a resumed run that knows its step
//! continues the schedule exactly, with no state to save.

use crate::{Error, Result};

/// Linear warm-up from 0 to `peak` over `warmup` steps, then a cosine from `peak` down to `min`
/// at step `decay_steps`, then `min` (nanoGPT's schedule; the cosine of Loshchilov & Hutter's
/// SGDR without restarts).
///
/// Step numbers count optimizer steps from 1: `lr(1)` is the rate of the first update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WarmupCosine {
    /// The rate at the end of the warm-up.
    pub peak: f32,
    /// The rate from `decay_steps` on.
    pub min: f32,
    /// Steps of linear warm-up (0: start at `peak`).
    pub warmup: u64,
    /// The step at which the cosine reaches `min`.
    pub decay_steps: u64,
}

impl WarmupCosine {
    /// A schedule, checked: finite rates with `0 <= min <= peak`, `warmup <= decay_steps`.
    pub fn new(peak: f32, min: f32, warmup: u64, decay_steps: u64) -> Result<Self> {
        if !(peak.is_finite() && min.is_finite() && 0.0 <= min && min <= peak) {
            return Err(Error::invalid(
                "WarmupCosine",
                "min",
                format!("{min} (peak {peak})"),
                "finite rates with 0 <= min <= peak",
            ));
        }
        if warmup > decay_steps {
            return Err(Error::invalid(
                "WarmupCosine",
                "warmup",
                format!("{warmup} (decay_steps {decay_steps})"),
                "at most decay_steps",
            ));
        }
        Ok(WarmupCosine {
            peak,
            min,
            warmup,
            decay_steps,
        })
    }

    /// The learning rate of optimizer step `step` (1-based).
    pub fn lr(&self, step: u64) -> f32 {
        let (peak, min) = (self.peak as f64, self.min as f64);
        if self.warmup > 0 && step <= self.warmup {
            // Step 1 of 100 trains at peak / 100, step 100 at peak.
            return (peak * step as f64 / self.warmup as f64) as f32;
        }
        if step >= self.decay_steps {
            return self.min;
        }
        let span = (self.decay_steps - self.warmup) as f64;
        let progress = (step - self.warmup) as f64 / span;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        (min + (peak - min) * cosine) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_decays_to_the_floor() {
        let s = WarmupCosine::new(1e-3, 1e-4, 10, 110).unwrap();
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-6 * b.abs();
        assert!(close(s.lr(1), 1e-4), "{}", s.lr(1));
        assert!(close(s.lr(5), 5e-4), "{}", s.lr(5));
        assert!(close(s.lr(10), 1e-3), "{}", s.lr(10));
        // Half way through the cosine: the mean of peak and floor.
        assert!((s.lr(60) - 5.5e-4).abs() < 1e-9, "{}", s.lr(60));
        assert!(s.lr(11) < 1e-3 && s.lr(11) > 0.999e-3);
        assert_eq!(s.lr(110), 1e-4);
        assert_eq!(s.lr(10_000), 1e-4);
        let mut last = f32::INFINITY;
        for step in 10..=110 {
            assert!(s.lr(step) <= last, "not decreasing at {step}");
            last = s.lr(step);
        }
    }

    #[test]
    fn without_warm_up_the_cosine_starts_at_the_peak() {
        let s = WarmupCosine::new(2e-3, 0.0, 0, 100).unwrap();
        assert_eq!(s.lr(0), 2e-3);
        // One step of a hundred into the cosine: 1 - cos(pi / 100) of the way down, halved.
        assert!((s.lr(1) - 2e-3 * 0.5 * (1.0 + (std::f32::consts::PI / 100.0).cos())).abs() < 1e-9);
        assert_eq!(s.lr(100), 0.0);
    }

    #[test]
    fn bad_settings_are_errors() {
        assert!(WarmupCosine::new(1e-3, 2e-3, 0, 10).is_err());
        assert!(WarmupCosine::new(f32::NAN, 0.0, 0, 10).is_err());
        assert!(WarmupCosine::new(1e-3, -1.0, 0, 10).is_err());
        assert!(WarmupCosine::new(1e-3, 0.0, 11, 10).is_err());
    }
}
