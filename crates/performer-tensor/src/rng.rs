//! A seeded, saveable random number generator (xoshiro256++), global per thread like
//! PyTorch's default generator.
//!
//! Dropout, weight initialization and random projections draw from it. Its whole state is
//! four `u64`s, so a checkpoint can save it and a reversible block can record it before a
//! forward and replay it in the recomputation of the backward.

use std::cell::RefCell;
use std::convert::Infallible;

use ndarray::{ArrayD, IxDyn};
use rand_distr::{Distribution, StandardNormal};

/// The xoshiro256++ generator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generator {
    s: [u64; 4],
}

/// A snapshot of a [`Generator`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RngState(pub [u64; 4]);

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Generator {
    /// A generator seeded from one number (through splitmix64, so nearby seeds diverge).
    pub fn seeded(seed: u64) -> Self {
        let mut x = seed;
        let s = [
            splitmix64(&mut x),
            splitmix64(&mut x),
            splitmix64(&mut x),
            splitmix64(&mut x),
        ];
        Generator { s }
    }

    /// The current state.
    pub fn state(&self) -> RngState {
        RngState(self.s)
    }

    /// A generator resumed from a saved state.
    pub fn from_state(state: RngState) -> Self {
        // An all-zero state would only ever produce zeros.
        if state.0 == [0; 4] {
            return Self::seeded(0);
        }
        Generator { s: state.0 }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A uniform f32 in `[0, 1)` (24 random bits).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// A uniform f64 in `[0, 1)` (53 random bits).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A standard normal sample.
    pub fn normal(&mut self) -> f32 {
        let x: f64 = StandardNormal.sample(self);
        x as f32
    }

    /// A uniform integer in `0..n`, without modulo bias (0 for `n == 0`, an empty range).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let v = self.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }
}

impl rand::TryRng for Generator {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok((self.next_u64() >> 32) as u32)
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(self.next_u64())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        for chunk in dst.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        Ok(())
    }
}

thread_local! {
    static GLOBAL: RefCell<Generator> = RefCell::new(Generator::seeded(0x5EED));
}

/// Reseeds this thread's global generator.
pub fn manual_seed(seed: u64) {
    GLOBAL.with(|g| *g.borrow_mut() = Generator::seeded(seed));
}

/// The state of this thread's global generator.
pub fn get_state() -> RngState {
    GLOBAL.with(|g| g.borrow().state())
}

/// Restores this thread's global generator.
pub fn set_state(state: RngState) {
    GLOBAL.with(|g| *g.borrow_mut() = Generator::from_state(state));
}

/// Runs `f` with this thread's global generator.
pub fn with_rng<R>(f: impl FnOnce(&mut Generator) -> R) -> R {
    GLOBAL.with(|g| f(&mut g.borrow_mut()))
}

/// Standard normal samples of the given shape from the global generator.
pub fn randn(shape: &[usize]) -> ArrayD<f32> {
    with_rng(|g| ArrayD::from_shape_simple_fn(IxDyn(shape), || g.normal()))
}

/// Uniform samples in `[low, high)` from the global generator.
pub fn uniform(shape: &[usize], low: f32, high: f32) -> ArrayD<f32> {
    with_rng(|g| ArrayD::from_shape_simple_fn(IxDyn(shape), || low + (high - low) * g.next_f32()))
}
