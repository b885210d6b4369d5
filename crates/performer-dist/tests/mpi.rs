//! The MPI back end across real processes: each test starts `mpirun -np 2` on this test
//! binary, whose `mpi_rank` entry then runs one scenario as a rank (it returns at once when not
//! started by a test). Without `mpirun` on `PATH` the tests say so and pass, unless
//! `PERFORMER_DIST_REQUIRE_MPI=1` (set by `.ci/run`) makes that a failure.

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use performer_dist::state::{broadcast_module, check_synchronized};
use performer_dist::{Communicator, DataParallel, Error, MpiCommunicator};
use performer_tensor::ndarray::{ArrayD, Dimension, IxDyn};
use performer_tensor::{Module, Param, Tensor, Visitor};

/// Set on the ranks: which scenario to run.
const SCENARIO: &str = "PERFORMER_DIST_TEST_SCENARIO";

/// Starts `mpirun -np ranks` on this binary's `mpi_rank` entry with `scenario`; `None` (after
/// saying why) where there is no mpirun and it is not required. Kills the job after `limit`.
fn run_ranks(ranks: usize, scenario: &str, limit: Duration) -> Option<(Output, Duration)> {
    let Some(mut cmd) = performer_dist::launch::local_mpirun(ranks) else {
        if std::env::var("PERFORMER_DIST_REQUIRE_MPI").as_deref() == Ok("1") {
            panic!("mpirun is not on PATH and PERFORMER_DIST_REQUIRE_MPI=1 (install openmpi-bin)");
        }
        eprintln!("skipped: mpirun is not on PATH (apt-get install openmpi-bin libopenmpi-dev)");
        return None;
    };
    let exe = std::env::current_exe().unwrap();
    cmd.arg(exe)
        .args(["--exact", "mpi_rank", "--nocapture", "--test-threads", "1"])
        .env(SCENARIO, scenario)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let start = Instant::now();
    let child = cmd.spawn().expect("mpirun starts");
    let pid = child.id();
    // A watchdog: a hung job is killed (its whole process group) so the test fails, not hangs.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if rx.recv_timeout(limit).is_err() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
    });
    let out = child.wait_with_output().expect("mpirun runs");
    let _ = tx.send(());
    watchdog.join().unwrap();
    Some((out, start.elapsed()))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn collectives_and_data_parallel_across_two_ranks() {
    let Some((out, _)) = run_ranks(2, "collectives", Duration::from_secs(120)) else {
        return;
    };
    let log = text(&out);
    assert!(out.status.success(), "the ranks failed:\n{log}");
    for rank in 0..2 {
        assert!(
            log.contains(&format!("rank {rank} of 2: collectives ok")),
            "{log}"
        );
    }
}

#[test]
fn a_stalled_rank_makes_the_other_fail_with_a_clear_error_and_ends_the_job() {
    let Some((out, took)) = run_ranks(2, "stall", Duration::from_secs(120)) else {
        return;
    };
    let log = text(&out);
    assert!(!out.status.success(), "the job should fail:\n{log}");
    assert!(
        log.contains("mpi rank 0 of 2: barrier did not complete within 2s"),
        "rank 0 names the collective and the limit:\n{log}"
    );
    assert!(log.contains("aborting the whole job"), "{log}");
    // Rank 1 sleeps 60 s: the job ended long before, by the timeout and the abort.
    assert!(took < Duration::from_secs(40), "took {took:?}:\n{log}");
}

#[test]
fn a_killed_rank_ends_the_job() {
    let Some((out, took)) = run_ranks(2, "killed", Duration::from_secs(120)) else {
        return;
    };
    let log = text(&out);
    assert!(!out.status.success(), "the job should fail:\n{log}");
    assert!(log.contains("rank 1 kills itself"), "{log}");
    assert!(took < Duration::from_secs(40), "took {took:?}:\n{log}");
}

