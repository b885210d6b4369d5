//! [`MpiCommunicator`]: the collectives of an MPI library (OpenMPI, MPICH) through rsmpi, for
//! processes started by `mpirun` on one machine or many.
//!
//! Every collective is started non-blocking (`MPI_Iallreduce`, `MPI_Ibcast`, ...) and then
//! polled with `MPI_Test` against a deadline, so a rank whose peer died or stalled gets
//! [`Error::Timeout`] instead of waiting forever inside MPI. A collective that has begun cannot
//! be withdrawn, so after a timeout the communicator refuses further work and aborts the whole
//! job (`MPI_Abort`, which makes `mpirun` end every rank) when it is dropped, after the caller
//! has had the chance to report the error.

use std::cell::RefCell;
use std::os::raw::{c_int, c_void};
use std::time::{Duration, Instant};

use mpi::environment::Universe;
use mpi::ffi;
use mpi::raw::AsRaw;
use mpi::topology::{Communicator as _, SimpleCommunicator};

use crate::communicator::{Communicator, PendingReduce, check_root};
use crate::error::{Error, Result};

/// How long a collective may take before [`Error::Timeout`] (5 minutes): far above any step,
/// checkpoint or validation pause of a healthy run, short enough that a dead job frees its
/// machines.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Largest element count of one MPI call (its counts are C ints); longer buffers go in pieces.
const MAX_COUNT: usize = 1 << 30;

/// The world of an MPI job (`MPI_COMM_WORLD`). MPI is initialized by
/// [`MpiCommunicator::init`] and finalized when this is dropped; only the thread that created
/// it may use it (MPI is initialized for one communicating thread; rayon's workers never call
/// MPI).
pub struct MpiCommunicator {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    timeout: Duration,
    /// Set when a collective failed or timed out: the job cannot go on.
    failure: RefCell<Option<String>>,
    /// Dropped last: finalizes MPI.
    _universe: Universe,
}

