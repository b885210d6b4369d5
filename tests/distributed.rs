//! Data-parallel training of a PerformerLM across `mpirun -np 2` ranks (feature `mpi`): each
//! test starts `mpirun` on this test binary, whose `mpi_rank` entry runs one scenario as a rank
//! (and returns at once when not started by a test). Without `mpirun` on `PATH` the tests say
//! so and pass, unless `PERFORMER_DIST_REQUIRE_MPI=1` (set by `.ci/run`) makes that a failure.
//!
//! - Two ranks with micro-batch b against one process with batch 2b on the same sequences: the
//!   averaged gradients of the first step equal within 1e-5 (relative to the largest), and the
//!   losses of 20 Adam steps (with projection redraws) within 1e-3.
//! - Projections redrawn from a shared seed are bit for bit equal on both ranks after 3 redraws;
//!   a rank whose redraw seed is off fails the check.
//! - `train_lm --distributed mpi` (its `run_main`, the binary's own entry): 2 ranks with
//!   `--batch-size 2` print the validation bits per byte of one process with `--batch-size 4`;
//!   a 2-rank checkpoint resumes on 1 rank where the 2-rank run went; a killed or stalled
//!   rank ends the job within the timeout with a clear error, and the last checkpoint loads.

#[allow(dead_code)]
#[path = "../examples/train_lm.rs"]
mod train_lm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use ndarray::Array2;
use performer::dist::seed::{Stream, derive_seed, shard};
use performer::dist::state::{broadcast_module, check_synchronized, fingerprints};
use performer::dist::{Communicator, DataParallel, MpiCommunicator, SingleProcess};
use performer::tensor::Module;
use performer::tensor::optim::{Adam, Optimizer};
use performer::tensor::rng::{self, Generator};
use performer::{AutoregressiveWrapper, PerformerLM, PerformerLMConfig, SeqInputs};
use serde::{Deserialize, Serialize};

/// Set on the ranks: which scenario to run, and where to write results.
const SCENARIO: &str = "PERFORMER_DIST_TEST_SCENARIO";
const OUT: &str = "PERFORMER_DIST_TEST_OUT";
/// Set on the ranks of the `train_lm` scenario: its arguments, separated by newlines.
const ARGS: &str = "PERFORMER_DIST_TEST_ARGS";

/// Starts `mpirun -np ranks` on this binary's `mpi_rank` entry; `None` (after saying why)
/// where there is no mpirun and it is not required. Kills the job after `limit`.
fn run_ranks(ranks: usize, scenario: &str, out: &Path, limit: Duration) -> Option<Output> {
    run_ranks_with(ranks, scenario, out, &[], limit)
}

/// [`run_ranks`] with `train_lm` arguments for the ranks.
fn run_ranks_with(
    ranks: usize,
    scenario: &str,
    out: &Path,
    args: &[String],
    limit: Duration,
) -> Option<Output> {
    let Some(mut cmd) = performer::dist::launch::local_mpirun(ranks) else {
        if std::env::var("PERFORMER_DIST_REQUIRE_MPI").as_deref() == Ok("1") {
            panic!("mpirun is not on PATH and PERFORMER_DIST_REQUIRE_MPI=1 (install openmpi-bin)");
        }
        eprintln!("skipped: mpirun is not on PATH (apt-get install openmpi-bin libopenmpi-dev)");
        return None;
    };
    cmd.arg(std::env::current_exe().unwrap())
        .args(["--exact", "mpi_rank", "--nocapture", "--test-threads", "1"])
        .env(SCENARIO, scenario)
        .env(OUT, out)
        .env(ARGS, args.join("\n"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd.spawn().expect("mpirun starts");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if rx.recv_timeout(limit).is_err() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
    });
    let output = child.wait_with_output().expect("mpirun runs");
    let _ = tx.send(());
    watchdog.join().unwrap();
    Some(output)
}

