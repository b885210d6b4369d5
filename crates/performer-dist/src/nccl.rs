//! [`NcclCommunicator`]: NVIDIA's collectives between GPUs (NCCL, through cudarc), for
//! gradients that live in device memory.
//!
//! NCCL needs every rank to join one communicator through a shared id: rank 0 creates it and
//! a bootstrap communicator (MPI, under `mpirun`) broadcasts it. The bootstrap also carries the
//! small host-side collectives (bytes, integers, barriers). Reductions run on this rank's CUDA
//! stream and are polled against the bootstrap's deadline (an event query, never a blocking
//! synchronize), so a dead peer gives [`Error::Timeout`]; the NCCL communicator is then
//! aborted (`ncclCommAbort`) when dropped.
//!
//! libcuda and libnccl are loaded at run time: this builds without CUDA, and
//! [`NcclCommunicator::over`] fails with a clear error where either is missing.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};

use crate::communicator::{Communicator, PendingReduce, check_root};
use crate::error::{Error, Result};

/// How long a device collective may take when the bootstrap does not say (5 minutes).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Length of NCCL's unique id, in bytes.
const ID_BYTES: usize = 128;

/// A world of GPUs, one per rank, joined through NCCL.
pub struct NcclCommunicator {
    comm: Comm,
    stream: Arc<CudaStream>,
    bootstrap: Box<dyn Communicator>,
    timeout: Duration,
    failure: RefCell<Option<String>>,
}

fn nccl_err(op: &str, e: impl std::fmt::Debug) -> Error {
    Error::Backend {
        backend: "nccl",
        op: op.into(),
        message: format!("{e:?}"),
    }
}

impl NcclCommunicator {
    /// Joins the ranks of `bootstrap` (e.g. an `MpiCommunicator`) into one NCCL communicator,
    /// on `stream`, or, with `None`, on a new stream of GPU `rank % visible devices`. Every
    /// rank must call it. An error naming what is missing where there is no CUDA driver, no
    /// GPU or no libnccl.
    pub fn over(bootstrap: Box<dyn Communicator>, stream: Option<Arc<CudaStream>>) -> Result<Self> {
        // SAFETY: only tries to dlopen the libraries by their usual names.
        let (driver, nccl) = unsafe {
            (
                cudarc::driver::sys::is_culib_present(),
                cudarc::nccl::sys::is_culib_present(),
            )
        };
        if !driver {
            return Err(nccl_err(
                "initialize",
                "no CUDA driver (libcuda) on this machine; NCCL needs an NVIDIA GPU",
            ));
        }
        if !nccl {
            return Err(nccl_err(
                "initialize",
                "libnccl was not found on the loader's path (install NCCL, e.g. the \
                 nvidia-nccl-cu13 wheel, and add its lib folder to LD_LIBRARY_PATH)",
            ));
        }
        let (rank, world) = (bootstrap.rank(), bootstrap.world_size());
        let stream = match stream {
            Some(s) => s,
            None => {
                let count = CudaContext::device_count()
                    .map_err(|e| nccl_err("initialize: counting GPUs", e))?;
                if count <= 0 {
                    return Err(nccl_err("initialize", "no CUDA device is visible"));
                }
                let ctx = CudaContext::new(rank % count as usize)
                    .map_err(|e| nccl_err("initialize: opening the GPU", e))?;
                ctx.new_stream()
                    .map_err(|e| nccl_err("initialize: creating a stream", e))?
            }
        };
        // Rank 0's id, to everyone (the id's bytes are C chars).
        let mut id_bytes = if rank == 0 {
            let id = Id::new().map_err(|e| nccl_err("initialize: ncclGetUniqueId", e))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        bootstrap.broadcast_bytes(&mut id_bytes, 0)?;
        if id_bytes.len() != ID_BYTES {
            return Err(Error::Desynchronized(format!(
                "the NCCL id from rank 0 has {} bytes, expected {ID_BYTES}",
                id_bytes.len()
            )));
        }
        let mut internal = [0 as std::ffi::c_char; ID_BYTES];
        for (d, &b) in internal.iter_mut().zip(&id_bytes) {
            *d = b as std::ffi::c_char;
        }
        let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(internal))
            .map_err(|e| nccl_err("initialize: ncclCommInitRank", e))?;
        Ok(NcclCommunicator {
            comm,
            stream,
            bootstrap,
            timeout: DEFAULT_TIMEOUT,
            failure: RefCell::new(None),
        })
    }

