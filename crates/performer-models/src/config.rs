//! Configurations with every keyword argument of performer-pytorch 1.1.4, its defaults, and its
//! names in JSON. Build them with struct-update syntax:
//!
//! ```
//! use performer_models::PerformerLMConfig;
//! let c = PerformerLMConfig { num_tokens: 256, max_seq_len: 1024, dim: 256, depth: 4, heads: 4, causal: true, ..Default::default() };
//! assert_eq!(c.dim_head, 64);
//! ```

use performer_tensor::ops::Activation;
use performer_tensor::{Error, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

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

/// Deserializes a configuration from keyword arguments. serde's message for a mistyped field
/// of a struct does not say which field it was, so on error each keyword is tried alone (on
/// top of the defaults) to find and name it: `op: invalid `{prefix}num_tokens` = "ten":
/// invalid type: string "ten", expected usize`. Unknown and missing keywords are named by
/// serde's own message.
pub(crate) fn parse_kwargs<T: DeserializeOwned + Serialize + Default>(
    op: &str,
    prefix: &str,
    kwargs: &Value,
) -> Result<T> {
    let err = match serde_json::from_value::<T>(kwargs.clone()) {
        Ok(c) => return Ok(c),
        Err(e) => e,
    };
    let culprit = kwargs.as_object().and_then(|map| {
        let base = match serde_json::to_value(T::default()) {
            Ok(Value::Object(b)) => b,
            _ => return None,
        };
        map.iter().find_map(|(k, v)| {
            if !base.contains_key(k) {
                return None;
            }
            let mut probe = base.clone();
            probe.insert(k.clone(), v.clone());
            serde_json::from_value::<T>(Value::Object(probe))
                .err()
                .map(|e| (k, v, e))
        })
    });
    Err(match culprit {
        Some((k, v, e)) => Error::invalid(op, format!("{prefix}{k}"), v, e.to_string()),
        None if kwargs.is_object() => Error::invalid(
            op,
            if prefix.is_empty() {
                "kwargs".to_string()
            } else {
                format!("{prefix}*")
            },
            "{...}",
            err.to_string(),
        ),
        None => Error::invalid(
            op,
            "kwargs",
            kwargs,
            "must be an object of keyword arguments",
        ),
    })
}

/// One keyword of a known type, or `default` when absent; a mistyped value is an error naming
/// the keyword.
fn take_kwarg<T: DeserializeOwned>(
    map: &mut serde_json::Map<String, Value>,
    name: &str,
    default: Option<T>,
) -> Result<T> {
    match map.remove(name) {
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| Error::invalid("PerformerEncDec", name, v, e.to_string())),
        None => default.ok_or_else(|| {
            Error::invalid(
                "PerformerEncDec",
                name,
                "missing",
                format!("{name} is required"),
            )
        }),
    }
}

/// performer-pytorch's `Performer(...)` keyword arguments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerformerConfig {
    /// Model width.
    pub dim: usize,
    /// Number of layers.
    pub depth: usize,
    /// Heads per attention layer.
    pub heads: usize,
    /// Size of each head (`None`: `dim / heads`).
    #[serde(default)]
    pub dim_head: Option<usize>,
    /// Local (windowed) heads, per layer or for all layers.
    #[serde(default)]
    pub local_attn_heads: LocalAttnHeads,
    /// Window of the local heads.
    #[serde(default = "d_window")]
    pub local_window_size: usize,
    /// Autoregressive attention.
    #[serde(default)]
    pub causal: bool,
    /// Feed-forward expansion.
    #[serde(default = "d_ff_mult")]
    pub ff_mult: usize,
    /// Random features per head (`None`: `int(d ln d)`).
    #[serde(default)]
    pub nb_features: Option<usize>,
    /// Redraw the projections every this many training calls (`None`: never).
    #[serde(default = "d_redraw")]
    pub feature_redraw_interval: Option<usize>,
    /// Reversible layers (memory constant in depth).
    #[serde(default)]
    pub reversible: bool,
    /// Feed-forward applied to this many sequence chunks.
    #[serde(default = "d_one")]
    pub ff_chunks: usize,
    /// Generalized attention.
    #[serde(default)]
    pub generalized_attention: bool,
    /// Kernel of generalized attention.
    #[serde(default)]
    pub kernel_fn: KernelFn,
    /// ScaleNorm instead of LayerNorm.
    #[serde(default)]
    pub use_scalenorm: bool,
    /// ReZero instead of LayerNorm.
    #[serde(default)]
    pub use_rezero: bool,
    /// GLU feed-forward.
    #[serde(default)]
    pub ff_glu: bool,
    /// Dropout in the feed-forward.
    #[serde(default)]
    pub ff_dropout: f32,
    /// Dropout after attention.
    #[serde(default)]
    pub attn_dropout: f32,
    /// A cross-attention layer after each self-attention layer.
    #[serde(default)]
    pub cross_attend: bool,
    /// No random features.
    #[serde(default)]
    pub no_projection: bool,
    /// Count calls and redraw projections in `forward`.
    #[serde(default = "d_true")]
    pub auto_check_redraw: bool,
    /// Biases on the q/k/v projections.
    #[serde(default = "d_true")]
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    #[serde(default = "d_true")]
    pub attn_out_bias: bool,
    /// Token shift before attention and feed-forward.
    #[serde(default)]
    pub shift_tokens: bool,
}

