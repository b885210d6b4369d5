//! `examples/train_lm.rs` under failure: non-finite steps (stop with the last good checkpoint
//! kept, or skip with `--skip-nonfinite`), and a training process killed with SIGKILL at random
//! moments, during checkpoint writes included, that always leaves a loadable checkpoint and,
//! resumed, ends bit for bit where an uninterrupted run ends.
//!
//! The killed processes are this test binary run again (`child_process_entry`, which trains when
//! `TRAIN_LM_CHILD_ARGS` is set), so no separate build of the example is needed.

#[allow(dead_code)]
#[path = "../examples/train_lm.rs"]
mod train_lm;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use performer::tensor::Module;
use performer::tensor::rng::Generator;

/// The environment variable that turns this test binary into a `train_lm` process.
const CHILD_ARGS: &str = "TRAIN_LM_CHILD_ARGS";
/// The argument separator in `CHILD_ARGS`.
const SEP: char = '\u{1f}';

/// A scratch directory with a small corpus of its own.
struct Scratch {
    dir: PathBuf,
    data: String,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("train_lm_{name}_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("data.txt");
        let text: String = (0..400)
            .map(|i| {
                format!(
                    "line {i}: pack my box with five dozen liquor jugs {}\n",
                    i * 5 % 11
                )
            })
            .collect();
        std::fs::write(&data, text).unwrap();
        Scratch {
            data: data.to_str().unwrap().to_string(),
            dir,
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A small model's arguments, checkpointing every `checkpoint_every` steps.
fn args(data: &str, out: &Path, steps: u64, checkpoint_every: u64) -> Vec<String> {
    let out = out.to_str().unwrap();
    let (steps, every) = (steps.to_string(), checkpoint_every.to_string());
    [
        "--data",
        data,
        "--out",
        out,
        "--steps",
        &steps,
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
        "--feature-redraw-interval",
        "5",
        "--validate-every",
        "4",
        "--generate-every",
        "0",
        "--generate-length",
        "4",
        "--prime-length",
        "4",
        "--checkpoint-every",
        &every,
        "--val-windows",
        "2",
        "--lr",
        "3e-3",
        "--seed",
        "11",
        "--no-final-eval",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run(args: &[String]) -> Result<train_lm::TrainerState, String> {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    train_lm::train_with_args(&refs).map_err(|e| e.to_string())
}

fn all_finite(model: &performer::AutoregressiveWrapper) -> bool {
    model
        .net
        .parameters()
        .iter()
        .all(|p| p.tensor().to_array().iter().all(|x| x.is_finite()))
}

#[test]
fn a_nonfinite_step_stops_the_run_and_keeps_the_last_checkpoint() {
    let s = Scratch::new("nan_stop");
    let out = s.dir.join("run");
    let mut a = args(&s.data, &out, 10, 2);
    a.extend(["--inject-nonfinite-at".into(), "5".into()]);
    let err = run(&a).expect_err("a NaN gradient must stop the run");
    println!("{err}");
    assert!(err.contains("step 5"), "the message names the step: {err}");
    assert!(
        err.contains("not finite in"),
        "the message names the parameters: {err}"
    );
    assert!(err.contains("last checkpoint (step 4)"), "{err}");
    let saved = train_lm::load_checkpoint(&out).unwrap();
    assert_eq!(saved.state.step, 4);
    assert!(all_finite(&saved.model));
}

#[test]
#[cfg(not(feature = "cuda"))]
fn a_device_without_the_cuda_feature_is_a_clear_error() {
    let s = Scratch::new("no_cuda");
    let out = s.dir.join("run");
    let mut a = args(&s.data, &out, 2, 2);
    a.extend(["--device".into(), "emulated".into()]);
    let err = run(&a).expect_err("--device emulated needs the cuda feature");
    assert!(
        err.contains("without the `cuda` feature") && err.contains("--features cuda"),
        "{err}"
    );
    assert!(!out.exists(), "nothing may be written before the check");
    a.pop();
    a.push("gpu".into());
    let err = run(&a).expect_err("an unknown device");
    assert!(err.contains("cuda:N"), "{err}");
    a.truncate(a.len() - 2);
    a.push("--amp".into());
    let err = run(&a).expect_err("--amp on the CPU");
    assert!(err.contains("--amp") && err.contains("--device"), "{err}");
}

#[test]
fn skip_nonfinite_skips_the_update_and_goes_on() {
    let s = Scratch::new("nan_skip");
    let out = s.dir.join("run");
    let mut a = args(&s.data, &out, 8, 4);
    a.extend([
        "--skip-nonfinite".into(),
        "--inject-nonfinite-at".into(),
        "5".into(),
    ]);
    let state = run(&a).unwrap();
    assert_eq!(state.step, 8);
    assert_eq!(state.skipped, vec![5]);
    let saved = train_lm::load_checkpoint(&out).unwrap();
    assert_eq!(saved.state.skipped, vec![5]);
    assert!(all_finite(&saved.model));

    // Non-finite steps in a row beyond --max-skipped-steps stop it.
    let out = s.dir.join("run2");
    let mut a = args(&s.data, &out, 8, 4);
    a.extend(
        [
            "--skip-nonfinite",
            "--max-skipped-steps",
            "0",
            "--inject-nonfinite-at",
            "3",
        ]
        .map(String::from),
    );
    let err = run(&a).expect_err("max-skipped-steps 0 stops at the first");
    assert!(
        err.contains("step 3") && err.contains("--max-skipped-steps"),
        "{err}"
    );
}

/// Not a test of its own: the body of the child processes that the kill test starts.
#[test]
fn child_process_entry() {
    let Ok(joined) = std::env::var(CHILD_ARGS) else {
        return;
    };
    let args: Vec<String> = joined.split(SEP).map(String::from).collect();
    match run(&args) {
        Ok(_) => std::process::exit(0),
        Err(e) => {
            eprintln!("train_lm child: {e}");
            std::process::exit(1)
        }
    }
}

/// Starts this test binary as a `train_lm` process with `args`.
fn spawn(args: &[String]) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "child_process_entry",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ARGS, args.join(&SEP.to_string()))
        // The same thread count in every process, so every run sums in the same order.
        .env("RAYON_NUM_THREADS", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: std::process::Child) {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "train_lm child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether `path` exists and changed (contents or name) at or after `since`.
fn changed_since(path: &Path, since: std::time::SystemTime) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let ctime = std::time::UNIX_EPOCH
        + Duration::from_secs(meta.ctime() as u64)
        + Duration::from_nanos(meta.ctime_nsec() as u64);
    ctime >= since
}

/// What the checkpoint directory says about the moment of a kill of a process started at
/// `since` (scratch copies left by earlier kills do not count).
fn describe(dir: &Path, since: std::time::SystemTime) -> &'static str {
    let (tmp, old) = (train_lm::sibling(dir, "tmp"), train_lm::sibling(dir, "old"));
    if !dir.exists() && old.exists() {
        "during a save, between its two renames"
    } else if changed_since(&tmp, since) {
        "during a save, writing the new copy"
    } else if changed_since(&old, since) {
        "during a save, removing the previous copy"
    } else if !dir.exists() {
        "before the first checkpoint"
    } else if changed_since(dir, since) {
        "between saves"
    } else {
        "before this process saved anything"
    }
}

/// Asserts that the run in `part` ended bit for bit where the uninterrupted one in `full` did.
fn assert_same_run(full: &Path, part: &Path, steps: u64) {
    let (a, b) = (
        train_lm::load_checkpoint(full).unwrap().state,
        train_lm::load_checkpoint(part).unwrap().state,
    );
    assert_eq!(b.step, steps);
    assert_eq!(a.train, b.train, "train losses differ");
    assert_eq!(a.val, b.val, "validation losses differ");
    assert_eq!((a.global_rng, a.sampler_rng), (b.global_rng, b.sampler_rng));
    for file in ["model.safetensors", "optimizer.safetensors", "config.json"] {
        let read = |dir: &Path| std::fs::read(dir.join(file)).unwrap();
        assert!(read(full) == read(part), "{file} differs");
    }
}

/// The arguments that continue the run in `dir`, or start it when no checkpoint exists yet.
fn continue_args(data: &str, dir: &Path, steps: u64) -> Vec<String> {
    if train_lm::load_checkpoint(dir).is_ok() {
        vec![
            "--resume".into(),
            dir.to_str().unwrap().into(),
            "--steps".into(),
            steps.to_string(),
        ]
    } else {
        args(data, dir, steps, 1)
    }
}

#[test]
fn killed_at_random_moments_the_run_resumes_bit_for_bit() {
    const STEPS: u64 = 60;
    const KILLS: usize = 24;
    let s = Scratch::new("kill");
    let full = s.dir.join("full");
    // The uninterrupted run, in a process of its own like the others.
    let t = Instant::now();
    finish(spawn(&args(&s.data, &full, STEPS, 1)));
    let span = t.elapsed();
    println!("uninterrupted run: {span:?}");

    // Runs killed and resumed until they reach STEPS (a chain), then a fresh chain, until
    // KILLS kills have landed: the count does not depend on how fast this machine is.
    let mut g = Generator::seeded(2024);
    let mut kill_points = Vec::new();
    let (mut starts, mut chains) = (0, 0);
    let mut part = s.dir.join("part0");
    while kill_points.len() < KILLS {
        if train_lm::load_checkpoint(&part).map(|c| c.state.step).ok() == Some(STEPS) {
            assert_same_run(&full, &part, STEPS);
            chains += 1;
            part = s.dir.join(format!("part{chains}"));
            continue;
        }
        let since = std::time::SystemTime::now();
        let mut child = spawn(&continue_args(&s.data, &part, STEPS));
        starts += 1;
        // A random moment in the first fifth of a whole run's time: every process gets some
        // steps done, and the kills fall on every phase (start-up, steps, saves).
        let delay = span.mul_f64(0.2 * g.next_f64());
        std::thread::sleep(delay.max(Duration::from_millis(5)));
        if child.try_wait().unwrap().is_some() {
            finish(child); // finished before the kill: it must have succeeded
            continue;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let phase = describe(&part, since);
        // Whatever the moment, a checkpoint loads (unless none was written yet).
        let step = match train_lm::load_checkpoint(&part) {
            Ok(c) => {
                assert!(all_finite(&c.model));
                Some(c.state.step)
            }
            Err(e) => {
                assert!(
                    !part.exists() && !train_lm::sibling(&part, "old").exists(),
                    "no loadable checkpoint after a kill {phase}: {e}"
                );
                None
            }
        };
        println!(
            "kill {} after {delay:?}: {phase}; checkpoint at step {step:?}",
            kill_points.len() + 1
        );
        kill_points.push((phase, step));
    }
    // The narrowest window, a kill between a save's two renames, on purpose: the checkpoint
    // exists only as the previous copy aside.
    if part.exists() {
        // As the save does: a stale copy aside (from a kill while it was being removed) goes
        // first, then the rename.
        let old = train_lm::sibling(&part, "old");
        if old.exists() {
            std::fs::remove_dir_all(&old).unwrap();
        }
        std::fs::rename(&part, old).unwrap();
        let c = train_lm::load_checkpoint(&part).expect("the copy aside loads");
        println!("staged a kill between the renames at step {}", c.state.step);
        kill_points.push((
            "during a save, between its two renames (staged)",
            Some(c.state.step),
        ));
    }
    // Run the last chain to the end (also when its checkpoint is at the last step: the staged
    // kill left it aside).
    finish(spawn(&continue_args(&s.data, &part, STEPS)));
    assert_same_run(&full, &part, STEPS);
    chains += 1;

    let staged = kill_points
        .iter()
        .filter(|(p, _)| p.ends_with("(staged)"))
        .count();
    println!(
        "{} random kills over {starts} starts and {staged} staged, survived in {chains} killed-and-resumed runs",
        kill_points.len() - staged
    );
    let mut phases: Vec<&str> = kill_points.iter().map(|(p, _)| *p).collect();
    phases.sort();
    phases.dedup();
    for phase in &phases {
        let n = kill_points.iter().filter(|(p, _)| p == phase).count();
        println!("  {n:2} kills {phase}");
    }
    // The staged kill does not count: at least one random kill must have hit a save.
    assert!(
        kill_points
            .iter()
            .any(|(p, _)| p.starts_with("during a save") && !p.ends_with("(staged)")),
        "no random kill landed during a save: {kill_points:?}"
    );
}
