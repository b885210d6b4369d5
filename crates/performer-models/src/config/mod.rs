//! Configurations with every keyword argument of performer-pytorch 1.1.4, its defaults, and its
//! names in JSON. Build them with struct-update syntax:
//!
//! ```
//! use performer_models::PerformerLMConfig;
//! let c = PerformerLMConfig { num_tokens: 256, max_seq_len: 1024, dim: 256, depth: 4, heads: 4, causal: true, ..Default::default() };
//! assert_eq!(c.dim_head, 64);
//! ```
//!
//! - in [`fields`]: the table of [`PerformerConfig`]'s and [`PerformerLMConfig`]'s fields and
//!   defaults, one row each, and [`table`], the macro that turns it into the structs;
//! - in [`values`]: [`LocalAttnHeads`], [`KernelFn`];
//! - in [`kwargs`]: parsing keyword arguments with errors that name the keyword;
//! - [`limits`], [`performer`], [`lm`]: the checks of each configuration;
//! - in [`enc_dec`]: [`PerformerEncDecConfig`].

mod enc_dec;
mod fields;
mod kwargs;
mod limits;
mod lm;
mod performer;
mod table;
#[cfg(test)]
mod tests;
mod values;

pub use enc_dec::PerformerEncDecConfig;
pub use fields::{PerformerConfig, PerformerLMConfig};
pub(crate) use kwargs::parse_kwargs;
pub use values::{KernelFn, LocalAttnHeads};
