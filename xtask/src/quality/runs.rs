//! The study's runs and what each measured, as `report.json` holds them.

use serde::{Deserialize, Serialize};

/// A validation point of a run.
#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
pub struct ValPoint {
    /// Optimizer step.
    pub step: u64,
    /// Bits per byte on the fixed validation windows.
    pub bpb: f64,
}

/// One run of the study, as `report.json` holds it.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    /// The `--attention` variant.
    pub variant: String,
    /// Whether the row belongs to the long-context table.
    pub long_context: bool,
    /// Sequence length (the model's max_seq_len).
    pub seq_len: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// Seed.
    pub seed: u64,
    /// The run's measurements, or why there are none.
    pub result: Result<Measured, String>,
}

/// A finished run.
#[derive(Clone, Debug, Serialize)]
pub struct Measured {
    /// Parameters of the model.
    pub parameters: usize,
    /// Validation curve (fixed windows).
    pub val: Vec<ValPoint>,
    /// Bits per byte over the study's common validation bytes.
    pub val_all: Option<f64>,
    /// How many bytes that score predicts.
    pub val_all_bytes: usize,
    /// Training tokens per second.
    pub tokens_per_second: f64,
    /// Peak RSS of the process, MiB.
    pub peak_rss_mib: f64,
    /// The last sample.
    pub sample: String,
}
