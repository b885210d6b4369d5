//! Where each parameter's gradient sits in the flat buffers (buckets) that are all-reduced.

use std::collections::HashMap;

use performer_tensor::{Param, TensorId};

/// One bucket: a run of parameters, their gradients back to back, then one presence flag per
/// parameter (1 where the rank has a gradient for it, summed across ranks like the rest, so a
/// parameter that got a gradient on any rank gets one on all).
#[derive(Clone, Debug)]
pub(crate) struct Bucket {
    /// Indices into the plan's parameters, in the order laid out.
    pub params: Vec<usize>,
    /// Gradient elements (the flags follow them).
    pub grad_len: usize,
}

impl Bucket {
    /// Length of the buffer: gradients and flags.
    pub fn len(&self) -> usize {
        self.grad_len + self.params.len()
    }
}

/// Where one parameter's gradient goes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Slot {
    pub bucket: usize,
    pub offset: usize,
    pub len: usize,
    /// Index of its presence flag in the bucket's buffer.
    pub flag: usize,
}

/// Parameters grouped into buckets of about `cap` gradient elements, in the reverse of their
/// registration order: the backward of a model finishes its last layers' gradients first, so
/// the first bucket is the first complete and can be reduced while the backward goes on.
#[derive(Clone, Debug)]
pub(crate) struct BucketPlan {
    pub params: Vec<Param>,
    pub buckets: Vec<Bucket>,
    /// Slot of each parameter, by its index in `params`.
    pub slots: Vec<Slot>,
    /// Index in `params` of each parameter's id.
    pub index_of: HashMap<TensorId, usize>,
}

impl BucketPlan {
    /// The plan for `params` (a parameter listed twice is kept once). A parameter larger than
    /// `cap` gets a bucket of its own; `cap` is at least 1.
    pub fn new(params: Vec<Param>, cap: usize) -> Self {
        let cap = cap.max(1);
        let mut unique: Vec<Param> = Vec::new();
        for p in params {
            if !unique.iter().any(|q| q.same_as(&p)) {
                unique.push(p);
            }
        }
        let mut buckets: Vec<Bucket> = Vec::new();
        let mut current = Bucket {
            params: Vec::new(),
            grad_len: 0,
        };
        for index in (0..unique.len()).rev() {
            let n = unique[index].numel();
            if !current.params.is_empty() && current.grad_len + n > cap {
                buckets.push(std::mem::replace(
                    &mut current,
                    Bucket {
                        params: Vec::new(),
                        grad_len: 0,
                    },
                ));
            }
            current.params.push(index);
            current.grad_len += n;
        }
        if !current.params.is_empty() {
            buckets.push(current);
        }
        let mut slots = vec![
            Slot {
                bucket: 0,
                offset: 0,
                len: 0,
                flag: 0
            };
            unique.len()
        ];
        for (b, bucket) in buckets.iter().enumerate() {
            let mut offset = 0;
            for (k, &index) in bucket.params.iter().enumerate() {
                let len = unique[index].numel();
                slots[index] = Slot {
                    bucket: b,
                    offset,
                    len,
                    flag: bucket.grad_len + k,
                };
                offset += len;
            }
        }
        let index_of = unique
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id(), i))
            .collect();
        BucketPlan {
            params: unique,
            buckets,
            slots,
            index_of,
        }
    }

    /// Floats reduced per step (gradients and flags).
    pub fn elems(&self) -> usize {
        self.buckets.iter().map(Bucket::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use performer_tensor::ndarray::{ArrayD, IxDyn};

    fn p(n: usize) -> Param {
        Param::new(ArrayD::<f32>::zeros(IxDyn(&[n])))
    }

    #[test]
    fn buckets_run_backwards_and_close_at_the_cap() {
        let params = vec![p(3), p(5), p(2), p(9), p(1)];
        let plan = BucketPlan::new(params.clone(), 6);
        let groups: Vec<Vec<usize>> = plan.buckets.iter().map(|b| b.params.clone()).collect();
        // Reverse order: [4, 3] would be 10 > 6, so 4 alone, then 3 (9, over the cap, alone),
        // then 2 + 1 = 7 > 6 splits too, then 1 + 0 = 8 > 6.
        assert_eq!(groups, vec![vec![4], vec![3], vec![2], vec![1], vec![0]]);
        let plan = BucketPlan::new(params.clone(), 10);
        let groups: Vec<Vec<usize>> = plan.buckets.iter().map(|b| b.params.clone()).collect();
        assert_eq!(groups, vec![vec![4, 3], vec![2, 1, 0]]);
        let s = plan.slots[plan.index_of[&params[1].id()]];
        // Bucket 1 holds 2 (2 floats), 1 (5), 0 (3), then three flags.
        assert_eq!((s.bucket, s.offset, s.len, s.flag), (1, 2, 5, 11));
        assert_eq!(plan.elems(), (10 + 2) + (10 + 3));
        // A parameter listed twice (tied weights) is laid out once.
        let twice = BucketPlan::new(vec![params[0].clone(), params[0].clone()], 10);
        assert_eq!(twice.params.len(), 1);
    }
}
