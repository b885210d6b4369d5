//! [`DataParallel`]: gradients averaged across ranks in buckets, reduced while the backward
//! is still running.

use std::time::{Duration, Instant};

use performer_tensor::ndarray::{ArrayD, IxDyn};
use performer_tensor::{Gradients, Param, Tensor, TensorId};

use crate::bucket::BucketPlan;
use crate::communicator::{Communicator, DEFAULT_BUCKET_ELEMS, PendingReduce};
use crate::error::{Error, Result};

/// Where the time of the gradient reductions went, summed over the steps since the last
/// [`DataParallel::reset_stats`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CommStats {
    /// Steps reduced.
    pub steps: u64,
    /// Buckets reduced (all steps).
    pub buckets: u64,
    /// Of those, buckets started while the backward was still running.
    pub overlapped_buckets: u64,
    /// Floats summed across ranks (all steps; gradients and presence flags).
    pub elems: u64,
    /// Time the backward spent in the reduction's hooks (copying finished gradients into
    /// buckets, starting reductions, letting the library progress).
    pub in_backward: Duration,
    /// Time from the end of the backward until every bucket was reduced and unpacked: the
    /// communication the backward could not hide.
    pub exposed: Duration,
}

impl CommStats {
    /// Time the step spent on communication beyond the backward's own work.
    pub fn total(&self) -> Duration {
        self.in_backward + self.exposed
    }
}

/// Data-parallel gradient averaging for a fixed list of parameters.
///
/// Each rank runs the model on its own share of the batch; [`DataParallel::backward`] then
/// leaves every rank with the mean of all ranks' gradients, as one process would get from the
/// whole batch (each rank's loss being a mean over an equal share). The gradients are packed
/// into a few flat buckets of about `bucket_elems` floats (one collective per bucket, not per
/// parameter), laid out in the reverse of the parameters' order, which is about the order the
/// backward finishes them; a bucket is sent off as soon as its gradients are final, while the
/// backward goes on with earlier layers.
///
/// With a one-rank communicator nothing is packed or copied: `backward` is `loss.backward()`.
pub struct DataParallel<'c> {
    comm: &'c dyn Communicator,
    plan: BucketPlan,
    stats: CommStats,
}

impl<'c> DataParallel<'c> {
    /// Averages the gradients of `params` across `comm`'s ranks in buckets of
    /// [`DEFAULT_BUCKET_ELEMS`] floats.
    pub fn new(comm: &'c dyn Communicator, params: Vec<Param>) -> Self {
        Self::with_bucket_elems(comm, params, DEFAULT_BUCKET_ELEMS)
    }

    /// As [`DataParallel::new`] with buckets of about `bucket_elems` floats (a parameter larger
    /// than that gets a bucket of its own; 0 counts as 1).
    pub fn with_bucket_elems(
        comm: &'c dyn Communicator,
        params: Vec<Param>,
        bucket_elems: usize,
    ) -> Self {
        DataParallel {
            comm,
            plan: BucketPlan::new(params, bucket_elems),
            stats: CommStats::default(),
        }
    }

