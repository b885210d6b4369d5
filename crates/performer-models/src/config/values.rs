//! The keyword values that are not plain numbers or flags: `local_attn_heads` (a count or a
//! tuple) and `kernel_fn` (a name).

use performer_tensor::ops::Activation;
use performer_tensor::{Error, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `local_attn_heads`: one count for every layer, or one per layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LocalAttnHeads {
    /// The same number of local heads in every layer.
    All(usize),
    /// A number per layer (a tuple in Python).
    PerLayer(Vec<usize>),
}

impl Default for LocalAttnHeads {
    fn default() -> Self {
        LocalAttnHeads::All(0)
    }
}

impl LocalAttnHeads {
    /// The count for each of `depth` layers, checked against `heads`.
    pub fn per_layer(&self, depth: usize, heads: usize) -> Result<Vec<usize>> {
        let given: &[usize] = match self {
            LocalAttnHeads::All(n) => std::slice::from_ref(n),
            LocalAttnHeads::PerLayer(v) => v,
        };
        let shown = || match self {
            LocalAttnHeads::All(n) => format!("{n}"),
            LocalAttnHeads::PerLayer(v) => format!("{v:?}"),
        };
        if given.len() != 1 && given.len() != depth {
            return Err(Error::invalid(
                "Performer",
                "local_attn_heads",
                shown(),
                format!("a tuple of local heads per layer must have depth = {depth} entries"),
            ));
        }
        if let Some(&bad) = given.iter().find(|&&n| n > heads) {
            return Err(Error::invalid(
                "Performer",
                "local_attn_heads",
                shown(),
                format!("{bad} local heads exceed heads = {heads}"),
            ));
        }
        if given.len() == depth {
            return Ok(given.to_vec());
        }
        let mut v = Vec::new();
        v.try_reserve_exact(depth).map_err(|_| {
            Error::invalid("Performer", "depth", depth, "too many layers to allocate")
        })?;
        v.resize(depth, given[0]);
        Ok(v)
    }
}

/// `kernel_fn` as a name in JSON (`"relu"`, `"gelu"`, ...).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KernelFn(pub Activation);

impl Default for KernelFn {
    fn default() -> Self {
        KernelFn(Activation::Relu)
    }
}

impl Serialize for KernelFn {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.0.name())
    }
}

impl<'de> Deserialize<'de> for KernelFn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Activation::from_name(&name)
            .map(KernelFn)
            .map_err(serde::de::Error::custom)
    }
}