impl MpiCommunicator {
    /// Initializes MPI and joins the job's world. Run under `mpirun -np N`, the processes form
    /// a world of N ranks; started on its own, a process is a world of one. An error if MPI was
    /// initialized before in this process (it can be only once).
    pub fn init() -> Result<Self> {
        let (universe, _threading) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| Error::Backend {
                backend: "mpi",
                op: "initialize".into(),
                message: "MPI was already initialized in this process (it can be only once)".into(),
            })?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(MpiCommunicator {
            world,
            rank,
            size,
            timeout: DEFAULT_TIMEOUT,
            failure: RefCell::new(None),
            _universe: universe,
        })
    }

    /// Sets how long any one collective may take ([`DEFAULT_TIMEOUT`] unless set).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The collectives' time limit.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The MPI library's own description (e.g. `Open MPI v4.1.4, ...`).
    pub fn library_version() -> String {
        mpi::environment::library_version().unwrap_or_else(|_| "unknown MPI library".into())
    }

    /// Ends every rank of the job now (`MPI_Abort`) after printing why.
    pub fn abort(&self, why: &str) -> ! {
        eprintln!(
            "performer-dist: mpi rank {} of {}: {why}; aborting the whole job",
            self.rank, self.size
        );
        self.world.abort(1)
    }

    fn check_usable(&self, op: &str) -> Result<()> {
        match &*self.failure.borrow() {
            Some(earlier) => Err(Error::Backend {
                backend: "mpi",
                op: op.into(),
                message: format!("refused after an earlier failure ({earlier})"),
            }),
            None => Ok(()),
        }
    }

    fn fail(&self, e: Error) -> Error {
        *self.failure.borrow_mut() = Some(e.to_string());
        e
    }

    fn check_rc(&self, rc: c_int, op: &str) -> Result<()> {
        if rc == 0 {
            Ok(())
        } else {
            Err(self.fail(Error::Backend {
                backend: "mpi",
                op: op.into(),
                message: format!("the MPI call returned error code {rc}"),
            }))
        }
    }

    /// One `MPI_Test`: whether `request` has completed (it is then `MPI_REQUEST_NULL`).
    fn test_request(
        &self,
        request: &mut ffi::MPI_Request,
        op: &dyn Fn() -> String,
    ) -> Result<bool> {
        let mut flag: c_int = 0;
        // SAFETY: `request` is a request this communicator started (or MPI_REQUEST_NULL after
        // completion, which MPI_Test accepts); `flag` is a valid int to write; the status is
        // ignored through MPI's own sentinel.
        let rc = unsafe { ffi::MPI_Test(request, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
        if rc != 0 {
            self.check_rc(rc, &op())?;
        }
        Ok(flag != 0)
    }

    /// Polls `request` until it completes or the timeout passes. Yields the core between
    /// polls, then sleeps in growing steps (up to 1 ms), so a rank that waits for a slower one
    /// does not take the core that rank needs.
    fn wait_request(&self, request: &mut ffi::MPI_Request, op: &dyn Fn() -> String) -> Result<()> {
        let start = Instant::now();
        let mut polls = 0u32;
        loop {
            if self.test_request(request, op)? {
                return Ok(());
            }
            let waited = start.elapsed();
            if waited >= self.timeout {
                return Err(self.fail(Error::Timeout {
                    backend: "mpi",
                    op: op(),
                    rank: self.rank,
                    world: self.size,
                    timeout: self.timeout,
                }));
            }
            polls += 1;
            if polls < 200 {
                std::thread::yield_now();
            } else {
                let step = Duration::from_micros(20 * u64::from(polls - 199).min(50));
                std::thread::sleep(step);
            }
        }
    }

    /// Starts a non-blocking collective on `buffers` through `start` (which passes their
    /// heap addresses to MPI and fills in the request) and waits for it; the buffers come
    /// back once MPI is done with them. Where it never completes they are leaked, not freed:
    /// MPI may still write into them, and the process is going to be aborted anyway.
    fn run_owned<B>(
        &self,
        op: &dyn Fn() -> String,
        mut buffers: B,
        start: impl FnOnce(&mut B, &mut ffi::MPI_Request) -> c_int,
    ) -> Result<B> {
        self.check_usable(&op())?;
        // SAFETY: reading MPI's predefined null-request constant.
        let mut request = unsafe { ffi::RSMPI_REQUEST_NULL };
        let rc = start(&mut buffers, &mut request);
        self.check_rc(rc, &op())?;
        match self.wait_request(&mut request, op) {
            Ok(()) => Ok(buffers),
            Err(e) => {
                std::mem::forget(buffers);
                Err(e)
            }
        }
    }

    fn comm_raw(&self) -> ffi::MPI_Comm {
        self.world.as_raw()
    }

    /// Broadcasts `data` (at most [`MAX_COUNT`] elements of `datatype`, which must match `T`).
    fn broadcast_vec<T>(
        &self,
        data: Vec<T>,
        datatype: ffi::MPI_Datatype,
        root: usize,
        what: &str,
    ) -> Result<Vec<T>> {
        let count = data.len();
        let op = || format!("broadcast of {count} {what} from rank {root}");
        self.run_owned(&op, data, |data, request| {
            // SAFETY: `data` is a heap buffer of `count <= MAX_COUNT` elements of `datatype`,
            // kept alive (or leaked) by `run_owned` until the request completes.
            unsafe {
                ffi::MPI_Ibcast(
                    data.as_mut_ptr() as *mut c_void,
                    count as c_int,
                    datatype,
                    root as c_int,
                    self.comm_raw(),
                    request,
                )
            }
        })
    }
}

impl Drop for MpiCommunicator {
    fn drop(&mut self) {
        let failure = self.failure.borrow().clone();
        if let Some(why) = failure {
            // Other ranks may be inside the collective that failed here; finalizing would wait
            // for them forever. MPI_Abort ends the whole job.
            self.abort(&format!("after a failed collective ({why})"));
        }
    }
}

/// An all-reduce in flight: MPI writes into `recv` until the request completes, so the buffers
/// live here, on the heap, until then.
struct PendingMpi<'c> {
    comm: &'c MpiCommunicator,
    send: Vec<f32>,
    recv: Vec<f32>,
    request: ffi::MPI_Request,
    done: bool,
}

impl PendingMpi<'_> {
    fn describe(&self) -> String {
        format!("all-reduce of {} floats", self.send.len())
    }
}

impl PendingReduce for PendingMpi<'_> {
    fn test(&mut self) -> Result<bool> {
        if !self.done {
            let n = self.send.len();
            let what = move || format!("all-reduce of {n} floats");
            self.done = self.comm.test_request(&mut self.request, &what)?;
        }
        Ok(self.done)
    }

    fn wait(mut self: Box<Self>) -> Result<Vec<f32>> {
        if !self.done {
            let what = self.describe();
            // On an error `self` drops here, unfinished: `Drop` leaks the buffers.
            self.comm
                .wait_request(&mut self.request, &|| what.clone())?;
            self.done = true;
        }
        Ok(std::mem::take(&mut self.recv))
    }
}

impl Drop for PendingMpi<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // MPI may still read `send` and write `recv`: they must not be freed before the
        // request completes. Where it does not, they are leaked; the communicator is marked
        // failed and aborts the job when dropped.
        let what = self.describe();
        if self
            .comm
            .wait_request(&mut self.request, &|| what.clone())
            .is_err()
        {
            std::mem::forget(std::mem::take(&mut self.send));
            std::mem::forget(std::mem::take(&mut self.recv));
        }
    }
}

