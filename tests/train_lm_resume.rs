//! `examples/train_lm.rs`: 10 steps + `--resume` 10 steps end bit for bit where an uninterrupted
//! 20-step run ends (weights, optimizer state, sampler and global generator, loss history), with
//! a projection redraw, gradient accumulation and the learning-rate schedule (warm-up, cosine,
//! AdamW weight decay) on both sides of the resume point.

#[allow(dead_code)]
#[path = "../examples/train_lm.rs"]
mod train_lm;

use std::path::Path;

fn read(dir: &Path, file: &str) -> Vec<u8> {
    std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()))
}

#[test]
fn resume_matches_an_uninterrupted_run() {
    let tmp = std::env::temp_dir().join(format!("train_lm_resume_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    // A small corpus of its own, so nothing else can change the data between the runs.
    let data = tmp.join("data.txt");
    let text: String = (0..400)
        .map(|i| {
            format!(
                "line {i}: the quick brown fox jumps over the lazy dog {}\n",
                i * 7 % 13
            )
        })
        .collect();
    std::fs::write(&data, text).unwrap();
    let data = data.to_str().unwrap().to_string();
    let (full, part) = (tmp.join("full"), tmp.join("part"));
    let common = |out: &Path, steps: &str| -> Vec<String> {
        [
            "--data",
            &data,
            "--out",
            out.to_str().unwrap(),
            "--steps",
            steps,
            "--dim",
            "32",
            "--depth",
            "2",
            "--heads",
            "2",
            "--dim-head",
            "16",
            "--nb-features",
            "16",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--grad-accum",
            "2",
            "--feature-redraw-interval",
            "13",
            "--validate-every",
            "5",
            "--generate-every",
            "7",
            "--generate-length",
            "8",
            "--prime-length",
            "8",
            "--checkpoint-every",
            "4",
            "--val-windows",
            "3",
            "--lr",
            "3e-3",
            // Warm-up to step 5, cosine to step 20: the schedule crosses the resume point at
            // 10 in both phases' worth of steps; the horizon is fixed at the start, so the
            // 10-step run decays towards the same step 20 as the uninterrupted one.
            "--warmup",
            "5",
            "--decay-steps",
            "20",
            "--min-lr",
            "3e-4",
            "--weight-decay",
            "0.1",
            "--seed",
            "7",
            "--no-final-eval",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        train_lm::train_with_args(&refs).unwrap_or_else(|e| panic!("train_lm {args:?}: {e}"))
    };

    let a = run(common(&full, "20"));
    let b1 = run(common(&part, "10"));
    assert_eq!(b1.step, 10);
    // Settings and intervals come from the checkpoint; only --steps changes.
    let b = run(vec![
        "--resume".into(),
        part.to_str().unwrap().into(),
        "--steps".into(),
        "20".into(),
        "--no-final-eval".into(),
    ]);

    assert_eq!(a.step, 20);
    assert_eq!(b.step, 20);
    assert_eq!(a.train, b.train, "train losses differ");
    assert_eq!(a.val, b.val, "validation losses differ");
    assert_eq!(a.global_rng, b.global_rng);
    assert_eq!(a.sampler_rng, b.sampler_rng);
    assert_eq!(a.tokens, b.tokens);
    for file in ["model.safetensors", "optimizer.safetensors", "config.json"] {
        assert!(read(&full, file) == read(&part, file), "{file} differs");
    }
    assert!(full.join("loss.svg").is_file());
    // The loss fell.
    assert!(
        a.train.last().unwrap().bpb < a.train[0].bpb - 0.5,
        "{:?}",
        a.train
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