    /// Sets how long any one device collective may take.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The stream the collectives run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Replaces every device buffer by its element-wise mean across ranks (`ncclAvg`, all
    /// buffers in one NCCL group), and waits for it.
    pub fn all_reduce_mean_device(&self, buffers: &mut [CudaSlice<f32>]) -> Result<()> {
        let n = buffers.len();
        let op = move || format!("all-reduce-mean of {n} device buffers");
        self.check_usable(&op())?;
        {
            let mut group = self.comm.group();
            for b in buffers.iter_mut() {
                group
                    .all_reduce_in_place(b.as_view_mut(), &ReduceOp::Avg)
                    .map_err(|e| self.fail(nccl_err(&op(), e)))?;
            }
        }
        let event = self.record(&op())?;
        self.wait_event(&event, &op)
    }

    fn check_usable(&self, op: &str) -> Result<()> {
        match &*self.failure.borrow() {
            Some(earlier) => Err(nccl_err(
                op,
                format!("refused after an earlier failure ({earlier})"),
            )),
            None => Ok(()),
        }
    }

    fn fail(&self, e: Error) -> Error {
        *self.failure.borrow_mut() = Some(e.to_string());
        e
    }

    fn record(&self, op: &str) -> Result<CudaEvent> {
        self.stream
            .record_event(None)
            .map_err(|e| self.fail(nccl_err(op, e)))
    }

    /// Polls `event` until the work before it is done or the timeout passes.
    fn wait_event(&self, event: &CudaEvent, op: &dyn Fn() -> String) -> Result<()> {
        let start = Instant::now();
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(self.fail(nccl_err(&op(), e))),
            }
            if start.elapsed() >= self.timeout {
                return Err(self.fail(Error::Timeout {
                    backend: "nccl",
                    op: op(),
                    rank: self.rank(),
                    world: self.world_size(),
                    timeout: self.timeout,
                }));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// A host buffer being summed on the device.
struct PendingNccl<'c> {
    owner: &'c NcclCommunicator,
    device: CudaSlice<f32>,
    event: CudaEvent,
}

impl PendingReduce for PendingNccl<'_> {
    fn test(&mut self) -> Result<bool> {
        self.event
            .try_is_complete()
            .map_err(|e| self.owner.fail(nccl_err("all-reduce", e)))
    }

    fn wait(self: Box<Self>) -> Result<Vec<f32>> {
        let n = self.device.len();
        self.owner
            .wait_event(&self.event, &|| format!("all-reduce of {n} floats"))?;
        self.owner
            .stream
            .clone_dtoh(&self.device)
            .map_err(|e| self.owner.fail(nccl_err("all-reduce: copying back", e)))
    }
}

impl Communicator for NcclCommunicator {
    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// Copies `buffer` to the device, sums it there across ranks and copies it back in
    /// [`PendingReduce::wait`] (host gradients through the GPU; device gradients use
    /// [`NcclCommunicator::all_reduce_mean_device`]).
    fn start_all_reduce_sum(&self, buffer: Vec<f32>) -> Result<Box<dyn PendingReduce + '_>> {
        let op = format!("all-reduce of {} floats", buffer.len());
        self.check_usable(&op)?;
        let mut device = self
            .stream
            .clone_htod(&buffer)
            .map_err(|e| self.fail(nccl_err(&op, e)))?;
        self.comm
            .all_reduce_in_place(&mut device, &ReduceOp::Sum)
            .map_err(|e| self.fail(nccl_err(&op, e)))?;
        let event = self.record(&op)?;
        Ok(Box::new(PendingNccl {
            owner: self,
            device,
            event,
        }))
    }

    fn broadcast(&self, buffers: &mut [&mut [f32]], root: usize) -> Result<()> {
        check_root(self, "broadcast", root)?;
        for buffer in buffers.iter_mut() {
            let n = buffer.len();
            let op = move || format!("broadcast of {n} floats from rank {root}");
            self.check_usable(&op())?;
            let mut device = self
                .stream
                .clone_htod(&**buffer)
                .map_err(|e| self.fail(nccl_err(&op(), e)))?;
            self.comm
                .broadcast_in_place(&mut device, root as i32)
                .map_err(|e| self.fail(nccl_err(&op(), e)))?;
            let event = self.record(&op())?;
            self.wait_event(&event, &op)?;
            let host = self
                .stream
                .clone_dtoh(&device)
                .map_err(|e| self.fail(nccl_err(&op(), e)))?;
            buffer.copy_from_slice(&host);
        }
        Ok(())
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        self.bootstrap.broadcast_bytes(bytes, root)
    }

    fn all_gather_u64(&self, values: &[u64]) -> Result<Vec<u64>> {
        self.bootstrap.all_gather_u64(values)
    }

    fn barrier(&self) -> Result<()> {
        self.bootstrap.barrier()
    }
}
