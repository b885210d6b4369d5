//! Seeds and data shards that every rank derives alike, without talking to the others.
//!
//! Data-parallel training needs three kinds of randomness: what must be the same on every rank
//! (the weights' initialization, the FAVOR+ projection redraws, the batch sampler), what must
//! differ (dropout), and a split of each batch into disjoint shares. All three come from the
//! shared seed here, so a run is reproducible and a resumed run draws what an uninterrupted
//! one would have drawn.

use std::ops::Range;

use crate::error::{Error, Result};

/// What a derived seed is for; mixed into it so the streams never coincide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// The projection redraws of one optimizer step: the same on every rank.
    Redraw {
        /// The optimizer step (1-based, the one being computed).
        step: u64,
    },
    /// Dropout (the global generator) of one rank during one optimizer step.
    Dropout {
        /// The optimizer step.
        step: u64,
        /// The rank.
        rank: usize,
    },
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A seed for `stream` derived from the run's shared `seed`: a function of its arguments only,
/// so every rank computes the same value for a shared stream, and different ranks, steps or
/// kinds get unrelated values.
pub fn derive_seed(seed: u64, stream: Stream) -> u64 {
    let (kind, a, b) = match stream {
        Stream::Redraw { step } => (1u64, step, 0u64),
        Stream::Dropout { step, rank } => (2, step, rank as u64),
    };
    [kind, a, b].iter().fold(splitmix64(seed), |h, &part| {
        splitmix64(h ^ splitmix64(part))
    })
}

/// The share of `global` items (a global batch drawn alike on every rank) that `rank` of
/// `world` takes: contiguous, disjoint, equal in size, together the whole. An error unless
/// `world` divides `global`, since unequal shares would weigh the ranks' gradients unequally.
pub fn shard(global: usize, rank: usize, world: usize) -> Result<Range<usize>> {
    if world == 0 || rank >= world {
        return Err(Error::invalid(
            "shard",
            format!("rank {rank} is not a rank of a world of {world}"),
        ));
    }
    if !global.is_multiple_of(world) {
        return Err(Error::invalid(
            "shard",
            format!(
                "a global batch of {global} does not split into {world} equal shares; use a \
                 multiple of {world}"
            ),
        ));
    }
    let per = global / world;
    Ok(rank * per..(rank + 1) * per)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_seeds_depend_on_every_part() {
        let base = derive_seed(42, Stream::Redraw { step: 7 });
        assert_eq!(base, derive_seed(42, Stream::Redraw { step: 7 }));
        let others = [
            derive_seed(43, Stream::Redraw { step: 7 }),
            derive_seed(42, Stream::Redraw { step: 8 }),
            derive_seed(42, Stream::Dropout { step: 7, rank: 0 }),
            derive_seed(42, Stream::Dropout { step: 7, rank: 1 }),
            derive_seed(42, Stream::Dropout { step: 8, rank: 0 }),
        ];
        for (i, s) in others.iter().enumerate() {
            assert_ne!(*s, base, "stream {i}");
            for t in &others[i + 1..] {
                assert_ne!(s, t);
            }
        }
    }

    #[test]
    fn shards_are_disjoint_and_cover_the_batch() {
        let shares: Vec<_> = (0..4).map(|r| shard(12, r, 4).unwrap()).collect();
        assert_eq!(shares, vec![0..3, 3..6, 6..9, 9..12]);
        assert!(
            shard(10, 0, 4)
                .unwrap_err()
                .to_string()
                .contains("multiple of 4")
        );
        assert!(shard(8, 4, 4).is_err());
        assert!(shard(8, 0, 0).is_err());
    }
}