fn d_window() -> usize {
    256
}
fn d_ff_mult() -> usize {
    4
}
fn d_redraw() -> Option<usize> {
    Some(1000)
}
fn d_one() -> usize {
    1
}
fn d_true() -> bool {
    true
}
fn d_dim_head() -> usize {
    64
}

impl Default for PerformerConfig {
    fn default() -> Self {
        PerformerConfig {
            dim: 512,
            depth: 1,
            heads: 8,
            dim_head: None,
            local_attn_heads: LocalAttnHeads::All(0),
            local_window_size: 256,
            causal: false,
            ff_mult: 4,
            nb_features: None,
            feature_redraw_interval: Some(1000),
            reversible: false,
            ff_chunks: 1,
            generalized_attention: false,
            kernel_fn: KernelFn::default(),
            use_scalenorm: false,
            use_rezero: false,
            ff_glu: false,
            ff_dropout: 0.0,
            attn_dropout: 0.0,
            cross_attend: false,
            no_projection: false,
            auto_check_redraw: true,
            qkv_bias: true,
            attn_out_bias: true,
            shift_tokens: false,
        }
    }
}

fn check_prob(op: &str, name: &str, p: f32) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(op, name, p, "must lie in [0, 1)"));
    }
    Ok(())
}

/// The most scalars a model may hold: more than this many f32 values cannot be addressed
/// (`isize::MAX` bytes), so larger sizes are refused before anything is allocated.
pub const MAX_ELEMENTS: u128 = (isize::MAX as u128) / 4;

/// `a * b * ...` for the size check: `None` once it passes [`MAX_ELEMENTS`].
fn elements(factors: &[usize]) -> Option<u128> {
    factors.iter().try_fold(1u128, |acc, &f| {
        acc.checked_mul(f as u128).filter(|&p| p <= MAX_ELEMENTS)
    })
}

/// An error for a size `arg` = `value` whose tables would exceed [`MAX_ELEMENTS`].
fn too_large(op: &str, arg: &str, value: impl std::fmt::Display, what: String) -> Error {
    Error::invalid(
        op,
        arg,
        value,
        format!("{what} would exceed {MAX_ELEMENTS} elements (more than isize::MAX bytes)"),
    )
}

impl PerformerConfig {
    /// A lower bound of the scalars in the stack's parameters and buffers, with overflow
    /// checked: an error names the size that makes the model too large to allocate.
    pub fn min_elements(&self) -> Result<u128> {
        let op = "Performer";
        let dh = self.resolved_dim_head();
        let inner = elements(&[self.heads, dh]).ok_or_else(|| {
            too_large(
                op,
                "heads",
                self.heads,
                format!("heads x dim_head = {}", dh),
            )
        })? as usize;
        let attn = elements(&[4, self.dim, inner]).ok_or_else(|| {
            too_large(
                op,
                "dim",
                self.dim,
                format!("4 x dim x (heads x dim_head = {inner})"),
            )
        })?;
        let ff = elements(&[2, self.dim, self.ff_mult, self.dim]).ok_or_else(|| {
            too_large(
                op,
                "ff_mult",
                self.ff_mult,
                format!("2 x dim ({}) x ff_mult x dim", self.dim),
            )
        })?;
        let m = self
            .nb_features
            .unwrap_or_else(|| performer_favor::default_nb_features(dh));
        let proj = elements(&[m, dh]).ok_or_else(|| {
            too_large(
                op,
                "nb_features",
                m,
                format!("nb_features x dim_head ({dh})"),
            )
        })?;
        let per_layer = (attn + ff + proj) * if self.cross_attend { 2 } else { 1 };
        elements(&[self.depth])
            .and_then(|d| d.checked_mul(per_layer))
            .filter(|&t| t <= MAX_ELEMENTS)
            .ok_or_else(|| {
                too_large(
                    op,
                    "depth",
                    self.depth,
                    format!("depth x {per_layer} per layer"),
                )
            })
    }

