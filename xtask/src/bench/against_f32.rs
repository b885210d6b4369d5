//! A bf16 workload against the f32 model it is rounded from: `bench_workload --against-f32`
//! runs in a process of its own after the timed one (so the f32 model adds nothing to the
//! workload's peak RSS) and prints how many leading sampled tokens the two generations share,
//! the worst relative error of the bf16 logits, and both models' generation times measured
//! alternately in that process; this module reads that line and says whether the workload's
//! bars ([`AgainstF32`], and its speedup over f32) hold.

use serde::Deserialize;

use super::workloads::AgainstF32;

/// The JSON line of `bench_workload --against-f32`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Agreement {
    /// Leading sampled tokens equal in both generations.
    pub tokens_equal: usize,
    /// Tokens each generation sampled.
    pub tokens: usize,
    /// `max |bf16 - f32| / max |f32|` of the logits, worst step.
    pub logits_max_rel_err: f64,
    /// Generations of each model timed, alternating.
    pub pairs: usize,
    /// Median time of the f32 model's generations, ms.
    pub f32_ms: f64,
    /// Median time of the bf16 model's generations, ms.
    pub bf16_ms: f64,
}

/// The last stdout line that parses as an [`Agreement`].
pub fn parse(stdout: &str) -> Option<Agreement> {
    super::child::last_json_line(stdout)
}

/// Whether the bars hold, and the lines for under the table: the figures, the bars, and `ok`
/// or what missed.
pub struct Verdict {
    /// The tokens' and the logits' bars hold.
    pub ok: bool,
    /// The line on tokens and logits.
    pub line: String,
    /// Whether the speedup over f32 measured alternately holds its bar (none without a bar or
    /// without a comparison).
    pub speed_ok: Option<bool>,
    /// The line on that speedup (none without a comparison).
    pub speed_line: Option<String>,
}

/// The [`Verdict`] on `got` against `bar` and, where the workload has one, its minimum speedup
/// over f32 (`min_speedup`).
pub fn verdict(
    workload: &str,
    bar: &AgainstF32,
    min_speedup: Option<f64>,
    got: &Result<Agreement, String>,
) -> Verdict {
    let head =
        format!("{workload} against the f32 model it is rounded from (same seed, prompt, sampler)");
    let a = match got {
        Ok(a) => a,
        Err(e) => {
            return Verdict {
                ok: false,
                line: format!("{head}: miss: no comparison ({e})"),
                speed_ok: None,
                speed_line: None,
            };
        }
    };
    let (speed_ok, speed_line) = speed(workload, a, min_speedup);
    let mut misses = Vec::new();
    if a.tokens_equal < bar.min_equal_tokens {
        misses.push(format!(
            "{} < {} equal tokens",
            a.tokens_equal, bar.min_equal_tokens
        ));
    }
    if a.logits_max_rel_err.is_nan() || a.logits_max_rel_err > bar.max_logits_rel_err {
        misses.push(format!(
            "logits {:.1e} > {:.0e}",
            a.logits_max_rel_err, bar.max_logits_rel_err
        ));
    }
    let status = match misses.is_empty() {
        true => "ok".to_string(),
        false => format!("miss: {}", misses.join(", ")),
    };
    let line = format!(
        "{head}: the first {} of {} sampled tokens equal (bar: {}), logits within {:.1e} \
         relative (bar: {:.0e}): {status}",
        a.tokens_equal,
        a.tokens,
        bar.min_equal_tokens,
        a.logits_max_rel_err,
        bar.max_logits_rel_err
    );
    Verdict {
        ok: misses.is_empty(),
        line,
        speed_ok,
        speed_line: Some(speed_line),
    }
}