fn log(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("perf_dist_{name}_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What a run records.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
struct Record {
    /// The (global) mean loss of each step.
    losses: Vec<f32>,
    /// The averaged gradients of the first step, by parameter name.
    first_grads: BTreeMap<String, Vec<f32>>,
    /// Steps after which the projections had changed (redraws).
    redraw_steps: Vec<u64>,
    /// Fingerprints of the final state, by name.
    final_state: Vec<(String, u64)>,
}

const SEED: u64 = 3;
const SEQ: usize = 24;

fn config(redraw_interval: usize) -> PerformerLMConfig {
    PerformerLMConfig {
        num_tokens: 256,
        max_seq_len: SEQ,
        dim: 32,
        depth: 2,
        heads: 2,
        dim_head: 16,
        nb_features: Some(16),
        feature_redraw_interval: Some(redraw_interval),
        causal: true,
        ..Default::default()
    }
}

/// A corpus of English-like bytes, the same everywhere.
fn corpus() -> Vec<u8> {
    (0..300)
        .flat_map(|i| format!("line {i}: a quick brown fox {} jumps; ", i * 7 % 11).into_bytes())
        .collect()
}

fn projections(model: &AutoregressiveWrapper) -> Vec<(String, u64)> {
    fingerprints(&model.net)
        .into_iter()
        .filter(|(name, _)| name.ends_with("projection_matrix"))
        .collect()
}

/// `steps` Adam steps of data-parallel training on `comm`, `per_rank` sequences per rank,
/// the global batch drawn alike on every rank and split into shares. Redraws come from
/// `redraw_seed` and the step; `check_after_redraw` compares all ranks' states after each.
fn train(
    comm: &dyn Communicator,
    per_rank: usize,
    steps: u64,
    redraw_interval: usize,
    redraw_seed: u64,
    check_after_redraw: bool,
) -> performer::dist::Result<Record> {
    let (rank, world) = (comm.rank(), comm.world_size());
    // Each rank initializes differently; the broadcast makes rank 0's weights everyone's.
    rng::manual_seed(SEED + rank as u64);
    let model = AutoregressiveWrapper::new(PerformerLM::new(config(redraw_interval))?);
    broadcast_module(comm, &model.net, 0)?;
    check_synchronized(comm, &model.net)?;
    let mut dp = DataParallel::with_bucket_elems(comm, model.net.parameters(), 20_000);
    let mut opt = Adam::new(model.net.named_parameters(), 3e-3);
    let names: BTreeMap<_, _> = model
        .net
        .named_parameters()
        .into_iter()
        .map(|(n, p)| (p.id(), n))
        .collect();
    let data = corpus();
    let mut sampler = Generator::seeded(SEED);
    let global = per_rank * world;
    let mine = shard(global, rank, world)?;
    let mut record = Record::default();
    let mut last_proj = projections(&model);
    for step in 1..=steps {
        model
            .net
            .set_redraw_generator(Some(Generator::seeded(derive_seed(
                redraw_seed,
                Stream::Redraw { step },
            ))));
        rng::manual_seed(derive_seed(SEED, Stream::Dropout { step, rank }));
        let offsets: Vec<usize> = (0..global)
            .map(|_| sampler.below((data.len() - SEQ - 1) as u64) as usize)
            .collect();
        let x = Array2::from_shape_fn((per_rank, SEQ + 1), |(r, c)| {
            data[offsets[mine.start + r] + c] as i64
        });
        let loss = model.loss(&x.view(), &SeqInputs::default())?;
        let mut value = [loss.item()?];
        let grads = dp.backward(&loss, None)?;
        comm.all_reduce_mean(&mut [&mut value[..]])?;
        record.losses.push(value[0]);
        if step == 1 {
            for (id, name) in &names {
                if let Some(g) = grads.get_id(*id) {
                    record
                        .first_grads
                        .insert(name.clone(), g.iter().copied().collect());
                }
            }
        }
        opt.step(&grads)?;
        let proj = projections(&model);
        if proj != last_proj {
            record.redraw_steps.push(step);
            if check_after_redraw {
                check_synchronized(comm, &model.net)?;
            }
            last_proj = proj;
        }
    }
    check_synchronized(comm, &model.net)?;
    record.final_state = fingerprints(&model.net);
    Ok(record)
}

/// The ranks' side: runs the scenario named by the environment, or nothing.
#[test]
fn mpi_rank() {
    let Ok(scenario) = std::env::var(SCENARIO) else {
        return;
    };
    let out = PathBuf::from(std::env::var(OUT).expect("output folder"));
    if scenario == "train_lm" {
        // The process as `train_lm` would run it (it joins the world itself).
        let args = std::env::var(ARGS).unwrap_or_default();
        let argv = std::iter::once("train_lm").chain(args.lines());
        std::process::exit(train_lm::run_main(argv.map(Into::into).collect(), false));
    }
    let comm = MpiCommunicator::init().expect("MPI initializes");
    let rank = comm.rank();
    match scenario.as_str() {
        "equivalence" => {
            let record = train(&comm, 2, 20, 3, SEED, false).unwrap();
            let path = out.join(format!("rank{rank}.json"));
            std::fs::write(path, serde_json::to_vec(&record).unwrap()).unwrap();
            println!("rank {rank}: trained");
        }
        "redraws" => {
            let record = train(&comm, 1, 6, 1, SEED, true).unwrap();
            assert_eq!(record.redraw_steps, vec![2, 4, 6]);
            println!("rank {rank}: 3 redraws, every projection equal on all ranks");
        }
        "redraws-desync" => {
            // Rank 1 redraws from another seed: the first check after a redraw must fail.
            let seed = SEED + rank as u64;
            let err = train(&comm, 1, 6, 1, seed, true).unwrap_err();
            println!("rank {rank}: {err}");
        }
        other => panic!("unknown scenario {other}"),
    }
}

#[test]
fn two_ranks_with_batch_b_match_one_process_with_batch_2b() {
    let out = scratch("equivalence");
    let Some(output) = run_ranks(2, "equivalence", &out, Duration::from_secs(300)) else {
        return;
    };
    assert!(
        output.status.success(),
        "the ranks failed:\n{}",
        log(&output)
    );
    let read = |rank: usize| -> Record {
        serde_json::from_slice(&std::fs::read(out.join(format!("rank{rank}.json"))).unwrap())
            .unwrap()
    };
    let (r0, r1) = (read(0), read(1));
    assert_eq!(
        r0, r1,
        "both ranks saw the same losses, gradients and final state"
    );
    let t = Instant::now();
    let single = train(&SingleProcess, 4, 20, 3, SEED, false).unwrap();
    eprintln!("single-process reference: {:?}", t.elapsed());
    assert_eq!(r0.redraw_steps, single.redraw_steps);
    assert!(
        r0.redraw_steps.len() >= 4,
        "redraws happened: {:?}",
        r0.redraw_steps
    );

    // First step's averaged gradients: within 1e-5 of the largest magnitude.
    assert_eq!(
        r0.first_grads.keys().collect::<Vec<_>>(),
        single.first_grads.keys().collect::<Vec<_>>()
    );
    let largest = single
        .first_grads
        .values()
        .flatten()
        .fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(largest > 0.0);
    let mut worst = 0.0f32;
    for (name, want) in &single.first_grads {
        let got = &r0.first_grads[name];
        assert_eq!(got.len(), want.len(), "{name}");
        for (g, w) in got.iter().zip(want) {
            let d = (g - w).abs() / largest;
            assert!(
                d <= 1e-5,
                "{name}: {g} vs {w} ({d:e} of the largest, {largest})"
            );
            worst = worst.max(d);
        }
    }
    // Losses of 20 steps.
    assert_eq!(r0.losses.len(), 20);
    assert_eq!(single.losses.len(), 20);
    let mut worst_loss = 0.0f32;
    for (step, (a, b)) in r0.losses.iter().zip(&single.losses).enumerate() {
        assert!(a.is_finite() && b.is_finite());
        assert!((a - b).abs() <= 1e-3, "step {}: {a} vs {b}", step + 1);
        worst_loss = worst_loss.max((a - b).abs());
    }
    assert!(
        r0.losses[19] < r0.losses[0] - 0.5,
        "training learns: {:?}",
        r0.losses
    );
    eprintln!(
        "first-step gradients: worst difference {worst:.2e} of the largest; losses: worst \
         {worst_loss:.2e} over 20 steps ({} -> {})",
        r0.losses[0], r0.losses[19]
    );
}

#[test]
fn projections_redrawn_from_the_shared_seed_are_equal_on_all_ranks() {
    let out = scratch("redraws");
    let Some(output) = run_ranks(2, "redraws", &out, Duration::from_secs(120)) else {
        return;
    };
    let text = log(&output);
    assert!(output.status.success(), "the ranks failed:\n{text}");
    for rank in 0..2 {
        assert!(
            text.contains(&format!(
                "rank {rank}: 3 redraws, every projection equal on all ranks"
            )),
            "{text}"
        );
    }
}

#[test]
fn a_rank_with_another_redraw_seed_fails_the_check() {
    let out = scratch("desync");
    let Some(output) = run_ranks(2, "redraws-desync", &out, Duration::from_secs(120)) else {
        return;
    };
    let text = log(&output);
    assert!(output.status.success(), "the ranks failed:\n{text}");
    for rank in 0..2 {
        let line = text
            .lines()
            .find(|l| l.contains(&format!("rank {rank}: ranks disagree")))
            .unwrap_or_else(|| panic!("rank {rank} reports the mismatch:\n{text}"));
        // Exactly the projections (2 layers) differ, nothing else.
        assert!(
            line.contains("2 of ") && line.contains("projection_matrix"),
            "{line}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// train_lm --distributed mpi

/// A small model on a corpus of its own, `steps` steps, validating and checkpointing every 5.
fn train_lm_args(data: &Path, out: &Path, batch: usize, steps: u64) -> Vec<String> {
    let args = format!(
        "--data {} --out {} --batch-size {batch} --steps {steps} --dim 32 --depth 2 --heads 2 \
         --dim-head 16 --nb-features 16 --seq-len 32 --local-window-size 16 --warmup 5 --decay-steps 20 \
         --validate-every 5 --checkpoint-every 5 --val-windows 8 --generate-every 0 \
         --generate-length 8 --no-final-eval --threads 1",
        data.display(),
        out.display()
    );
    args.split(' ').map(String::from).collect()
}

fn text_corpus(dir: &Path) -> PathBuf {
    let path = dir.join("data.txt");
    let text: String = (0..600)
        .map(|i| {
            format!(
                "line {i}: the quick brown fox jumps over the lazy dog {}\n",
                i * 7 % 13
            )
        })
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

fn val_at(state: &train_lm::TrainerState, step: u64) -> f64 {
    state
        .val
        .iter()
        .find(|p| p.step == step)
        .unwrap_or_else(|| panic!("no validation at step {step}: {:?}", state.val))
        .bpb
}

fn with_distributed(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    args.extend(["--distributed", "mpi"].iter().map(|s| s.to_string()));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn train_lm_on_two_ranks_matches_one_process_with_twice_the_batch_and_resumes_on_one() {
    let tmp = scratch("train_lm");
    let data = text_corpus(&tmp);
    let (two, part, one) = (tmp.join("two"), tmp.join("part"), tmp.join("one"));
    let limit = Duration::from_secs(300);
    let args = with_distributed(train_lm_args(&data, &two, 2, 20), &[]);
    let Some(output) = run_ranks_with(2, "train_lm", &tmp, &args, limit) else {
        return;
    };
    let text = log(&output);
    assert!(output.status.success(), "2 ranks:\n{text}");
    assert!(
        text.contains("ranks: 2 (mpi) x 2 sequences per micro-batch"),
        "{text}"
    );
    assert!(
        text.contains("batch 4 x 1 accumulated"),
        "the global batch:\n{text}"
    );
    // Rank 0 alone prints.
    assert_eq!(text.matches("=== summary ===").count(), 1, "{text}");
    let two = train_lm::load_checkpoint(&two).unwrap().state;

    // One process, twice the batch, in this process.
    let args = train_lm_args(&data, &one, 4, 20);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let one = train_lm::train_with_args(&refs).unwrap();
    for step in [5, 10, 15, 20] {
        let (a, b) = (val_at(&two, step), val_at(&one, step));
        assert!(
            (a - b).abs() < 0.01,
            "step {step}: 2 ranks {a} vs 1 process {b}"
        );
    }
    eprintln!(
        "validation at step 20: 2 ranks x 2 {:.6} bpb, 1 process x 4 {:.6} bpb",
        val_at(&two, 20),
        val_at(&one, 20)
    );
    assert_eq!(
        two.settings.batch_size, 4,
        "the checkpoint records the global batch"
    );

    // 10 steps on 2 ranks, then resumed on 1 rank to step 20: where the 2-rank run went.
    let args = with_distributed(train_lm_args(&data, &part, 2, 10), &[]);
    let output = run_ranks_with(2, "train_lm", &tmp, &args, limit).unwrap();
    assert!(
        output.status.success(),
        "2 ranks, 10 steps:\n{}",
        log(&output)
    );
    let args = with_distributed(
        vec!["--resume".into(), part.display().to_string()],
        &["--steps", "20"],
    );
    let output = run_ranks_with(1, "train_lm", &tmp, &args, limit).unwrap();
    assert!(
        output.status.success(),
        "resumed on 1 rank:\n{}",
        log(&output)
    );
    let resumed = train_lm::load_checkpoint(&part).unwrap().state;
    assert_eq!(resumed.step, 20);
    let (a, b) = (val_at(&resumed, 20), val_at(&two, 20));
    assert!((a - b).abs() < 1e-3, "resumed {a} vs uninterrupted {b}");
    assert_eq!(
        resumed.train.len(),
        two.train.len(),
        "training curves' lengths"
    );
    for (p, q) in resumed.train.iter().zip(&two.train) {
        assert_eq!(p.step, q.step);
        assert!(
            (p.bpb - q.bpb).abs() < 1e-3,
            "step {}: {} vs {}",
            p.step,
            p.bpb,
            q.bpb
        );
    }
}

/// Runs 2 ranks of train_lm with rank 1 failing at step 13 (`how`), checkpoints every 5.
fn failing_rank(how: &str, timeout: &str) -> Option<(String, Duration, PathBuf)> {
    let tmp = scratch(&format!("failing_{how}"));
    let data = text_corpus(&tmp);
    let out = tmp.join("run");
    let args = with_distributed(
        train_lm_args(&data, &out, 2, 40),
        &[
            "--inject-rank-failure",
            &format!("1:13:{how}"),
            "--dist-timeout",
            timeout,
        ],
    );
    let start = Instant::now();
    let output = run_ranks_with(2, "train_lm", &tmp, &args, Duration::from_secs(120))?;
    let took = start.elapsed();
    let text = log(&output);
    assert!(!output.status.success(), "the job must fail:\n{text}");
    assert!(
        text.contains(&format!("rank 1: --inject-rank-failure: {how} at step 13")),
        "{text}"
    );
    Some((text, took, out))
}

#[test]
fn a_killed_rank_ends_the_job_and_the_last_checkpoint_loads() {
    let Some((text, took, out)) = failing_rank("kill", "20") else {
        return;
    };
    assert!(took < Duration::from_secs(60), "took {took:?}:\n{text}");
    let saved = train_lm::load_checkpoint(&out).expect("the last checkpoint loads");
    assert_eq!(saved.state.step, 10, "{text}");
}

#[test]
fn a_stalled_rank_fails_the_others_with_a_clear_error_within_the_timeout() {
    let Some((text, took, out)) = failing_rank("stall", "3") else {
        return;
    };
    assert!(
        text.contains("train_lm: rank 0: error: mpi rank 0 of 2: all-reduce")
            && text.contains("did not complete within 3s: another rank died, stalled"),
        "{text}"
    );
    assert!(text.contains("aborting the whole job"), "{text}");
    assert!(took < Duration::from_secs(60), "took {took:?}:\n{text}");
    let saved = train_lm::load_checkpoint(&out).expect("the last checkpoint loads");
    assert_eq!(saved.state.step, 10, "{text}");
}