    /// Checks every argument and their combinations; errors name the argument and the limit.
    pub fn validate(&self) -> Result<()> {
        let op = "Performer";
        for (name, v) in [
            ("dim", self.dim),
            ("depth", self.depth),
            ("heads", self.heads),
            ("ff_mult", self.ff_mult),
            ("ff_chunks", self.ff_chunks),
            ("local_window_size", self.local_window_size),
        ] {
            if v == 0 {
                return Err(Error::invalid(op, name, 0, "must be positive"));
            }
        }
        if !self.dim.is_multiple_of(self.heads) {
            return Err(Error::invalid(
                op,
                "dim",
                self.dim,
                format!("must be divisible by heads = {}", self.heads),
            ));
        }
        if self.dim_head == Some(0) {
            return Err(Error::invalid(op, "dim_head", 0, "must be positive"));
        }
        if self.nb_features == Some(0) {
            return Err(Error::invalid(op, "nb_features", 0, "must be positive"));
        }
        // Sizes first: a depth too large to allocate must not reach `per_layer`'s vector.
        self.min_elements()?;
        self.local_attn_heads.per_layer(self.depth, self.heads)?;
        check_prob(op, "ff_dropout", self.ff_dropout)?;
        check_prob(op, "attn_dropout", self.attn_dropout)?;
        if self.use_scalenorm && self.use_rezero {
            return Err(Error::invalid(
                op,
                "use_rezero",
                true,
                "use_scalenorm and use_rezero exclude each other",
            ));
        }
        Ok(())
    }

    /// Head size in effect.
    pub fn resolved_dim_head(&self) -> usize {
        self.dim_head.unwrap_or(self.dim / self.heads.max(1))
    }
}

/// performer-pytorch's `PerformerLM(...)` keyword arguments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerformerLMConfig {
    /// Vocabulary size.
    pub num_tokens: usize,
    /// Longest sequence.
    pub max_seq_len: usize,
    /// Model width.
    pub dim: usize,
    /// Number of layers.
    pub depth: usize,
    /// Heads per layer.
    pub heads: usize,
    /// Size of each head.
    #[serde(default = "d_dim_head")]
    pub dim_head: usize,
    /// Local heads, per layer or for all.
    #[serde(default)]
    pub local_attn_heads: LocalAttnHeads,
    /// Window of the local heads.
    #[serde(default = "d_window")]
    pub local_window_size: usize,
    /// Autoregressive.
    #[serde(default)]
    pub causal: bool,
    /// Feed-forward expansion.
    #[serde(default = "d_ff_mult")]
    pub ff_mult: usize,
    /// Random features per head.
    #[serde(default)]
    pub nb_features: Option<usize>,
    /// Redraw interval (`None`: never).
    #[serde(default = "d_redraw")]
    pub feature_redraw_interval: Option<usize>,
    /// Reversible layers.
    #[serde(default)]
    pub reversible: bool,
    /// Feed-forward chunks.
    #[serde(default = "d_one")]
    pub ff_chunks: usize,
    /// GLU feed-forward.
    #[serde(default)]
    pub ff_glu: bool,
    /// Dropout after the embeddings.
    #[serde(default)]
    pub emb_dropout: f32,
    /// Feed-forward dropout.
    #[serde(default)]
    pub ff_dropout: f32,
    /// Attention dropout.
    #[serde(default)]
    pub attn_dropout: f32,
    /// Generalized attention.
    #[serde(default)]
    pub generalized_attention: bool,
    /// Its kernel.
    #[serde(default)]
    pub kernel_fn: KernelFn,
    /// ScaleNorm.
    #[serde(default)]
    pub use_scalenorm: bool,
    /// ReZero.
    #[serde(default)]
    pub use_rezero: bool,
    /// Cross-attention layers (decoders).
    #[serde(default)]
    pub cross_attend: bool,
    /// No random features.
    #[serde(default)]
    pub no_projection: bool,
    /// Logits through the token embedding's transpose.
    #[serde(default)]
    pub tie_embed: bool,
    /// Rotary embeddings on the FAVOR+ heads (and a fixed sinusoidal table added to tokens).
    #[serde(default = "d_true")]
    pub rotary_position_emb: bool,
    /// Axial position embeddings (when not rotary).
    #[serde(default)]
    pub axial_position_emb: bool,
    /// Their shape (`None`: `(ceil(max_seq_len / 64), 64)`).
    #[serde(default)]
    pub axial_position_shape: Option<Vec<usize>>,
    /// Redraw bookkeeping in forward.
    #[serde(default = "d_true")]
    pub auto_check_redraw: bool,
    /// q/k/v biases.
    #[serde(default)]
    pub qkv_bias: bool,
    /// Attention output bias.
    #[serde(default)]
    pub attn_out_bias: bool,
    /// Token shift.
    #[serde(default)]
    pub shift_tokens: bool,
}

