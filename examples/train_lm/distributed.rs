//! `train_lm --distributed mpi`: what data-parallel training changes in the run (everything
//! else is the single-process code path).
//!
//! - The ranks join through `performer::dist::connect`; rank 0's model, optimizer and trainer
//!   state are copied to every rank at the start (from rank 0's checkpoint on `--resume`: the
//!   others need no copy of it), and every rank must read the same data.
//! - Every rank draws the same global batch (`--batch-size` per rank times the ranks) from the
//!   shared sampler and trains on its own contiguous share of it, so a run on N ranks sees
//!   exactly the sequences one process with N times the batch sees; the gradients are
//!   averaged in buckets overlapped with the backward of the last micro-batch.
//! - Before every step the projections' redraw generator is seeded from the seed and the step
//!   (the same on all ranks) and the global generator (dropout) from the seed, the step and the
//!   rank; both are stateless, so a resumed run draws what an uninterrupted one would have,
//!   on any number of ranks.
//! - Validation windows are split over the ranks and their losses summed; rank 0 alone prints,
//!   samples and writes checkpoints (the others' standard output goes to /dev/null); the ranks
//!   compare fingerprints of their whole state at every validation.
//!
//! Without `--distributed` none of this runs: one process, the global generator's stream, as
//! before.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ndarray::Array2;
use performer::AutoregressiveWrapper;
use performer::dist::seed::{Stream, derive_seed, shard};
use performer::dist::state::{broadcast_module, broadcast_tensors, check_synchronized};
use performer::dist::{Backend, CommStats, Communicator, DataParallel};
use performer::tensor::optim::{Adam, Optimizer};
use performer::tensor::rng::{self, Generator};
use performer::tensor::team::{on_pool, on_warm_pool};
use performer::tensor::{Gradients, Param, Tensor};

use super::{Res, TRAINER_JSON, TrainerState, sibling};

/// Joins the world `--distributed` names (one process without it); on ranks other than 0,
/// standard output goes to /dev/null from here on.
pub fn connect(backend: Option<&str>, timeout_s: f64) -> Res<Box<dyn Communicator>> {
    let Some(name) = backend else {
        return Ok(Box::new(performer::dist::SingleProcess));
    };
    let backend: Backend = name.parse()?;
    if !performer::dist::compiled_in(backend) {
        return Err(format!(
            "--distributed {name}: this train_lm was built without the `{name}` feature \
             (cargo build --release --example train_lm --features {name})"
        )
        .into());
    }
    if !(timeout_s > 0.0 && timeout_s.is_finite()) {
        return Err(
            format!("--dist-timeout {timeout_s}: must be a positive number of seconds").into(),
        );
    }
    let comm = performer::dist::connect(backend, Some(Duration::from_secs_f64(timeout_s)))?;
    if comm.rank() != 0 {
        silence_stdout();
    }
    Ok(comm)
}

/// Rayon threads for one rank when `--threads 0`: the cores shared among the ranks on this
/// machine, at least one.
pub fn default_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / local_ranks().unwrap_or(1).max(1)).max(1)
}

/// How many ranks run on this machine, where the launcher says (`mpirun` tells each rank).
fn local_ranks() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
        "PMI_LOCAL_SIZE",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse::<usize>().ok())
}

fn silence_stdout() {
    let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") else {
        return;
    };
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // SAFETY: dup2 onto the standard output descriptor of this process, from a file that is
    // open for the duration of the call; nothing holds a raw copy of the old descriptor.
    unsafe {
        libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), libc::STDOUT_FILENO);
    }
}

/// A rank's view of the run (see the module docs).
pub struct Dist<'c> {
    comm: &'c dyn Communicator,
    /// `--distributed` was given (even on one rank): seeds are per step, not one stream.
    enabled: bool,
    seed: u64,
    timeout_s: f64,
    dp: Option<DataParallel<'c>>,
    /// Hidden testing hook: `(rank, step, "kill" | "stall")`.
    failure: Option<(usize, u64, String)>,
}