/// The ranks' side: runs the scenario named by the environment, or nothing.
#[test]
fn mpi_rank() {
    let Ok(scenario) = std::env::var(SCENARIO) else {
        return;
    };
    let comm = MpiCommunicator::init().expect("MPI initializes");
    match scenario.as_str() {
        "collectives" => collectives(&comm),
        "stall" => stall(comm.with_timeout(Duration::from_secs(2))),
        "killed" => killed(comm.with_timeout(Duration::from_secs(30))),
        other => panic!("unknown scenario {other}"),
    }
}

/// A module with two parameters and a buffer, values depending on `seed`.
struct Pair {
    a: Param,
    b: Param,
    proj: performer_tensor::Buffer,
}

impl Module for Pair {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.param("a", &self.a);
        v.param("b", &self.b);
        v.buffer("proj", &self.proj);
    }
}

fn pair(seed: f32) -> Pair {
    let fill = |shape: &[usize], k: f32| {
        ArrayD::from_shape_fn(IxDyn(shape), |i| {
            seed + k * i.as_array_view().iter().sum::<usize>() as f32
        })
    };
    Pair {
        a: Param::new(fill(&[3, 4], 0.5)),
        b: Param::new(fill(&[4, 2], -0.25)),
        proj: performer_tensor::Buffer::new(fill(&[5], 1.0)),
    }
}