impl Communicator for MpiCommunicator {
    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn start_all_reduce_sum(&self, buffer: Vec<f32>) -> Result<Box<dyn PendingReduce + '_>> {
        let op = format!("all-reduce of {} floats", buffer.len());
        self.check_usable(&op)?;
        if buffer.len() > MAX_COUNT {
            return Err(Error::invalid(
                "MpiCommunicator::start_all_reduce_sum",
                format!(
                    "a buffer of {} floats is longer than one MPI call takes ({MAX_COUNT}); \
                     split it",
                    buffer.len()
                ),
            ));
        }
        let mut pending = Box::new(PendingMpi {
            comm: self,
            recv: vec![0.0; buffer.len()],
            send: buffer,
            // SAFETY: reading MPI's predefined null-request constant.
            request: unsafe { ffi::RSMPI_REQUEST_NULL },
            done: false,
        });
        let p = &mut *pending;
        // SAFETY: `send` and `recv` are heap buffers of `len` floats owned by `pending`, which
        // does not free them before the request completed (`wait` and `Drop` wait for it, and
        // leak them where it never completes). Their addresses do not move with the box.
        let rc = unsafe {
            ffi::MPI_Iallreduce(
                p.send.as_ptr() as *const c_void,
                p.recv.as_mut_ptr() as *mut c_void,
                p.send.len() as c_int,
                ffi::RSMPI_FLOAT,
                ffi::RSMPI_SUM,
                self.comm_raw(),
                &mut p.request,
            )
        };
        if rc != 0 {
            p.done = true; // nothing was started
            return Err(self.check_rc(rc, &op).unwrap_err());
        }
        Ok(pending)
    }

    fn broadcast(&self, buffers: &mut [&mut [f32]], root: usize) -> Result<()> {
        check_root(self, "broadcast", root)?;
        for buffer in buffers.iter_mut() {
            for piece in buffer.chunks_mut(MAX_COUNT) {
                // SAFETY: reading MPI's predefined datatype handle.
                let float = unsafe { ffi::RSMPI_FLOAT };
                let got = self.broadcast_vec(piece.to_vec(), float, root, "floats")?;
                piece.copy_from_slice(&got);
            }
        }
        Ok(())
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        check_root(self, "broadcast_bytes", root)?;
        // SAFETY: reading MPI's predefined datatype handles.
        let (word, byte) = unsafe { (ffi::RSMPI_UINT64_T, ffi::RSMPI_UINT8_T) };
        let len = self.broadcast_vec(vec![bytes.len() as u64], word, root, "lengths")?[0];
        let len = usize::try_from(len).map_err(|_| {
            Error::invalid(
                "broadcast_bytes",
                format!("{len} bytes do not fit in memory"),
            )
        })?;
        bytes.resize(len, 0);
        for piece in bytes.chunks_mut(MAX_COUNT) {
            let got = self.broadcast_vec(piece.to_vec(), byte, root, "bytes")?;
            piece.copy_from_slice(&got);
        }
        Ok(())
    }

    fn all_gather_u64(&self, values: &[u64]) -> Result<Vec<u64>> {
        if values.len() > MAX_COUNT / self.size.max(1) {
            return Err(Error::invalid(
                "MpiCommunicator::all_gather_u64",
                format!(
                    "{} values per rank are more than one MPI call takes",
                    values.len()
                ),
            ));
        }
        // First the lengths: gathering different lengths would read past the shorter buffers.
        let lens = self.gather_raw(&[values.len() as u64])?;
        if let Some(r) = lens.iter().position(|&l| l != values.len() as u64) {
            return Err(Error::Desynchronized(format!(
                "all_gather_u64: rank {r} passed {} values, rank {} passed {}",
                lens[r],
                self.rank,
                values.len()
            )));
        }
        self.gather_raw(values)
    }

    fn barrier(&self) -> Result<()> {
        self.run_owned(&|| "barrier".to_string(), (), |_, request| {
            // SAFETY: a barrier moves no data; `request` is a valid place for the handle.
            unsafe { ffi::MPI_Ibarrier(self.comm_raw(), request) }
        })
    }
}

impl MpiCommunicator {
    fn gather_raw(&self, values: &[u64]) -> Result<Vec<u64>> {
        let n = values.len();
        let buffers = (values.to_vec(), vec![0u64; n * self.size]);
        let (_, out) = self.run_owned(
            &|| format!("all-gather of {n} integers"),
            buffers,
            |(send, recv), request| {
                // SAFETY: `send` holds `n` u64s and `recv` room for `n` from each rank, heap
                // buffers kept alive (or leaked) by `run_owned` until the request completes;
                // `n * size <= MAX_COUNT` was checked by the caller.
                unsafe {
                    ffi::MPI_Iallgather(
                        send.as_ptr() as *const c_void,
                        n as c_int,
                        ffi::RSMPI_UINT64_T,
                        recv.as_mut_ptr() as *mut c_void,
                        n as c_int,
                        ffi::RSMPI_UINT64_T,
                        self.comm_raw(),
                        request,
                    )
                }
            },
        )?;
        Ok(out)
    }
}
