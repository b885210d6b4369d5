//! Making every rank hold the same model and optimizer state, and checking that they do.
//!
//! At the start of a run rank 0's state is copied to every rank ([`broadcast_module`],
//! [`broadcast_tensors`]), so the ranks start equal whatever each of them initialized or
//! loaded. Training keeps them equal by construction (the same averaged gradients, the same
//! optimizer, projections redrawn from a shared seed); [`check_synchronized`] verifies it by
//! comparing a fingerprint of every parameter and buffer across ranks.

use std::collections::BTreeMap;

use performer_tensor::io::{TensorData, from_safetensors_bytes, to_safetensors_bytes};
use performer_tensor::{Module, StateValue};

use crate::communicator::Communicator;
use crate::error::{Error, Result};

/// Copies named tensors from rank `root` to every rank: the others' maps are replaced by the
/// root's (sent as one safetensors buffer, so names, shapes and dtypes travel with the data).
pub fn broadcast_tensors(
    comm: &dyn Communicator,
    tensors: &mut BTreeMap<String, TensorData>,
    root: usize,
) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let mut bytes = if comm.rank() == root {
        to_safetensors_bytes(tensors, None)?
    } else {
        Vec::new()
    };
    comm.broadcast_bytes(&mut bytes, root)?;
    if comm.rank() != root {
        *tensors = from_safetensors_bytes(&bytes)?;
    }
    Ok(())
}

/// Copies every parameter and buffer of `module` on rank `root` into the same module on every
/// other rank. All ranks first compare the module's structure (names, shapes and dtypes): where
/// it differs, every rank returns [`Error::Desynchronized`] and nothing is changed.
pub fn broadcast_module(comm: &dyn Communicator, module: &dyn Module, root: usize) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let state = module.state_dict();
    let layout: Vec<String> = state
        .iter()
        .map(|(name, v)| format!("{name}:{}:{:?}", dtype(v), v.shape()))
        .collect();
    let layout_hash = layout
        .iter()
        .fold(FNV_OFFSET, |h, s| fnv_bytes(h, s.as_bytes()));
    let all = comm.all_gather_u64(&[layout_hash])?;
    if let Some(other) = all.iter().position(|&h| h != all[root]) {
        return Err(Error::Desynchronized(format!(
            "the model on rank {other} has other parameters or buffers (names, shapes or dtypes) \
             than on rank {root}; every rank must build the same model"
        )));
    }
    let mut tensors: BTreeMap<String, TensorData> = if comm.rank() == root {
        state
            .into_iter()
            .map(|(k, v)| (k, TensorData::from(v)))
            .collect()
    } else {
        BTreeMap::new()
    };
    broadcast_tensors(comm, &mut tensors, root)?;
    if comm.rank() != root {
        let mut values = BTreeMap::new();
        for (name, t) in tensors {
            let v = match t {
                TensorData::F32(a) => StateValue::F32(a.into_shared()),
                TensorData::I64(a) => StateValue::I64(a),
                TensorData::Bool(_) => {
                    return Err(Error::Desynchronized(format!(
                        "`{name}` arrived as a bool tensor; model states hold f32 and i64 only"
                    )));
                }
            };
            values.insert(name, v);
        }
        module.load_state_dict(&values)?;
    }
    Ok(())
}

fn dtype(v: &StateValue) -> &'static str {
    match v {
        StateValue::F32(_) => "f32",
        StateValue::I64(_) => "i64",
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv_bytes(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, &b| (h ^ b as u64).wrapping_mul(FNV_PRIME))
}

/// FNV-1a over 64-bit words (a word per element rather than per byte: 8x fewer multiplies
/// for the same sensitivity to any changed bit).
fn fnv_words(h: u64, words: impl Iterator<Item = u64>) -> u64 {
    words.fold(h, |h, w| (h ^ w).wrapping_mul(FNV_PRIME))
}

