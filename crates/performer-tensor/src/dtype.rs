//! Storage types of parameters: [`DType`], and the bfloat16 conversions they use.
//!
//! Computation is always f32; a parameter may be *stored* in bfloat16 for inference (half the
//! bytes to stream per generated token). bfloat16 is the upper half of an f32 (same exponent,
//! 8 bits of significand), so widening is exact and narrowing rounds to nearest, ties to even
//! (the `half` crate's conversion, which is also PyTorch's `.to(torch.bfloat16)`).

use half::bf16;

/// How a parameter's values are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE floats (training and inference).
    #[default]
    F32,
    /// bfloat16 (inference only: optimizers refuse such parameters).
    BF16,
}

impl DType {
    /// The name PyTorch and safetensors use (`float32`, `bfloat16`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
        }
    }

    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "float32" | "f32" => Ok(DType::F32),
            "bfloat16" | "bf16" => Ok(DType::BF16),
            other => Err(crate::Error::invalid(
                "DType",
                "dtype",
                other,
                "must be float32 (f32) or bfloat16 (bf16)",
            )),
        }
    }
}

/// `x` rounded to the nearest bfloat16 (ties to even; NaN stays NaN, infinities stay).
pub fn to_bf16(x: f32) -> bf16 {
    bf16::from_f32(x)
}

/// The f32 a bfloat16 stands for (exact).
pub fn from_bf16(x: bf16) -> f32 {
    f32::from_bits((x.to_bits() as u32) << 16)
}

/// `x` rounded through bfloat16 and back: the value a bf16 parameter holds for `x`.
pub fn round_bf16(x: f32) -> f32 {
    from_bf16(to_bf16(x))
}

/// Widens `src` into `dst` (same length).
///
/// # Panics
/// If the lengths differ.
pub fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "widen_bf16: lengths");
    dst.iter_mut()
        .zip(src)
        .for_each(|(d, &s)| *d = from_bf16(s));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrowing_rounds_to_nearest_even_and_widening_is_exact() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even gives 1.
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 1.0);
        // Just above halfway rounds up.
        assert_eq!(
            round_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)),
            1.0 + 2f32.powi(-7)
        );
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even gives 1 + 2^-6.
        assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(f32::NEG_INFINITY), f32::NEG_INFINITY);
        for x in [0.0f32, -2.5, 1.0, 3.0e38, -1.0e-38] {
            let b = to_bf16(x);
            assert_eq!(from_bf16(b), b.to_f32(), "{x}");
            assert!((from_bf16(b) - x).abs() <= x.abs() * 2f32.powi(-8), "{x}");
        }
    }

    #[test]
    fn names_parse_back() {
        for d in [DType::F32, DType::BF16] {
            assert_eq!(d.name().parse::<DType>().unwrap(), d);
        }
        let err = "float16".parse::<DType>().unwrap_err().to_string();
        assert!(err.contains("float16") && err.contains("bfloat16"), "{err}");
    }
}