impl Default for PerformerLMConfig {
    fn default() -> Self {
        PerformerLMConfig {
            num_tokens: 256,
            max_seq_len: 1024,
            dim: 512,
            depth: 6,
            heads: 8,
            dim_head: 64,
            local_attn_heads: LocalAttnHeads::All(0),
            local_window_size: 256,
            causal: false,
            ff_mult: 4,
            nb_features: None,
            feature_redraw_interval: Some(1000),
            reversible: false,
            ff_chunks: 1,
            ff_glu: false,
            emb_dropout: 0.0,
            ff_dropout: 0.0,
            attn_dropout: 0.0,
            generalized_attention: false,
            kernel_fn: KernelFn::default(),
            use_scalenorm: false,
            use_rezero: false,
            cross_attend: false,
            no_projection: false,
            tie_embed: false,
            rotary_position_emb: true,
            axial_position_emb: false,
            axial_position_shape: None,
            auto_check_redraw: true,
            qkv_bias: false,
            attn_out_bias: false,
            shift_tokens: false,
        }
    }
}

impl PerformerLMConfig {
    /// The inner Performer's configuration.
    pub fn performer(&self) -> PerformerConfig {
        PerformerConfig {
            dim: self.dim,
            depth: self.depth,
            heads: self.heads,
            dim_head: Some(self.dim_head),
            local_attn_heads: self.local_attn_heads.clone(),
            local_window_size: self.local_window_size,
            causal: self.causal,
            ff_mult: self.ff_mult,
            nb_features: self.nb_features,
            feature_redraw_interval: self.feature_redraw_interval,
            reversible: self.reversible,
            ff_chunks: self.ff_chunks,
            generalized_attention: self.generalized_attention,
            kernel_fn: self.kernel_fn,
            use_scalenorm: self.use_scalenorm,
            use_rezero: self.use_rezero,
            ff_glu: self.ff_glu,
            ff_dropout: self.ff_dropout,
            attn_dropout: self.attn_dropout,
            cross_attend: self.cross_attend,
            no_projection: self.no_projection,
            auto_check_redraw: self.auto_check_redraw,
            qkv_bias: self.qkv_bias,
            attn_out_bias: self.attn_out_bias,
            shift_tokens: self.shift_tokens,
        }
    }

    /// The axial shape in effect.
    pub fn resolved_axial_shape(&self) -> Vec<usize> {
        self.axial_position_shape
            .clone()
            .unwrap_or_else(|| vec![self.max_seq_len.div_ceil(64), 64])
    }

