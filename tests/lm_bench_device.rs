//! `examples/lm_bench.rs` on the emulated device with a tiny shape: every workload prints one
//! parseable JSON line with the fields `bench_table.py` reads, and bad arguments are errors.
//! (Speed is not asserted: the emulator runs every CUDA thread as a fiber.)

#![cfg(feature = "cuda")]

#[allow(dead_code)]
#[path = "../examples/lm_bench.rs"]
mod lm_bench;

use performer::tensor::testing::emulated_device_available;

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

#[test]
fn tiny_benchmark_on_the_emulated_device_prints_parseable_lines() {
    if !emulated_device_available() {
        return;
    }
    let out = std::env::temp_dir().join(format!("lm-bench-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let a = lm_bench::parse_args(&args(&format!(
        "--device emulated --vocab 12 --dim 16 --depth 1 --heads 2 --seq 8 --batch 2 \
         --prompt 4 --new 3 --gen-batch 2 --warmup 1 --reps 3 --out {}",
        out.display()
    )))
    .unwrap();
    let lines = lm_bench::run(&a).unwrap();
    let written = std::fs::read_to_string(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    let returned: Vec<String> = lines.iter().map(|v| v.to_string()).collect();
    assert_eq!(
        written.lines().collect::<Vec<_>>(),
        returned,
        "the file holds the lines returned"
    );
    let parsed: Vec<serde_json::Value> = written
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<(String, String)> = parsed
        .iter()
        .map(|v| {
            (
                v["workload"].as_str().unwrap().to_string(),
                v["precision"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("train_step".to_string(), "f32".to_string()),
            ("train_step".into(), "bf16".into()),
            ("generate".into(), "f32".into()),
        ]
    );
    for v in &parsed {
        assert!(v.get("error").is_none(), "{v}");
        assert_eq!(v["impl"], "performer-rs");
        assert_eq!(v["device"], "emulated");
        let times: Vec<f64> = v["times_ms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_f64().unwrap())
            .collect();
        assert_eq!(times.len(), 3, "{v}");
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "sorted: {v}");
        let median = v["median_ms"].as_f64().unwrap();
        assert_eq!(median, times[1]);
        let tokens = v["tokens"].as_f64().unwrap();
        let want_tokens = if v["workload"] == "generate" {
            6.0
        } else {
            16.0
        };
        assert_eq!(tokens, want_tokens, "{v}");
        let tps = v["tokens_per_s"].as_f64().unwrap();
        assert!(
            (tps - tokens / (median / 1e3)).abs() <= 1e-6 * tps,
            "tokens/s from the median: {v}"
        );
    }
}

#[test]
fn bad_arguments_are_errors_naming_them() {
    for (bad, named) in [
        ("--dim 10 --heads 3", "--heads"),
        ("--reps 0", "--reps"),
        ("--workloads train,sing", "sing"),
        ("--bogus 1", "--bogus"),
        ("--seq x", "--seq"),
        ("--device", "--device"),
    ] {
        let err = lm_bench::parse_args(&args(bad)).unwrap_err();
        assert!(err.contains(named), "{bad}: {err}");
    }
}
