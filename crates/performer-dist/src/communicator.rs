//! The [`Communicator`] trait every back end implements, and [`SingleProcess`], the default:
//! one rank, where every collective is the identity.

use crate::error::{Error, Result};

/// Elements per flat buffer that [`Communicator::all_reduce_mean`] packs the caller's buffers
/// into (4 MiB of f32): big enough that a call's fixed cost is small beside its transfer,
/// small enough to pipeline several.
pub const DEFAULT_BUCKET_ELEMS: usize = 1 << 20;

/// A group of processes (ranks) that run the same program on different data and combine
/// results with collectives. Every rank must call the same collectives in the same order with
/// buffers of the same lengths; a collective that a rank never reaches fails on the others
/// with [`Error::Timeout`] once the back end's timeout has passed, never hangs.
pub trait Communicator {
    /// The back end's name: `"single"`, `"mpi"` or `"nccl"`.
    fn backend(&self) -> &'static str;

    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn world_size(&self) -> usize;

    /// Whether this is rank 0 (the one that writes checkpoints and prints).
    fn is_root(&self) -> bool {
        self.rank() == 0
    }

    /// Starts summing `buffer` element-wise across ranks and returns at once; the sum comes
    /// back from [`PendingReduce::wait`]. Several may be in flight; they complete in the order
    /// they were started on every rank. Data-parallel training starts one per gradient bucket
    /// while the backward is still running.
    fn start_all_reduce_sum(&self, buffer: Vec<f32>) -> Result<Box<dyn PendingReduce + '_>>;

    /// Replaces every buffer by its element-wise mean across ranks. The buffers are packed
    /// into flat buckets of [`DEFAULT_BUCKET_ELEMS`] (one collective per bucket, not per
    /// buffer), all started before the first is waited for.
    fn all_reduce_mean(&self, buffers: &mut [&mut [f32]]) -> Result<()> {
        let lens: Vec<usize> = buffers.iter().map(|b| b.len()).collect();
        let mut pending = Vec::new();
        for bucket in pack_ranges(&lens, DEFAULT_BUCKET_ELEMS) {
            let mut flat = Vec::with_capacity(bucket.iter().map(|p| p.len).sum());
            for piece in &bucket {
                flat.extend_from_slice(
                    &buffers[piece.buffer][piece.start..piece.start + piece.len],
                );
            }
            pending.push((bucket, self.start_all_reduce_sum(flat)?));
        }
        let scale = 1.0 / self.world_size() as f32;
        for (bucket, p) in pending {
            let sum = p.wait()?;
            let mut at = 0;
            for piece in bucket {
                let dst = &mut buffers[piece.buffer][piece.start..piece.start + piece.len];
                for (d, s) in dst.iter_mut().zip(&sum[at..at + piece.len]) {
                    *d = s * scale;
                }
                at += piece.len;
            }
        }
        Ok(())
    }

    /// Copies every buffer of rank `root` into the same buffer of every other rank (lengths
    /// must agree).
    fn broadcast(&self, buffers: &mut [&mut [f32]], root: usize) -> Result<()>;

    /// Copies rank `root`'s bytes to every rank; the others' `bytes` are resized to fit.
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()>;

    /// Every rank's `values`, rank 0's first; all ranks must pass the same number of values
    /// (else [`Error::Desynchronized`]).
    fn all_gather_u64(&self, values: &[u64]) -> Result<Vec<u64>>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
}

/// A reduction in flight ([`Communicator::start_all_reduce_sum`]). Dropping one that has not
/// completed waits for it (the library still writes into its buffer).
pub trait PendingReduce {
    /// Lets the library make progress and tells whether the sum is ready; never blocks.
    fn test(&mut self) -> Result<bool>;

    /// Waits for the sum (at most the back end's timeout) and returns it.
    fn wait(self: Box<Self>) -> Result<Vec<f32>>;
}