    /// A lower bound of the scalars in the model's parameters and buffers (embeddings, position
    /// tables, layers), with overflow checked: an error names the size that makes the model
    /// too large to allocate.
    pub fn min_elements(&self) -> Result<u128> {
        let op = "PerformerLM";
        let tokens = elements(&[self.num_tokens, self.dim]).ok_or_else(|| {
            too_large(
                op,
                "num_tokens",
                self.num_tokens,
                format!("num_tokens x dim ({})", self.dim),
            )
        })?;
        let positions = if !self.rotary_position_emb && self.axial_position_emb {
            // One table per axis, (s_i, dim); the forward materializes their sum over
            // prod(shape) x dim, which `validate` checks separately.
            let shape = self.resolved_axial_shape();
            shape.iter().try_fold(0u128, |acc, &s| {
                elements(&[s, self.dim])
                    .map(|e| acc + e)
                    .filter(|&t| t <= MAX_ELEMENTS)
                    .ok_or_else(|| {
                        too_large(
                            op,
                            "axial_position_shape",
                            format!("{shape:?}"),
                            format!("the axial tables, sum of the shape x dim ({})", self.dim),
                        )
                    })
            })?
        } else {
            // Absolute: max_seq_len x dim; rotary: that and max_seq_len x dim_head.
            let rotary = if self.rotary_position_emb {
                self.dim_head
            } else {
                0
            };
            elements(&[self.max_seq_len, self.dim])
                .zip(elements(&[self.max_seq_len, rotary]))
                .map(|(a, b)| a + b)
                .filter(|&t| t <= MAX_ELEMENTS)
                .ok_or_else(|| {
                    too_large(
                        op,
                        "max_seq_len",
                        self.max_seq_len,
                        format!("the position tables, max_seq_len x (dim = {})", self.dim),
                    )
                })?
        };
        let layers = self.performer().min_elements()?;
        let total = tokens + positions + layers;
        if total > MAX_ELEMENTS {
            return Err(too_large(
                op,
                "dim",
                self.dim,
                format!("the model ({total} scalars)"),
            ));
        }
        Ok(total)
    }

    /// Checks every argument; errors name the argument and the limit.
    pub fn validate(&self) -> Result<()> {
        let op = "PerformerLM";
        for (name, v) in [
            ("num_tokens", self.num_tokens),
            ("max_seq_len", self.max_seq_len),
            ("dim_head", self.dim_head),
        ] {
            if v == 0 {
                return Err(Error::invalid(op, name, 0, "must be positive"));
            }
        }
        check_prob(op, "emb_dropout", self.emb_dropout)?;
        if self.rotary_position_emb && !self.dim.is_multiple_of(2) {
            return Err(Error::invalid(
                op,
                "dim",
                self.dim,
                "the sinusoidal table added to the embeddings needs an even dim",
            ));
        }
        if self.rotary_position_emb && !self.dim_head.is_multiple_of(2) {
            return Err(Error::invalid(
                op,
                "dim_head",
                self.dim_head,
                "rotary embeddings need an even dim_head",
            ));
        }
        if !self.rotary_position_emb && self.axial_position_emb {
            let shape = self.resolved_axial_shape();
            // Saturating: a product that overflows covers everything (and is refused as too
            // large by the size check).
            let covered = shape.iter().fold(1usize, |a, &s| a.saturating_mul(s));
            if shape.is_empty() || shape.contains(&0) || covered < self.max_seq_len {
                return Err(Error::invalid(
                    op,
                    "axial_position_shape",
                    format!("{shape:?}"),
                    format!(
                        "must cover max_seq_len = {} positions (covers {covered})",
                        self.max_seq_len
                    ),
                ));
            }
        }
        if !self.rotary_position_emb && self.axial_position_emb {
            // The forward materializes the summed table, prod(shape) x dim.
            let shape = self.resolved_axial_shape();
            let mut factors = shape.clone();
            factors.push(self.dim);
            if elements(&factors).is_none() {
                return Err(too_large(
                    op,
                    "axial_position_shape",
                    format!("{shape:?}"),
                    format!(
                        "the summed axial table, product of the shape x dim ({})",
                        self.dim
                    ),
                ));
            }
        }
        self.performer().validate()?;
        self.min_elements()?;
        Ok(())
    }
}

/// performer-pytorch's `PerformerEncDec(...)`: shared arguments plus `enc_`/`dec_`-prefixed
/// PerformerLM arguments. The decoder is always causal with cross-attention; `dim` and
/// `no_projection` are set on both.
#[derive(Clone, Debug, PartialEq)]
pub struct PerformerEncDecConfig {
    /// Width of both.
    pub dim: usize,
    /// Target value ignored by the loss.
    pub ignore_index: i64,
    /// Padding value of the wrapper (kept for compatibility).
    pub pad_value: i64,
    /// Encoder and decoder share their token embedding.
    pub tie_token_embeds: bool,
    /// No random features (both).
    pub no_projection: bool,
    /// The encoder (its `dim` and `no_projection` are overridden).
    pub enc: PerformerLMConfig,
    /// The decoder (also `causal` and `cross_attend` are forced on).
    pub dec: PerformerLMConfig,
}

impl Default for PerformerEncDecConfig {
    fn default() -> Self {
        PerformerEncDecConfig {
            dim: 512,
            ignore_index: 0,
            pad_value: 0,
            tie_token_embeds: false,
            no_projection: false,
            enc: PerformerLMConfig::default(),
            dec: PerformerLMConfig::default(),
        }
    }
}