fn collectives(comm: &MpiCommunicator) {
    let (rank, world) = (comm.rank(), comm.world_size());
    assert_eq!(world, 2);
    let r = rank as f32;

    // all_reduce_mean over buffers that span several default buckets (2^20 floats each).
    let big = performer_dist::DEFAULT_BUCKET_ELEMS + 5;
    let mut a: Vec<f32> = (0..big).map(|i| (i % 7) as f32 + 10.0 * r).collect();
    let mut b = vec![r; 3];
    let mut empty: Vec<f32> = Vec::new();
    comm.all_reduce_mean(&mut [&mut a[..], &mut empty[..], &mut b[..]])
        .unwrap();
    assert!(
        a.iter()
            .enumerate()
            .all(|(i, &v)| v == (i % 7) as f32 + 5.0)
    );
    assert_eq!(b, vec![0.5; 3]);

    // Several sums in flight, completed out of order.
    let p1 = comm.start_all_reduce_sum(vec![1.0 + r; 4]).unwrap();
    let mut p2 = comm.start_all_reduce_sum(vec![r; 2]).unwrap();
    while !p2.test().unwrap() {}
    assert_eq!(p2.wait().unwrap(), vec![1.0; 2]);
    assert_eq!(p1.wait().unwrap(), vec![3.0; 4]);

    // Broadcasts from rank 1, of floats and of bytes of a length only the root knows.
    let mut f = vec![r; 6];
    comm.broadcast(&mut [&mut f[..]], 1).unwrap();
    assert_eq!(f, vec![1.0; 6]);
    let mut bytes = if rank == 0 {
        b"from rank zero".to_vec()
    } else {
        vec![9; 100]
    };
    comm.broadcast_bytes(&mut bytes, 0).unwrap();
    assert_eq!(bytes, b"from rank zero");
    assert!(matches!(
        comm.broadcast(&mut [&mut f[..]], 2),
        Err(Error::Invalid { .. })
    ));

    assert_eq!(
        comm.all_gather_u64(&[rank as u64, 7]).unwrap(),
        vec![0, 7, 1, 7]
    );
    comm.barrier().unwrap();

    // Module state: different on the two ranks, then rank 0's everywhere.
    let m = pair(r);
    let err = check_synchronized(comm, &m).unwrap_err();
    assert!(matches!(err, Error::Desynchronized(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("3 of 3 parameters and buffers differ"),
        "{msg}"
    );
    assert!(
        msg.contains("`proj` (ranks [1] differ from rank 0)"),
        "{msg}"
    );
    broadcast_module(comm, &m, 0).unwrap();
    check_synchronized(comm, &m).unwrap();
    assert_eq!(m.a.value(), pair(0.0).a.value());

    // DataParallel: each rank's loss on its own input; the overlapped backward, the plain
    // backward + reduce, and the hand-computed mean of both ranks' gradients agree.
    let xs: Vec<ArrayD<f32>> = (0..2)
        .map(|k| {
            ArrayD::from_shape_fn(IxDyn(&[5, 3]), |i| {
                ((i[0] * 3 + i[1]) as f32 - 7.0) * (0.1 + k as f32)
            })
        })
        .collect();
    let loss_on = |x: &ArrayD<f32>| -> Tensor {
        Tensor::new(x.clone())
            .matmul(&m.a.tensor())
            .unwrap()
            .tanh()
            .matmul(&m.b.tensor())
            .unwrap()
            .square()
            .mean_all()
    };
    // Buckets of 10 floats: a (12) and b (8) in separate buckets, b's first.
    let mut dp = DataParallel::with_bucket_elems(comm, m.parameters(), 10);
    assert_eq!(dp.buckets(), 2);
    let overlapped = dp.backward(&loss_on(&xs[rank]), None).unwrap();
    let mut plain = loss_on(&xs[rank]).backward().unwrap();
    dp.reduce(&mut plain).unwrap();
    let g0 = loss_on(&xs[0]).backward().unwrap();
    let g1 = loss_on(&xs[1]).backward().unwrap();
    for p in [&m.a, &m.b] {
        let want = (g0.get_param(p).unwrap() + g1.get_param(p).unwrap()) / 2.0;
        let got = overlapped.get_param(p).unwrap();
        let plain = plain.get_param(p).unwrap();
        assert_eq!(want.shape(), got.shape());
        assert_eq!(want.shape(), plain.shape());
        for ((w, g), q) in want.iter().zip(got).zip(plain) {
            assert!((w - g).abs() <= 1e-6 * w.abs().max(1.0), "{w} vs {g}");
            assert_eq!(g, q, "overlapped and plain reductions agree bit for bit");
        }
    }
    // With gradient accumulation: (earlier + this) averaged.
    let earlier = loss_on(&xs[1 - rank]).backward().unwrap();
    let acc = dp.backward(&loss_on(&xs[rank]), Some(earlier)).unwrap();
    for p in [&m.a, &m.b] {
        let want = g0.get_param(p).unwrap() + g1.get_param(p).unwrap();
        let got = acc.get_param(p).unwrap();
        assert_eq!(want.shape(), got.shape());
        for (w, g) in want.iter().zip(got) {
            assert!((w - g).abs() <= 1e-6 * w.abs().max(1.0), "{w} vs {g}");
        }
    }
    let stats = dp.stats();
    assert_eq!((stats.steps, stats.buckets), (3, 6));
    assert!(stats.overlapped_buckets >= 1, "{stats:?}");
    println!("rank {rank} of {world}: collectives ok ({stats:?})");
}

fn stall(comm: MpiCommunicator) {
    if comm.rank() == 1 {
        // Never reaches the barrier in time; MPI_Abort from rank 0 ends this process.
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    let err = comm.barrier().unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }));
    // What a program prints before it drops the communicator, which aborts the job.
    eprintln!("rank 0 error: {err}");
    assert!(
        comm.barrier().is_err(),
        "a failed communicator refuses more work"
    );
    drop(comm);
    unreachable!("dropping a failed communicator aborts the job");
}

fn killed(comm: MpiCommunicator) {
    for step in 0.. {
        if comm.rank() == 1 && step == 20 {
            eprintln!("rank 1 kills itself at step {step}");
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &std::process::id().to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(60));
        }
        let sum = comm.start_all_reduce_sum(vec![1.0; 1000]).unwrap().wait();
        if let Err(e) = sum {
            // The survivor either gets here (after the timeout) or is ended by mpirun first.
            eprintln!("rank {} error: {e}", comm.rank());
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