/// Whether the alternating times meet `min_speedup`, and their line. A time that is not a
/// positive number misses any bar.
fn speed(workload: &str, a: &Agreement, min_speedup: Option<f64>) -> (Option<bool>, String) {
    let head = format!(
        "{workload} alternating with the f32 model in one process ({} generations each)",
        a.pairs
    );
    let timed = a.f32_ms > 0.0 && a.bf16_ms > 0.0 && a.f32_ms.is_finite() && a.bf16_ms.is_finite();
    if !timed {
        // A miss only where there is a bar to miss.
        let status = if min_speedup.is_some() { "miss: " } else { "" };
        let line = format!(
            "{head}: {status}no timing (bf16 {} ms, f32 {} ms)",
            a.bf16_ms, a.f32_ms
        );
        return (min_speedup.map(|_| false), line);
    }
    let ratio = a.f32_ms / a.bf16_ms;
    let figures = format!(
        "{head}: {:.1} against {:.1} ms, {ratio:.2}x",
        a.bf16_ms, a.f32_ms
    );
    match min_speedup {
        None => (None, figures),
        Some(min) => {
            let ok = ratio >= min;
            let status = if ok { "ok" } else { "miss" };
            (Some(ok), format!("{figures} (bar: {min}x): {status}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BAR: AgainstF32 = AgainstF32 {
        min_equal_tokens: 16,
        max_logits_rel_err: 1e-2,
    };

    #[test]
    fn the_line_is_read_after_other_output() {
        let out = "warming up\n{\"tokens_equal\": 64, \"tokens\": 64, \"logits_max_rel_err\": \
                   3.9e-3, \"pairs\": 7, \"f32_ms\": 36.2, \"bf16_ms\": 25.1}\n";
        assert_eq!(parse(out), Some(agreement(64, 3.9e-3, 36.2, 25.1)));
        assert_eq!(parse("{\"median_ms\": 1.0}\n"), None);
    }

    fn agreement(tokens_equal: usize, err: f64, f32_ms: f64, bf16_ms: f64) -> Agreement {
        Agreement {
            tokens_equal,
            tokens: 64,
            logits_max_rel_err: err,
            pairs: 7,
            f32_ms,
            bf16_ms,
        }
    }

    #[test]
    fn the_speedup_measured_alternately_meets_its_bar_or_misses() {
        let with = |f32_ms, bf16_ms, bar| {
            verdict(
                "generate-512-bf16",
                &BAR,
                bar,
                &Ok(agreement(64, 3.9e-3, f32_ms, bf16_ms)),
            )
        };
        let v = with(36.2, 25.1, Some(1.6));
        assert_eq!(v.speed_ok, Some(false));
        let line = v.speed_line.unwrap();
        assert!(
            line.ends_with("(7 generations each): 25.1 against 36.2 ms, 1.44x (bar: 1.6x): miss"),
            "{line}"
        );
        assert!(
            v.ok,
            "the tokens' and logits' bars are apart from the speed's"
        );
        let v = with(40.0, 25.0, Some(1.6));
        assert_eq!(v.speed_ok, Some(true), "{:?}", v.speed_line);
        assert!(v.speed_line.unwrap().ends_with("1.60x (bar: 1.6x): ok"));
        let v = with(36.2, 25.1, None);
        assert_eq!(v.speed_ok, None);
        assert!(v.speed_line.unwrap().ends_with("1.44x"));
        let v = with(f64::NAN, 25.0, None);
        assert_eq!(v.speed_ok, None);
        let line = v.speed_line.unwrap();
        assert!(
            line.contains(": no timing") && !line.contains("miss"),
            "{line}"
        );
        for (f, b) in [
            (f64::NAN, 25.0),
            (36.0, 0.0),
            (36.0, f64::INFINITY),
            (-1.0, 25.0),
        ] {
            let v = with(f, b, Some(1.6));
            assert_eq!(v.speed_ok, Some(false), "f32 {f} bf16 {b}");
            assert!(v.speed_line.unwrap().contains("miss: no timing"));
        }
        let failed = verdict("generate-512-bf16", &BAR, Some(1.6), &Err("exit 1".into()));
        assert_eq!((failed.speed_ok, failed.speed_line), (None, None));
    }

    #[test]
    fn each_bar_can_miss_and_nan_misses() {
        let with = |tokens_equal, err| {
            verdict(
                "generate-512-bf16",
                &BAR,
                Some(1.6),
                &Ok(agreement(tokens_equal, err, 36.2, 25.1)),
            )
        };
        let pass = |v: Verdict| v.ok && v.line.ends_with(": ok");
        let miss = |v: Verdict, why: &str| !v.ok && v.line.contains(why);
        assert!(pass(with(64, 3.9e-3)), "{}", with(64, 3.9e-3).line);
        assert!(pass(with(16, 1e-2)));
        assert!(miss(with(15, 3.9e-3), "miss: 15 < 16 equal tokens"));
        assert!(miss(with(64, 2e-2), "miss: logits 2.0e-2 > 1e-2"));
        assert!(miss(with(64, f64::NAN), "miss: logits NaN"));
        let failed = verdict("generate-512-bf16", &BAR, Some(1.6), &Err("exit 1".into()));
        assert!(!failed.ok);
        assert!(
            failed.line.ends_with("miss: no comparison (exit 1)"),
            "{}",
            failed.line
        );
    }
}