impl<'c> Dist<'c> {
    /// `enabled` where `--distributed` was given, `timeout_s` its `--dist-timeout`; `failure`
    /// is `--inject-rank-failure`.
    pub fn new(
        comm: &'c dyn Communicator,
        enabled: bool,
        timeout_s: f64,
        failure: Option<&str>,
    ) -> Res<Self> {
        let failure = match failure {
            None => None,
            Some(spec) => {
                let parts: Vec<&str> = spec.split(':').collect();
                match parts[..] {
                    [rank, step, how @ ("kill" | "stall")] => {
                        Some((rank.parse()?, step.parse()?, how.to_string()))
                    }
                    _ => {
                        return Err(
                            format!("--inject-rank-failure {spec}: RANK:STEP:kill|stall").into(),
                        );
                    }
                }
            }
        };
        Ok(Dist {
            comm,
            enabled,
            seed: 0,
            timeout_s,
            dp: None,
            failure,
        })
    }

    /// Whether this rank prints and writes checkpoints.
    pub fn is_root(&self) -> bool {
        self.comm.is_root()
    }

    /// Number of ranks.
    pub fn ranks(&self) -> usize {
        self.comm.world_size()
    }

    /// Runs a step's work `f` on a rayon worker (`on_pool`), with the pool's other workers
    /// kept awake (`on_warm_pool`) where this is the only rank on the machine: ranks that share
    /// the cores would take each other's time with their spinning workers.
    pub fn on_step_pool<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match self.ranks() == 1 || local_ranks() == Some(1) {
            true => on_warm_pool(f),
            false => on_pool(f),
        }
    }

    /// The checkpoint directory to read on this rank: `dir` on rank 0, which sends the files
    /// to the others; they read the copy it sent them (a folder of their own, removed with
    /// [`Dist::forget_copy`]), so only rank 0's machine needs the checkpoint.
    pub fn checkpoint_copy(&self, dir: &Path) -> Res<PathBuf> {
        if self.ranks() == 1 {
            return Ok(dir.to_path_buf());
        }
        // A first byte of 0 and the files, or of 1 and rank 0's error (so that the others
        // stop at once rather than time out).
        let mut bundle = Vec::new();
        let mut failure = None;
        if self.is_root() {
            // The folder load_checkpoint reads: `dir`, or the copy an interrupted save left.
            let old = sibling(dir, "old");
            let src = if !dir.exists() && old.join(TRAINER_JSON).is_file() {
                old
            } else {
                dir.to_path_buf()
            };
            bundle = match pack_files(&src) {
                Ok(files) => [vec![0], files].concat(),
                Err(e) => {
                    let message = e.to_string();
                    failure = Some(e);
                    [vec![1], message.into_bytes()].concat()
                }
            };
        }
        self.comm.broadcast_bytes(&mut bundle, 0)?;
        if let Some(e) = failure {
            return Err(e);
        }
        if self.is_root() {
            return Ok(dir.to_path_buf());
        }
        let files = match bundle.split_first() {
            Some((0, files)) => files,
            Some((_, message)) => {
                return Err(format!(
                    "rank 0 could not read the checkpoint: {}",
                    String::from_utf8_lossy(message)
                )
                .into());
            }
            None => return Err("rank 0 sent an empty checkpoint".into()),
        };
        let copy = std::env::temp_dir().join(format!(
            "train_lm_resume_rank{}_{}",
            self.comm.rank(),
            std::process::id()
        ));
        unpack_files(files, &copy)?;
        Ok(copy)
    }

    /// Removes the copy [`Dist::checkpoint_copy`] made on this rank (nothing on rank 0).
    pub fn forget_copy(&self, dir: &Path, copy: &Path) {
        if copy != dir {
            let _ = std::fs::remove_dir_all(copy);
        }
    }

    /// The global batch's share of `global` sequences each rank trains on; an error where
    /// the ranks cannot share it equally (a checkpoint resumed on another number of ranks).
    pub fn per_rank_batch(&self, global: usize) -> Res<usize> {
        let mine = shard(global, self.comm.rank(), self.ranks()).map_err(|e| {
            format!(
                "a global batch of {global} sequences (--batch-size times the ranks, saved in \
                 the checkpoint) cannot be split over {} ranks: {e}",
                self.ranks()
            )
        })?;
        Ok(mine.len())
    }

    /// Checks that every rank read the same data (by its fingerprint).
    pub fn check_same_data(&self, fnv1a: &str) -> Res<()> {
        let mine = u64::from_str_radix(fnv1a, 16).unwrap_or(0);
        let all = self.comm.all_gather_u64(&[mine])?;
        if let Some(r) = all.iter().position(|&h| h != all[0]) {
            return Err(format!(
                "rank {r} read other data than rank 0 (fnv1a {:016x} vs {:016x}); every rank \
                 must see the same --data",
                all[r], all[0]
            )
            .into());
        }
        Ok(())
    }

    /// Makes every rank start from rank 0's model, optimizer state and trainer state, and
    /// sets up the gradient averaging of `params` in buckets of `bucket_mb` MiB.
    pub fn start(
        &mut self,
        model: &AutoregressiveWrapper,
        opt: &mut Adam,
        state: &mut TrainerState,
        params: Vec<Param>,
        bucket_mb: f64,
    ) -> Res<()> {
        self.seed = state.settings.seed;
        if self.ranks() > 1 {
            broadcast_module(self.comm, &model.net, 0)?;
            let mut opt_state = opt.state_dict();
            broadcast_tensors(self.comm, &mut opt_state, 0)?;
            if !self.is_root() {
                opt.load_state_dict(&opt_state)?;
            }
            let mut json = serde_json::to_vec(state)?;
            self.comm.broadcast_bytes(&mut json, 0)?;
            *state = serde_json::from_slice(&json)?;
            check_synchronized(self.comm, &model.net)?;
        }
        if !(bucket_mb > 0.0 && bucket_mb.is_finite()) {
            return Err(format!("--bucket-mb {bucket_mb}: must be positive").into());
        }
        let elems = (bucket_mb * (1 << 20) as f64 / 4.0) as usize;
        self.dp = Some(DataParallel::with_bucket_elems(self.comm, params, elems));
        Ok(())
    }

    /// One line about the ranks and the gradient buckets (none in one process).
    pub fn describe(&self, per_rank: usize) -> Option<String> {
        let dp = self.dp.as_ref().filter(|_| self.enabled)?;
        Some(format!(
            "ranks: {} ({}) x {per_rank} sequences per micro-batch; gradients averaged in {} \
             bucket(s), {:.2} MB per step; collectives time out after {}s",
            self.ranks(),
            self.comm.backend(),
            dp.buckets(),
            dp.elems_per_step() as f64 * 4.0 / 1e6,
            self.timeout_s
        ))
    }

    /// Before step `step`'s forward passes: the redraw generator shared by all ranks and this
    /// rank's dropout stream, both seeded from the run's seed and the step. Also fires the
    /// testing hook.
    pub fn begin_step(&self, model: &AutoregressiveWrapper, step: u64) {
        if let Some((rank, at, how)) = &self.failure
            && *rank == self.comm.rank()
            && *at == step
        {
            eprintln!("train_lm: rank {rank}: --inject-rank-failure: {how} at step {step}");
            if how == "kill" {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &std::process::id().to_string()])
                    .status();
            }
            std::thread::sleep(Duration::from_secs(3600));
        }
        if !self.enabled {
            return;
        }
        model
            .net
            .set_redraw_generator(Some(Generator::seeded(derive_seed(
                self.seed,
                Stream::Redraw { step },
            ))));
        rng::manual_seed(derive_seed(
            self.seed,
            Stream::Dropout {
                step,
                rank: self.comm.rank(),
            },
        ));
    }

    /// This rank's rows of a global batch (all of them in one process).
    pub fn my_rows(&self, global: Array2<i64>) -> Res<Array2<i64>> {
        if self.ranks() == 1 {
            return Ok(global);
        }
        let mine = shard(global.nrows(), self.comm.rank(), self.ranks())?;
        Ok(global.slice(ndarray::s![mine, ..]).to_owned())
    }

    /// The backward of one micro-batch, added to `accumulated`; at the last micro-batch of a
    /// step the sum is averaged across ranks (in buckets, during the backward).
    pub fn backward(
        &mut self,
        loss: &Tensor,
        accumulated: Option<Gradients>,
        last: bool,
    ) -> Res<Gradients> {
        // One process has nothing to average: its backward takes the plain path below, on the
        // pool (before, it went through `DataParallel::backward`'s single-rank shortcut on this
        // thread: the default run made 2-6% fewer tokens/s in alternating 250-step runs).
        let averaging = last && self.ranks() > 1;
        match self.dp.as_mut().filter(|_| averaging) {
            Some(dp) => Ok(dp.backward(loss, accumulated)?),
            None => {
                // On a rayon worker, like the forward (`on_step_pool`); the data-parallel
                // branch above stays on this thread, the only one MPI may be called from.
                let g = self.on_step_pool(|| loss.backward())?;
                Ok(match accumulated {
                    Some(mut acc) => {
                        acc.merge(g)?;
                        acc
                    }
                    None => g,
                })
            }
        }
    }

    /// The step's loss averaged over the ranks, and whether any rank was interrupted (so that
    /// all stop after the same step).
    pub fn agree(&self, loss: f64, interrupted: bool) -> Res<(f64, bool)> {
        if self.ranks() == 1 {
            return Ok((loss, interrupted));
        }
        let mut v = [loss as f32, if interrupted { 1.0 } else { 0.0 }];
        self.comm.all_reduce_mean(&mut [&mut v[..]])?;
        Ok((v[0] as f64, v[1] > 0.0))
    }

    /// Mean bits per byte over `offsets`, each rank scoring a contiguous share of them with
    /// `score` (which returns the mean over the offsets it is given).
    pub fn evaluate(&self, offsets: &[usize], score: impl Fn(&[usize]) -> Res<f64>) -> Res<f64> {
        if self.ranks() == 1 {
            return score(offsets);
        }
        let (n, world, rank) = (offsets.len(), self.ranks(), self.comm.rank());
        let mine = &offsets[n * rank / world..n * (rank + 1) / world];
        let total = if mine.is_empty() {
            0.0
        } else {
            score(mine)? * mine.len() as f64
        };
        let mut v = [total as f32];
        self.comm.all_reduce_mean(&mut [&mut v[..]])?;
        Ok(v[0] as f64 * world as f64 / n as f64)
    }

    /// Checks that all ranks hold the same weights, buffers and projections.
    pub fn check_synchronized(&self, model: &AutoregressiveWrapper) -> Res<()> {
        if self.ranks() > 1 {
            check_synchronized(self.comm, &model.net)?;
        }
        Ok(())
    }

    /// The gradient averaging's statistics (`None` in one process).
    pub fn stats(&self) -> Option<&CommStats> {
        self.dp
            .as_ref()
            .filter(|_| self.ranks() > 1)
            .map(|dp| dp.stats())
    }
}

