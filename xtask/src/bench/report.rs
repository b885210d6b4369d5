//! Results: one [`Record`] per (workload, implementation), the median, and the JSON files.

use std::fs;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// `"impl"` of our rows.
pub const OURS: &str = "performer-rs";
/// `"impl"` of the reference rows.
pub const REFERENCE: &str = "performer-pytorch";

/// One row of `report.json`: the BENCHMARKS.md contract
/// `{"workload", "impl", "median_ms", "tokens", "tokens_per_s", "peak_rss_mib", "gflops"}`.
///
/// A workload that did not run (not implemented yet, failed, skipped) keeps its row with null
/// measurements and an extra `"error"` saying why; a measured row has exactly the seven keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Workload name (`attn-causal-4k`; sweep points `attn-causal@16384`).
    pub workload: String,
    /// [`OURS`] or [`REFERENCE`].
    #[serde(rename = "impl")]
    pub implementation: String,
    /// Median of the timed repetitions, milliseconds.
    pub median_ms: Option<f64>,
    /// Tokens one repetition processes.
    pub tokens: usize,
    /// `tokens / median`.
    pub tokens_per_s: Option<f64>,
    /// Peak resident set of the workload's process, MiB.
    pub peak_rss_mib: Option<f64>,
    /// Counted FLOPs over the median time, GFLOP/s.
    pub gflops: Option<f64>,
    /// Why there is no measurement.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

impl Record {
    /// A measured row.
    pub fn measured(
        workload: &str,
        implementation: &str,
        median_ms: f64,
        tokens: usize,
        peak_rss_mib: f64,
        flops: f64,
    ) -> Self {
        let secs = median_ms / 1e3;
        Self {
            workload: workload.to_string(),
            implementation: implementation.to_string(),
            median_ms: Some(median_ms),
            tokens,
            tokens_per_s: Some(tokens as f64 / secs),
            peak_rss_mib: Some(peak_rss_mib),
            gflops: Some(flops / secs / 1e9),
            error: None,
        }
    }

    /// A row with no measurement, saying why.
    pub fn missing(
        workload: &str,
        implementation: &str,
        tokens: usize,
        error: impl Into<String>,
    ) -> Self {
        Self {
            workload: workload.to_string(),
            implementation: implementation.to_string(),
            median_ms: None,
            tokens,
            tokens_per_s: None,
            peak_rss_mib: None,
            gflops: None,
            error: Some(error.into()),
        }
    }
}

/// Median of a sample (mean of the middle two for an even count); `None` when empty or when a
/// value is not finite.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() || values.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        0.5 * (v[mid - 1] + v[mid])
    })
}

/// Writes `records` as a pretty JSON list to `path` atomically: a temporary file in the same
/// folder, flushed to disk, then renamed over `path`, so a reader never sees half a report.
pub fn write_json_atomic(path: &Path, records: &[Record]) -> Result<(), String> {
    let mut text = serde_json::to_string_pretty(records).map_err(|e| e.to_string())?;
    text.push('\n');
    write_text_atomic(path, &text)
}

/// Writes `text` to `path` atomically (as [`write_json_atomic`] does).
pub fn write_text_atomic(path: &Path, text: &str) -> Result<(), String> {
    let dir = path
        .parent()
        .ok_or_else(|| format!("{} has no parent folder", path.display()))?;
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("writing {}: {e}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_bad_samples() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[5.0, 1.0, 4.0, 2.0]), Some(3.0));
        assert_eq!(median(&[7.5]), Some(7.5));
        assert_eq!(median(&[10.0, 1.0, 1.0, 1.0, 100.0]), Some(1.0));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[1.0, f64::NAN, 2.0]), None);
    }

    #[test]
    fn report_json_has_the_contract_shape() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-report-{}", std::process::id()));
        let path = dir.join("report.json");
        let records = vec![
            Record::measured("attn-causal-1k", OURS, 20.0, 1024, 120.5, 4.3e9),
            Record::measured("attn-causal-1k", REFERENCE, 640.0, 1024, 2156.0, 4.3e9),
            Record::missing("lm-full-1k", OURS, 1024, "not implemented yet"),
        ];
        write_json_atomic(&path, &records).unwrap();
        let value: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        let rows = value.as_array().expect("a list");
        assert_eq!(rows.len(), 3);

        let keys = |row: &serde_json::Value| {
            let mut k: Vec<String> = row.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        let contract = [
            "gflops",
            "impl",
            "median_ms",
            "peak_rss_mib",
            "tokens",
            "tokens_per_s",
            "workload",
        ];
        assert_eq!(keys(&rows[0]), contract);
        assert_eq!(rows[0]["impl"], "performer-rs");
        assert_eq!(rows[1]["impl"], "performer-pytorch");
        assert_eq!(rows[0]["workload"], "attn-causal-1k");
        assert_eq!(rows[0]["median_ms"], 20.0);
        assert_eq!(rows[0]["tokens"], 1024);
        assert_eq!(rows[0]["tokens_per_s"], 51200.0);
        assert_eq!(rows[0]["peak_rss_mib"], 120.5);
        assert!((rows[0]["gflops"].as_f64().unwrap() - 215.0).abs() < 1e-9);

        // An unmeasured row keeps the contract keys (null measurements) and says why.
        let mut with_error: Vec<&str> = contract.to_vec();
        with_error.insert(0, "error");
        assert_eq!(keys(&rows[2]), with_error);
        assert!(rows[2]["median_ms"].is_null());
        assert_eq!(rows[2]["error"], "not implemented yet");

        // Round trip, and no temporary file left behind.
        let back: Vec<Record> = serde_json::from_value(value).unwrap();
        assert_eq!(back, records);
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("report.json")]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
