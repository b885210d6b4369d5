//! A bf16 workload against the f32 model it is rounded from: `bench_workload --against-f32`
//! runs in a process of its own after the timed one (so the f32 model adds nothing to the
//! workload's peak RSS) and prints how many leading sampled tokens the two generations share
//! and the worst relative error of the bf16 logits; this module reads that line and says
//! whether the workload's bars ([`AgainstF32`]) hold.

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
}

/// The last stdout line that parses as an [`Agreement`].
pub fn parse(stdout: &str) -> Option<Agreement> {
    super::child::last_json_line(stdout)
}

/// Whether the bars hold, and the line for under the table: the figures, the bars, and `ok`
/// or what missed.
pub struct Verdict {
    /// Every bar holds.
    pub ok: bool,
    /// The line to print.
    pub line: String,
}

/// The [`Verdict`] on `got` against `bar`.
pub fn verdict(workload: &str, bar: &AgainstF32, got: &Result<Agreement, String>) -> Verdict {
    let head =
        format!("{workload} against the f32 model it is rounded from (same seed, prompt, sampler)");
    let a = match got {
        Ok(a) => a,
        Err(e) => {
            return Verdict {
                ok: false,
                line: format!("{head}: miss: no comparison ({e})"),
            };
        }
    };
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
        let out =
            "warming up\n{\"tokens_equal\": 64, \"tokens\": 64, \"logits_max_rel_err\": 3.9e-3}\n";
        assert_eq!(
            parse(out),
            Some(Agreement {
                tokens_equal: 64,
                tokens: 64,
                logits_max_rel_err: 3.9e-3
            })
        );
        assert_eq!(parse("{\"median_ms\": 1.0}\n"), None);
    }

    #[test]
    fn each_bar_can_miss_and_nan_misses() {
        let with = |tokens_equal, err| {
            verdict(
                "generate-512-bf16",
                &BAR,
                &Ok(Agreement {
                    tokens_equal,
                    tokens: 64,
                    logits_max_rel_err: err,
                }),
            )
        };
        let pass = |v: Verdict| v.ok && v.line.ends_with(": ok");
        let miss = |v: Verdict, why: &str| !v.ok && v.line.contains(why);
        assert!(pass(with(64, 3.9e-3)), "{}", with(64, 3.9e-3).line);
        assert!(pass(with(16, 1e-2)));
        assert!(miss(with(15, 3.9e-3), "miss: 15 < 16 equal tokens"));
        assert!(miss(with(64, 2e-2), "miss: logits 2.0e-2 > 1e-2"));
        assert!(miss(with(64, f64::NAN), "miss: logits NaN"));
        let failed = verdict("generate-512-bf16", &BAR, &Err("exit 1".into()));
        assert!(!failed.ok);
        assert!(
            failed.line.ends_with("miss: no comparison (exit 1)"),
            "{}",
            failed.line
        );
    }
}