/// The regular files of `dir` (not its plot), as `name \0 length(8 bytes) bytes` records.
fn pack_files(dir: &Path) -> Res<Vec<u8>> {
    let mut out = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".svg"))
        .collect();
    names.sort();
    for name in names {
        let bytes =
            std::fs::read(dir.join(&name)).map_err(|e| format!("{}/{name}: {e}", dir.display()))?;
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

/// Writes the files of a [`pack_files`] bundle into a fresh `dir`.
fn unpack_files(mut bundle: &[u8], dir: &Path) -> Res<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    while !bundle.is_empty() {
        let end = bundle
            .iter()
            .position(|&b| b == 0)
            .ok_or("a checkpoint copy without a file name")?;
        let name = String::from_utf8_lossy(&bundle[..end]).into_owned();
        if name.contains('/') || name.starts_with('.') {
            return Err(format!("a checkpoint copy with the file name {name:?}").into());
        }
        let rest = &bundle[end + 1..];
        let len = rest.get(..8).ok_or("a truncated checkpoint copy")?;
        let len = u64::from_le_bytes(len.try_into()?) as usize;
        let data = rest.get(8..8 + len).ok_or("a truncated checkpoint copy")?;
        std::fs::write(dir.join(&name), data)?;
        bundle = &rest[8 + len..];
    }
    Ok(())
}
