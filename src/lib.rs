//! performer: the Performer transformer (FAVOR+ linear attention, arXiv 2009.14794) in Rust.
//!
//! This facade re-exports the workspace crates so that users can depend on one package.
pub use performer_tensor as tensor;
