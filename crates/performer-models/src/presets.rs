//! Named attention variants of a [`PerformerLMConfig`]: the rows of `cargo xtask quality` and
//! the values of `train_lm --attention`.
//!
//! performer-pytorch's default (FAVOR+ softmax features on every head) learns byte-level text at
//! little better than bigram level in a few minutes of training; its own knobs (`shift_tokens`,
//! local heads) close the gap. A preset sets only the knobs it names (local heads, their
//! window, token shift, the kernel) and leaves every other field as it is, so it composes with
//! the sizes a caller chose.

use std::fmt;
use std::str::FromStr;

use performer_tensor::ops::Activation;
use performer_tensor::{Error, Result};

use crate::config::{KernelFn, LocalAttnHeads, PerformerLMConfig};

/// An attention variant, by the name `train_lm --attention` and `cargo xtask quality` use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttentionPreset {
    /// `favor`: performer-pytorch's default, FAVOR+ softmax features on every head.
    Favor,
    /// `favor-shift`: [`AttentionPreset::Favor`] with `shift_tokens` (half of each position's
    /// features come from the previous position, before attention and feed-forward).
    FavorShift,
    /// `relu`: generalized attention with the ReLU kernel on every head.
    Relu,
    /// `relu-shift`: [`AttentionPreset::Relu`] with `shift_tokens`.
    ReluShift,
    /// `local`: every head local (windowed exact softmax; with a window of the whole sequence,
    /// exact causal attention, quadratic in the length).
    Local,
    /// `hybrid`: half the heads local, half FAVOR+.
    Hybrid,
    /// `hybrid-shift`: [`AttentionPreset::Hybrid`] with `shift_tokens`.
    HybridShift,
    /// `global`: the best variant without local heads, so its cost stays linear in the
    /// sequence at any length: [`AttentionPreset::ReluShift`], which learned a little faster
    /// than [`AttentionPreset::FavorShift`] on two seeds in `cargo xtask quality` (the README's
    /// study).
    Global,
}

impl AttentionPreset {
    /// Every preset, in the study's order.
    pub const ALL: [AttentionPreset; 8] = [
        AttentionPreset::Favor,
        AttentionPreset::FavorShift,
        AttentionPreset::Relu,
        AttentionPreset::ReluShift,
        AttentionPreset::Local,
        AttentionPreset::Hybrid,
        AttentionPreset::HybridShift,
        AttentionPreset::Global,
    ];

    /// The preset's name (`favor`, `favor-shift`, ...).
    pub fn name(self) -> &'static str {
        match self {
            AttentionPreset::Favor => "favor",
            AttentionPreset::FavorShift => "favor-shift",
            AttentionPreset::Relu => "relu",
            AttentionPreset::ReluShift => "relu-shift",
            AttentionPreset::Local => "local",
            AttentionPreset::Hybrid => "hybrid",
            AttentionPreset::HybridShift => "hybrid-shift",
            AttentionPreset::Global => "global",
        }
    }

    /// One line saying what the preset sets.
    pub fn describe(self) -> &'static str {
        match self {
            AttentionPreset::Favor => {
                "FAVOR+ softmax features on every head (performer-pytorch's default)"
            }
            AttentionPreset::FavorShift => "FAVOR+ on every head, with shift_tokens",
            AttentionPreset::Relu => "generalized attention, ReLU kernel, every head",
            AttentionPreset::ReluShift => "generalized attention, ReLU kernel, with shift_tokens",
            AttentionPreset::Local => "every head local (windowed exact softmax)",
            AttentionPreset::Hybrid => "half the heads local, half FAVOR+",
            AttentionPreset::HybridShift => "half local, half FAVOR+, with shift_tokens",
            AttentionPreset::Global => {
                "no local heads (linear in the sequence): ReLU-kernel features with shift_tokens"
            }
        }
    }

    /// Whether the preset uses local heads (whose cost grows with the window).
    pub fn has_local_heads(self) -> bool {
        matches!(
            self,
            AttentionPreset::Local | AttentionPreset::Hybrid | AttentionPreset::HybridShift
        )
    }

    /// Sets the attention knobs of `config` (local heads, token shift, the kernel) to this
    /// preset's; every other field is left as it is. `local_window_size` is kept too: the
    /// caller picks the window.
    pub fn apply(self, config: &mut PerformerLMConfig) -> Result<()> {
        if config.heads == 0 {
            return Err(Error::invalid(
                "AttentionPreset::apply",
                "heads",
                0,
                "a preset needs at least one head",
            ));
        }
        let (local_heads, shift, generalized) = match self {
            AttentionPreset::Favor => (0, false, false),
            AttentionPreset::FavorShift => (0, true, false),
            AttentionPreset::Relu => (0, false, true),
            AttentionPreset::ReluShift | AttentionPreset::Global => (0, true, true),
            AttentionPreset::Local => (config.heads, false, false),
            AttentionPreset::Hybrid => (config.heads / 2, false, false),
            AttentionPreset::HybridShift => (config.heads / 2, true, false),
        };
        config.local_attn_heads = LocalAttnHeads::All(local_heads);
        config.shift_tokens = shift;
        config.generalized_attention = generalized;
        config.kernel_fn = KernelFn(Activation::Relu);
        Ok(())
    }
}

impl fmt::Display for AttentionPreset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for AttentionPreset {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        AttentionPreset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = AttentionPreset::ALL.iter().map(|p| p.name()).collect();
                Error::invalid(
                    "AttentionPreset",
                    "name",
                    s,
                    format!("one of {}", names.join(", ")),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for p in AttentionPreset::ALL {
            assert_eq!(p.name().parse::<AttentionPreset>().unwrap(), p);
        }
        let err = "softmax"
            .parse::<AttentionPreset>()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("softmax") && err.contains("favor-shift"),
            "{err}"
        );
    }

    #[test]
    fn presets_set_only_the_attention_knobs() {
        let base = PerformerLMConfig {
            heads: 4,
            dim: 64,
            depth: 2,
            local_window_size: 100,
            ff_glu: true,
            ..Default::default()
        };
        let mut c = base.clone();
        AttentionPreset::HybridShift.apply(&mut c).unwrap();
        assert_eq!(c.local_attn_heads, LocalAttnHeads::All(2));
        assert!(c.shift_tokens && !c.generalized_attention);
        assert_eq!((c.local_window_size, c.ff_glu), (100, true));
        AttentionPreset::Relu.apply(&mut c).unwrap();
        assert_eq!(c.local_attn_heads, LocalAttnHeads::All(0));
        assert!(!c.shift_tokens && c.generalized_attention);
        AttentionPreset::Favor.apply(&mut c).unwrap();
        assert_eq!(c, base, "favor is performer-pytorch's default attention");
        AttentionPreset::Local.apply(&mut c).unwrap();
        assert_eq!(c.local_attn_heads, LocalAttnHeads::All(4));
        AttentionPreset::ReluShift.apply(&mut c).unwrap();
        assert_eq!(c.local_attn_heads, LocalAttnHeads::All(0));
        assert!(c.shift_tokens && c.generalized_attention);
        for p in AttentionPreset::ALL {
            let mut c = base.clone();
            p.apply(&mut c).unwrap();
            let local = c.local_attn_heads != LocalAttnHeads::All(0);
            assert_eq!(local, p.has_local_heads(), "{p}");
        }
    }
}