    /// The communicator.
    pub fn communicator(&self) -> &'c dyn Communicator {
        self.comm
    }

    /// Number of buckets (collectives per step).
    pub fn buckets(&self) -> usize {
        self.plan.buckets.len()
    }

    /// Floats summed across ranks per step: every gradient plus a flag per parameter.
    pub fn elems_per_step(&self) -> usize {
        self.plan.elems()
    }

    /// The statistics so far.
    pub fn stats(&self) -> &CommStats {
        &self.stats
    }

    /// Clears the statistics.
    pub fn reset_stats(&mut self) {
        self.stats = CommStats::default();
    }

    /// Differentiates `loss` and returns the gradients averaged across ranks; `accumulated`
    /// (the summed gradients of this step's earlier micro-batches, if any) is added before the
    /// average, so with gradient accumulation only the last micro-batch needs this call. Every
    /// rank must call it for the same step. Gradients of tensors other than the parameters are
    /// returned as this rank computed them.
    pub fn backward(&mut self, loss: &Tensor, accumulated: Option<Gradients>) -> Result<Gradients> {
        if self.comm.world_size() == 1 {
            let mut grads = loss.backward()?;
            if let Some(mut acc) = accumulated {
                // `acc + grads`, in the order plain accumulation adds them.
                acc.merge(grads)?;
                grads = acc;
            }
            return Ok(grads);
        }
        let mut reduction = Reduction::new(&self.plan, self.comm, accumulated.as_ref());
        let mut failure: Option<Error> = None;
        let mut hook_time = Duration::ZERO;
        let result = loss.backward_with_hook(&mut |id, g| {
            let t0 = Instant::now();
            let r = reduction.on_ready(id, g);
            hook_time += t0.elapsed();
            r.map_err(|e| {
                let message = e.to_string();
                failure = Some(e);
                performer_tensor::Error::Other(format!("gradient all-reduce: {message}"))
            })
        });
        let mut grads = match (result, failure) {
            (_, Some(e)) => return Err(e),
            (Err(e), None) => return Err(e.into()),
            (Ok(g), None) => g,
        };
        let overlapped = reduction.launched;
        let t0 = Instant::now();
        reduction.finish(&mut grads)?;
        self.stats.exposed += t0.elapsed();
        self.stats.in_backward += hook_time;
        self.stats.overlapped_buckets += overlapped as u64;
        self.count_step();
        if let Some(acc) = accumulated {
            // What the buckets did not carry: gradients of tensors other than the parameters.
            for (id, g) in acc.iter() {
                if !self.plan.index_of.contains_key(id) {
                    grads.accumulate(*id, g.clone())?;
                }
            }
        }
        Ok(grads)
    }

    /// Averages the parameters' gradients in `grads` across ranks (after a plain backward), in
    /// the same buckets as [`DataParallel::backward`] but without overlap.
    pub fn reduce(&mut self, grads: &mut Gradients) -> Result<()> {
        if self.comm.world_size() == 1 {
            return Ok(());
        }
        let t0 = Instant::now();
        let mut reduction = Reduction::new(&self.plan, self.comm, None);
        for (index, p) in self.plan.params.iter().enumerate() {
            reduction.fill(index, grads.get_id(p.id()))?;
        }
        reduction.finish(grads)?;
        self.stats.exposed += t0.elapsed();
        self.count_step();
        Ok(())
    }

    fn count_step(&mut self) {
        self.stats.steps += 1;
        self.stats.buckets += self.plan.buckets.len() as u64;
        self.stats.elems += self.plan.elems() as u64;
    }
}

/// One step's reduction: buckets filled as gradients become final, started in bucket order.
struct Reduction<'a> {
    plan: &'a BucketPlan,
    comm: &'a dyn Communicator,
    accumulated: Option<&'a Gradients>,
    /// The buffer of each bucket not yet started.
    buffers: Vec<Option<Vec<f32>>>,
    /// Parameters still to be filled in, per bucket.
    remaining: Vec<usize>,
    filled: Vec<bool>,
    /// Buckets `0..launched` have been started.
    launched: usize,
    pending: Vec<Box<dyn PendingReduce + 'a>>,
}

impl<'a> Reduction<'a> {
    fn new(
        plan: &'a BucketPlan,
        comm: &'a dyn Communicator,
        accumulated: Option<&'a Gradients>,
    ) -> Self {
        Reduction {
            plan,
            comm,
            accumulated,
            buffers: vec![None; plan.buckets.len()],
            remaining: plan.buckets.iter().map(|b| b.params.len()).collect(),
            filled: vec![false; plan.params.len()],
            launched: 0,
            pending: Vec::new(),
        }
    }

    /// The backward's hook: a leaf's gradient is final.
    fn on_ready(&mut self, id: TensorId, grad: &ArrayD<f32>) -> Result<()> {
        if let Some(&index) = self.plan.index_of.get(&id) {
            self.fill(index, Some(grad))?;
        }
        // Every hook call lets the library move the buckets in flight along.
        for p in &mut self.pending {
            p.test()?;
        }
        Ok(())
    }

