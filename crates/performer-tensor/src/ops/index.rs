//! Indexing: index_select / embedding lookups (scatter-add backward), gather, masked_fill and
//! where. Indices and masks are plain ndarray arrays, not tensors.

use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn, Zip};

use super::broadcast::sum_to;
use crate::shape::{broadcast_shapes, normalize_axis};
use crate::{Error, Result, Tensor};

fn check_index(op: &str, index: i64, size: usize) -> Result<usize> {
    if index < 0 || index as u64 >= size as u64 {
        return Err(Error::Index {
            op: op.into(),
            index,
            size,
        });
    }
    Ok(index as usize)
}

impl Tensor {
    /// Entries `indices` of `axis`, in that order (repeats allowed). The backward adds each
    /// output slice's gradient into the slice it came from.
    pub fn index_select(&self, axis: isize, indices: &[i64]) -> Result<Tensor> {
        let ax = normalize_axis("index_select", axis, self.rank())?;
        let size = self.shape()[ax];
        let idx: Vec<usize> = indices
            .iter()
            .map(|&i| check_index("index_select", i, size))
            .collect::<Result<_>>()?;
        on_device!(crate::cuda::select_ops::index_select(self, ax, indices));
        let out = self.view().select(Axis(ax), &idx);
        let in_shape = self.shape().to_vec();
        Ok(Tensor::from_op(
            out,
            "index_select",
            &[self],
            move |g, _| {
                let mut full = ArrayD::<f32>::zeros(IxDyn(&in_shape));
                for (j, &i) in idx.iter().enumerate() {
                    let mut dst = full.index_axis_mut(Axis(ax), i);
                    dst += &g.index_axis(Axis(ax), j);
                }
                Ok(vec![Some(full)])
            },
        ))
    }

    /// Rows of this (num_embeddings, dim) table for each id: the result has shape
    /// `ids.shape ++ [dim]`. An id outside `0..num_embeddings` is an error.
    pub fn embedding(&self, ids: &ArrayViewD<i64>) -> Result<Tensor> {
        if self.rank() != 2 {
            return Err(Error::shape(
                "embedding",
                format!("the table must be 2-D, got {:?}", self.shape()),
            ));
        }
        let num = self.shape()[0];
        for &id in ids.iter() {
            check_index("embedding", id, num)?;
        }
        on_device!(crate::cuda::ops::embedding(self, ids));
        let flat: Vec<i64> = ids.iter().copied().collect();
        let rows = self.index_select(0, &flat)?;
        let mut shape: Vec<isize> = ids.shape().iter().map(|&d| d as isize).collect();
        shape.push(self.shape()[1] as isize);
        rows.reshape(&shape)
    }

    /// PyTorch's `gather`: `out[..., j, ...] = self[..., index[..., j, ...], ...]` along `axis`.
    /// `index` has this tensor's rank and no larger size on any other axis.
    pub fn gather(&self, axis: isize, index: &ArrayViewD<i64>) -> Result<Tensor> {
        let ax = normalize_axis("gather", axis, self.rank())?;
        if index.ndim() != self.rank()
            || index
                .shape()
                .iter()
                .zip(self.shape())
                .enumerate()
                .any(|(i, (&a, &b))| i != ax && a > b)
        {
            return Err(Error::shape(
                "gather",
                format!(
                    "index {:?} does not fit input {:?} along axis {axis}",
                    index.shape(),
                    self.shape()
                ),
            ));
        }
        let size = self.shape()[ax];
        for &i in index.iter() {
            check_index("gather", i, size)?;
        }
        on_device!(crate::cuda::select_ops::gather(self, ax, index));
        let x = self.view();
        let out = ArrayD::from_shape_fn(index.raw_dim(), |mut pos| {
            pos[ax] = index[&pos] as usize;
            x[&pos]
        });
        let in_shape = self.shape().to_vec();
        let index = index.to_owned();
        Ok(Tensor::from_op(out, "gather", &[self], move |g, _| {
            let mut full = ArrayD::<f32>::zeros(IxDyn(&in_shape));
            for (mut pos, &gv) in g.indexed_iter() {
                pos[ax] = index[&pos] as usize;
                full[&pos] += gv;
            }
            Ok(vec![Some(full)])
        }))
    }

    /// `value` where `mask` is true (the mask broadcasts to this tensor's shape).
    pub fn masked_fill(&self, mask: &ArrayViewD<bool>, value: f32) -> Result<Tensor> {
        let m = mask.broadcast(IxDyn(self.shape())).ok_or_else(|| {
            Error::shape(
                "masked_fill",
                format!(
                    "mask {:?} does not broadcast to {:?}",
                    mask.shape(),
                    self.shape()
                ),
            )
        })?;
        on_device!(crate::cuda::select_ops::masked_fill(self, mask, value));
        let out = Zip::from(&self.view())
            .and(&m)
            .map_collect(|&x, &mk| if mk { value } else { x });
        let keep: ArrayD<bool> = m.to_owned();
        Ok(Tensor::from_op(out, "masked_fill", &[self], move |g, _| {
            let mut g = g;
            Zip::from(&mut g).and(&keep).for_each(|g, &mk| {
                if mk {
                    *g = 0.0
                }
            });
            Ok(vec![Some(g)])
        }))
    }

    /// `a` where `cond` is true, else `b`; all three broadcast together.
    pub fn where_cond(cond: &ArrayViewD<bool>, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let ab = broadcast_shapes("where", a.shape(), b.shape())?;
        let shape = broadcast_shapes("where", &ab, cond.shape())?;
        on_device!(crate::cuda::select_ops::where_cond(cond, a, b));
        let (c, av, bv) = (
            cond.broadcast(IxDyn(&shape)).expect("checked"),
            a.data().broadcast(IxDyn(&shape)).expect("checked"),
            b.data().broadcast(IxDyn(&shape)).expect("checked"),
        );
        let out = Zip::from(&c)
            .and(&av)
            .and(&bv)
            .map_collect(|&c, &x, &y| if c { x } else { y });
        let cond = c.to_owned();
        let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
        Ok(Tensor::from_op(out, "where", &[a, b], move |g, needs| {
            let pick = |take: bool| {
                Zip::from(&g)
                    .and(&cond)
                    .map_collect(|&g, &c| if c == take { g } else { 0.0 })
            };
            Ok(vec![
                needs[0].then(|| sum_to(pick(true), &sa)),
                needs[1].then(|| sum_to(pick(false), &sb)),
            ])
        }))
    }
}