impl PerformerEncDecConfig {
    /// The encoder's effective configuration.
    pub fn encoder(&self) -> PerformerLMConfig {
        PerformerLMConfig {
            dim: self.dim,
            no_projection: self.no_projection,
            ..self.enc.clone()
        }
    }

    /// The decoder's effective configuration.
    pub fn decoder(&self) -> PerformerLMConfig {
        PerformerLMConfig {
            dim: self.dim,
            no_projection: self.no_projection,
            causal: true,
            cross_attend: true,
            ..self.dec.clone()
        }
    }

    /// Checks both halves.
    pub fn validate(&self) -> Result<()> {
        self.encoder().validate()?;
        self.decoder().validate()?;
        if self.tie_token_embeds && self.enc.num_tokens != self.dec.num_tokens {
            return Err(Error::invalid(
                "PerformerEncDec",
                "tie_token_embeds",
                true,
                format!(
                    "needs enc_num_tokens ({}) = dec_num_tokens ({})",
                    self.enc.num_tokens, self.dec.num_tokens
                ),
            ));
        }
        Ok(())
    }

    /// Parses the flat keyword form (`{"dim": .., "enc_num_tokens": .., "dec_depth": ..}`).
    pub fn from_kwargs(kwargs: &serde_json::Map<String, serde_json::Value>) -> Result<Self> {
        let mut enc = serde_json::Map::new();
        let mut dec = serde_json::Map::new();
        let mut top = serde_json::Map::new();
        for (k, v) in kwargs {
            if let Some(rest) = k.strip_prefix("enc_") {
                enc.insert(rest.to_string(), v.clone());
            } else if let Some(rest) = k.strip_prefix("dec_") {
                dec.insert(rest.to_string(), v.clone());
            } else {
                top.insert(k.clone(), v.clone());
            }
        }
        let dim: usize = take_kwarg(&mut top, "dim", None)?;
        let ignore_index = take_kwarg(&mut top, "ignore_index", Some(0i64))?;
        let pad_value = take_kwarg(&mut top, "pad_value", Some(0i64))?;
        let tie_token_embeds = take_kwarg(&mut top, "tie_token_embeds", Some(false))?;
        let no_projection = take_kwarg(&mut top, "no_projection", Some(false))?;
        if let Some(k) = top.keys().next() {
            return Err(Error::invalid(
                "PerformerEncDec",
                k,
                "given",
                "unknown keyword argument (encoder and decoder arguments take enc_ / dec_ prefixes)",
            ));
        }
        for (side, m) in [("enc", &mut enc), ("dec", &mut dec)] {
            if m.contains_key("dim") {
                return Err(Error::invalid(
                    "PerformerEncDec",
                    format!("{side}_dim"),
                    "given",
                    "set dim once for both encoder and decoder",
                ));
            }
            m.insert("dim".into(), serde_json::json!(dim));
        }
        let lm = |m: serde_json::Map<String, serde_json::Value>,
                  side: &str|
         -> Result<PerformerLMConfig> {
            parse_kwargs("PerformerEncDec", &format!("{side}_"), &Value::Object(m))
        };
        Ok(PerformerEncDecConfig {
            dim,
            ignore_index,
            pad_value,
            tie_token_embeds,
            no_projection,
            enc: lm(enc, "enc")?,
            dec: lm(dec, "dec")?,
        })
    }

    /// The flat keyword form.
    pub fn to_kwargs(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut out = serde_json::Map::new();
        out.insert("dim".into(), serde_json::json!(self.dim));
        out.insert("ignore_index".into(), serde_json::json!(self.ignore_index));
        out.insert("pad_value".into(), serde_json::json!(self.pad_value));
        out.insert(
            "tie_token_embeds".into(),
            serde_json::json!(self.tie_token_embeds),
        );
        out.insert(
            "no_projection".into(),
            serde_json::json!(self.no_projection),
        );
        for (prefix, c) in [("enc_", &self.enc), ("dec_", &self.dec)] {
            if let Ok(serde_json::Value::Object(m)) = serde_json::to_value(c) {
                for (k, v) in m {
                    if k != "dim" && k != "no_projection" {
                        out.insert(format!("{prefix}{k}"), v);
                    }
                }
            }
        }
        out
    }
}