    /// Copies parameter `index`'s gradient (plus its accumulated part) into its bucket and
    /// starts every bucket whose turn has come and whose gradients are all in.
    fn fill(&mut self, index: usize, grad: Option<&ArrayD<f32>>) -> Result<()> {
        if self.filled[index] {
            return Ok(());
        }
        let slot = self.plan.slots[index];
        let param = &self.plan.params[index];
        let earlier = self.accumulated.and_then(|a| a.get_id(param.id()));
        for g in [grad, earlier].into_iter().flatten() {
            if g.len() != slot.len {
                return Err(Error::Tensor(performer_tensor::Error::shape(
                    "DataParallel::backward",
                    format!(
                        "a gradient of shape {:?} for a parameter of shape {:?}",
                        g.shape(),
                        param.shape()
                    ),
                )));
            }
        }
        let bucket = &self.plan.buckets[slot.bucket];
        let buffer = self.buffers[slot.bucket].get_or_insert_with(|| vec![0.0; bucket.len()]);
        let dst = &mut buffer[slot.offset..slot.offset + slot.len];
        match (grad, earlier) {
            (Some(g), Some(e)) => {
                // `earlier + g`, the order in which plain accumulation adds them.
                for ((d, &e), &g) in dst.iter_mut().zip(e.iter()).zip(g.iter()) {
                    *d = e + g;
                }
            }
            (Some(g), None) | (None, Some(g)) => {
                for (d, &g) in dst.iter_mut().zip(g.iter()) {
                    *d = g;
                }
            }
            (None, None) => {}
        }
        if grad.is_some() || earlier.is_some() {
            buffer[slot.flag] = 1.0;
        }
        self.filled[index] = true;
        self.remaining[slot.bucket] -= 1;
        self.launch_ready()
    }

    /// Starts buckets in order while the next one is complete. Every rank starts them in the
    /// same order whatever order its backward finished them in, so the collectives match.
    fn launch_ready(&mut self) -> Result<()> {
        while self.launched < self.plan.buckets.len() && self.remaining[self.launched] == 0 {
            let bucket = self.launched;
            let buffer = self.buffers[bucket]
                .take()
                .unwrap_or_else(|| vec![0.0; self.plan.buckets[bucket].len()]);
            self.pending.push(self.comm.start_all_reduce_sum(buffer)?);
            self.launched += 1;
        }
        Ok(())
    }

    /// Fills in the parameters the backward did not reach, starts the rest of the buckets,
    /// waits for all of them and writes the averages into `grads`.
    fn finish(mut self, grads: &mut Gradients) -> Result<()> {
        for index in 0..self.plan.params.len() {
            self.fill(index, None)?;
        }
        let scale = self.comm.world_size() as f32;
        let pending = std::mem::take(&mut self.pending);
        for (b, p) in pending.into_iter().enumerate() {
            let sum = p.wait()?;
            let bucket = &self.plan.buckets[b];
            if sum.len() != bucket.len() {
                return Err(Error::Desynchronized(format!(
                    "a reduced bucket came back with {} floats, {} were sent",
                    sum.len(),
                    bucket.len()
                )));
            }
            for &index in &bucket.params {
                let slot = self.plan.slots[index];
                let param = &self.plan.params[index];
                grads.remove(param.id());
                if sum[slot.flag] > 0.0 {
                    let mean: Vec<f32> = sum[slot.offset..slot.offset + slot.len]
                        .iter()
                        .map(|s| s / scale)
                        .collect();
                    let g = ArrayD::from_shape_vec(IxDyn(&param.shape()), mean).map_err(|e| {
                        performer_tensor::Error::shape("DataParallel", e.to_string())
                    })?;
                    grads.accumulate(param.id(), g)?;
                }
            }
        }
        Ok(())
    }
}