/// An error unless `root` is a rank of `comm`.
pub fn check_root(comm: &(impl Communicator + ?Sized), op: &str, root: usize) -> Result<()> {
    if root >= comm.world_size() {
        return Err(Error::invalid(
            op,
            format!(
                "root rank {root} is out of range: the world has {} ranks",
                comm.world_size()
            ),
        ));
    }
    Ok(())
}

/// A piece of one of the caller's buffers inside a packed bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub buffer: usize,
    pub start: usize,
    pub len: usize,
}

/// Packs buffers of the given lengths, in order, into buckets of at most `cap` elements
/// (a longer buffer is split across buckets).
pub(crate) fn pack_ranges(lens: &[usize], cap: usize) -> Vec<Vec<Piece>> {
    let cap = cap.max(1);
    let mut buckets = Vec::new();
    let mut current: Vec<Piece> = Vec::new();
    let mut used = 0;
    for (buffer, &len) in lens.iter().enumerate() {
        let mut start = 0;
        while start < len {
            let take = (len - start).min(cap - used);
            current.push(Piece {
                buffer,
                start,
                len: take,
            });
            used += take;
            start += take;
            if used == cap {
                buckets.push(std::mem::take(&mut current));
                used = 0;
            }
        }
    }
    if !current.is_empty() {
        buckets.push(current);
    }
    buckets
}

/// The default communicator: a world of one rank. Every collective leaves its data as it is,
/// so code written for data parallelism runs unchanged (and unslowed) in one process.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

/// A sum over one rank: the buffer itself.
struct Ready(Vec<f32>);

impl PendingReduce for Ready {
    fn test(&mut self) -> Result<bool> {
        Ok(true)
    }

    fn wait(self: Box<Self>) -> Result<Vec<f32>> {
        Ok(self.0)
    }
}

impl Communicator for SingleProcess {
    fn backend(&self) -> &'static str {
        "single"
    }

    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn start_all_reduce_sum(&self, buffer: Vec<f32>) -> Result<Box<dyn PendingReduce + '_>> {
        Ok(Box::new(Ready(buffer)))
    }

    fn all_reduce_mean(&self, _buffers: &mut [&mut [f32]]) -> Result<()> {
        Ok(())
    }

    fn broadcast(&self, _buffers: &mut [&mut [f32]], root: usize) -> Result<()> {
        check_root(self, "broadcast", root)
    }

    fn broadcast_bytes(&self, _bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        check_root(self, "broadcast_bytes", root)
    }

    fn all_gather_u64(&self, values: &[u64]) -> Result<Vec<u64>> {
        Ok(values.to_vec())
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_keeps_order_splits_long_buffers_and_respects_the_cap() {
        let buckets = pack_ranges(&[3, 0, 7, 2], 4);
        let flat: Vec<(usize, usize, usize)> = buckets
            .iter()
            .flatten()
            .map(|p| (p.buffer, p.start, p.len))
            .collect();
        assert_eq!(
            flat,
            vec![(0, 0, 3), (2, 0, 1), (2, 1, 4), (2, 5, 2), (3, 0, 2)]
        );
        for b in &buckets {
            assert!(b.iter().map(|p| p.len).sum::<usize>() <= 4);
        }
        assert_eq!(buckets.len(), 3);
        assert!(pack_ranges(&[], 4).is_empty());
    }

    #[test]
    fn a_single_process_keeps_its_data_and_checks_roots() {
        let comm = SingleProcess;
        let mut a = vec![1.0f32, 2.0];
        comm.all_reduce_mean(&mut [&mut a[..]]).unwrap();
        assert_eq!(a, vec![1.0, 2.0]);
        assert_eq!(comm.all_gather_u64(&[5, 6]).unwrap(), vec![5, 6]);
        let err = comm.broadcast(&mut [&mut a[..]], 1).unwrap_err();
        assert!(
            err.to_string().contains("root rank 1 is out of range"),
            "{err}"
        );
        let sum = comm
            .start_all_reduce_sum(vec![3.0])
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(sum, vec![3.0]);
    }
}
