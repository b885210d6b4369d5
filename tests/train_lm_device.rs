//! `examples/train_lm.rs --device emulated` against the same run on the CPU: a tiny model, the
//! same seed and batches, so every step's loss, the validation score and the weights written to
//! the checkpoint (copied back from the device) agree within float tolerance; the device
//! checkpoint then resumes on the CPU. (The emulator runs every CUDA thread as a fiber: shapes
//! stay tiny.)

#![cfg(feature = "cuda")]

#[allow(dead_code)]
#[path = "../examples/train_lm.rs"]
mod train_lm;

use std::path::{Path, PathBuf};

use performer::tensor::Module;
use performer::tensor::testing::emulated_device_available;
use performer::tensor::testing::relative_error;

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn args(data: &Path, out: &Path, steps: u64, device: &str) -> Vec<String> {
    let steps = steps.to_string();
    [
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        &steps,
        "--device",
        device,
        "--dim",
        "16",
        "--depth",
        "1",
        "--heads",
        "2",
        "--dim-head",
        "8",
        "--nb-features",
        "8",
        "--seq-len",
        "8",
        "--batch-size",
        "2",
        "--local-window-size",
        "4",
        "--validate-every",
        "3",
        "--val-windows",
        "2",
        "--generate-every",
        "0",
        "--generate-length",
        "4",
        "--prime-length",
        "4",
        "--checkpoint-every",
        "3",
        "--warmup",
        "0",
        "--lr",
        "1e-2",
        "--seed",
        "5",
        "--no-final-eval",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run(args: &[String]) -> train_lm::TrainerState {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    train_lm::train_with_args(&refs).unwrap_or_else(|e| panic!("train_lm {args:?}: {e}"))
}

#[test]
fn training_on_the_emulated_device_follows_the_cpu_and_resumes_on_it() {
    if !emulated_device_available() {
        return;
    }
    let tmp = std::env::temp_dir().join(format!("train_lm_device_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let _cleanup = Scratch(tmp.clone());
    let data = tmp.join("data.txt");
    let text: String = (0..200)
        .map(|i| format!("{i}: sphinx of black quartz, judge my vow {}\n", i % 7))
        .collect();
    std::fs::write(&data, text).unwrap();
    let (cpu_dir, dev_dir) = (tmp.join("cpu"), tmp.join("dev"));
    let cpu = run(&args(&data, &cpu_dir, 3, "cpu"));
    let mut dev_args = args(&data, &dev_dir, 3, "emulated");
    let report = tmp.join("report.json");
    dev_args.extend(["--report".to_string(), report.to_str().unwrap().to_string()]);
    let dev = run(&dev_args);
    // The model really trained there (the report reads its parameters' device).
    let report: train_lm::RunReport =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report.device, "emulated");

    assert_eq!(cpu.train.len(), 3);
    assert_eq!(dev.train.len(), cpu.train.len(), "one loss per step");
    for (c, d) in cpu.train.iter().zip(&dev.train) {
        assert_eq!(c.step, d.step);
        let err = (c.bpb - d.bpb).abs() / c.bpb.abs();
        assert!(
            err < 1e-4,
            "step {}: cpu {} vs emulated {}",
            c.step,
            c.bpb,
            d.bpb
        );
    }
    assert_eq!(dev.val.len(), cpu.val.len());
    for (c, d) in cpu.val.iter().zip(&dev.val) {
        assert!((c.bpb - d.bpb).abs() / c.bpb.abs() < 1e-4, "{c:?} vs {d:?}");
    }
    // The checkpoints: weights copied back from the device, within 1e-4 of the CPU's after
    // three Adam steps; Adam's moments too.
    let (c, d) = (
        train_lm::load_checkpoint(&cpu_dir).unwrap(),
        train_lm::load_checkpoint(&dev_dir).unwrap(),
    );
    let (cp, dp) = (
        c.model.net.named_parameters(),
        d.model.net.named_parameters(),
    );
    assert_eq!(cp.len(), dp.len());
    for ((name, a), (_, b)) in cp.iter().zip(&dp) {
        let err = relative_error(&b.tensor().to_array(), &a.tensor().to_array()).unwrap();
        assert!(err < 1e-4, "{name}: {err:e}");
    }
    assert_eq!(c.opt_state.len(), d.opt_state.len());
    for (name, a) in &c.opt_state {
        let b = &d.opt_state[name];
        if name == "step" {
            let step = |t: &performer::tensor::io::TensorData| t.clone().into_i64(name).unwrap();
            assert_eq!(step(a), step(b), "Adam's step count");
            continue;
        }
        let (a, b) = (
            a.clone().into_f32(name).unwrap(),
            b.clone().into_f32(name).unwrap(),
        );
        let err = relative_error(&b, &a).unwrap();
        assert!(err < 1e-3, "optimizer {name}: {err:e}");
    }
    // The device's checkpoint goes on on the CPU.
    let mut more = args(&data, &dev_dir, 5, "cpu");
    more.extend([
        "--resume".to_string(),
        dev_dir.to_str().unwrap().to_string(),
    ]);
    let resumed = run(&more);
    assert_eq!(resumed.step, 5);
    assert_eq!(resumed.train.len(), 5);
    assert!(resumed.train.iter().all(|p| p.bpb.is_finite()));
}