/// A fingerprint of every parameter and buffer of `module`: `(name, hash of shape and exact
/// bits)`, in name order. Equal on two ranks exactly when the values are bit for bit equal
/// (up to hash collisions).
pub fn fingerprints(module: &dyn Module) -> Vec<(String, u64)> {
    module
        .state_dict()
        .into_iter()
        .map(|(name, v)| {
            let h = fnv_words(FNV_OFFSET, v.shape().iter().map(|&d| d as u64));
            let h = match &v {
                StateValue::F32(a) => fnv_words(h, a.iter().map(|x| x.to_bits() as u64)),
                StateValue::I64(a) => fnv_words(h ^ 1, a.iter().map(|&x| x as u64)),
            };
            (name, h)
        })
        .collect()
}

/// Checks that every rank holds bit for bit the same parameters and buffers (the FAVOR+
/// projections and redraw counters included) by comparing [`fingerprints`] across ranks.
/// On a mismatch every rank returns [`Error::Desynchronized`] naming the first tensors that
/// differ and the ranks that hold other values than rank 0.
pub fn check_synchronized(comm: &dyn Communicator, module: &dyn Module) -> Result<()> {
    let local = fingerprints(module);
    let world = comm.world_size();
    let counts = comm.all_gather_u64(&[local.len() as u64])?;
    if counts.iter().any(|&c| c != counts[0]) {
        return Err(Error::Desynchronized(format!(
            "the ranks' models have different numbers of parameters and buffers: {counts:?}"
        )));
    }
    let hashes: Vec<u64> = local.iter().map(|(_, h)| *h).collect();
    let all = comm.all_gather_u64(&hashes)?;
    let n = local.len();
    let mut differing = Vec::new();
    for (i, (name, _)) in local.iter().enumerate() {
        let ranks: Vec<usize> = (1..world).filter(|&r| all[r * n + i] != all[i]).collect();
        if !ranks.is_empty() {
            differing.push(format!("`{name}` (ranks {ranks:?} differ from rank 0)"));
        }
    }
    if differing.is_empty() {
        return Ok(());
    }
    let shown = differing.len().min(5);
    Err(Error::Desynchronized(format!(
        "{} of {n} parameters and buffers differ across ranks: {}{}",
        differing.len(),
        differing[..shown].join(", "),
        if differing.len() > shown { ", ..." } else { "" }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use performer_tensor::ndarray::{ArrayD, IxDyn};
    use performer_tensor::{Buffer, Param, Visitor};

    struct Tiny {
        w: Param,
        proj: Buffer,
        calls: Buffer,
    }

    impl Module for Tiny {
        fn visit(&self, v: &mut Visitor<'_>) {
            v.param("w", &self.w);
            v.buffer("proj", &self.proj);
            v.buffer("calls", &self.calls);
        }
    }

    fn tiny(w: f32) -> Tiny {
        Tiny {
            w: Param::new(ArrayD::from_elem(IxDyn(&[2, 3]), w)),
            proj: Buffer::new(ArrayD::from_elem(IxDyn(&[4]), 0.5)),
            calls: Buffer::new_i64(ArrayD::from_elem(IxDyn(&[]), 3)),
        }
    }

    #[test]
    fn fingerprints_see_every_bit_and_the_shape() {
        let a = fingerprints(&tiny(1.0));
        assert_eq!(a, fingerprints(&tiny(1.0)));
        let names: Vec<&str> = a.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["calls", "proj", "w"]);
        // One ulp in one element of w.
        let m = tiny(1.0);
        m.w.update(|x| x[[1, 2]] = f32::from_bits(1.0f32.to_bits() + 1));
        let b = fingerprints(&m);
        assert_eq!(a[0], b[0]);
        assert_eq!(a[1], b[1]);
        assert_ne!(a[2], b[2]);
        // The same values in another shape.
        let reshaped = Tiny {
            w: Param::new(ArrayD::from_elem(IxDyn(&[3, 2]), 1.0)),
            ..tiny(1.0)
        };
        assert_ne!(fingerprints(&reshaped)[2], a[2]);
        // The counter.
        let counted = tiny(1.0);
        counted
            .calls
            .set(StateValue::I64(ArrayD::from_elem(IxDyn(&[]), 4)))
            .unwrap();
        assert_ne!(fingerprints(&counted)[0], a[0]);
    }
}
