//! Shape and layout ops: reshape, permute, transpose, narrow, squeeze, broadcast, cat, stack,
//! chunk, split and pad. Views share the data wherever the strides allow.

use ndarray::{ArrayD, Axis, IxDyn, Slice};

use super::arrays::{reshape_array, to_standard, write_rows};
use super::broadcast::sum_to;
use crate::shape::{normalize_axis, numel};
use crate::{Error, Result, Tensor};

impl Tensor {
    /// A tensor with the same elements in row-major order and a new shape. One entry may be
    /// -1 (inferred). Shares the data when the layout allows.
    pub fn reshape(&self, shape: &[isize]) -> Result<Tensor> {
        let target = infer_shape(self.shape(), shape)?;
        on_device!(crate::cuda::ops::reshape(self, &target));
        let in_shape = self.shape().to_vec();
        let data = match self.data().clone().into_shape_with_order(IxDyn(&target)) {
            Ok(view) => view,
            Err(_) => to_standard(&self.view())
                .into_shape_with_order(IxDyn(&target))
                .expect("element count checked")
                .into_shared(),
        };
        Ok(Tensor::from_op(data, "reshape", &[self], move |g, _| {
            Ok(vec![Some(reshape_array(g, &in_shape))])
        }))
    }

    /// Flattens axes `start..=end` into one.
    pub fn flatten(&self, start: isize, end: isize) -> Result<Tensor> {
        let r = self.rank();
        let (s, e) = (
            normalize_axis("flatten", start, r)?,
            normalize_axis("flatten", end, r)?,
        );
        if s > e {
            return Err(Error::invalid(
                "flatten",
                "start",
                start,
                format!("must not come after end {end}"),
            ));
        }
        let mut shape: Vec<isize> = self.shape()[..s].iter().map(|&d| d as isize).collect();
        shape.push(self.shape()[s..=e].iter().product::<usize>() as isize);
        shape.extend(self.shape()[e + 1..].iter().map(|&d| d as isize));
        self.reshape(&shape)
    }

    /// Reorders the axes (a view).
    pub fn permute(&self, axes: &[isize]) -> Result<Tensor> {
        let r = self.rank();
        if axes.len() != r {
            return Err(Error::invalid(
                "permute",
                "axes",
                format!("{axes:?}"),
                format!("needs {r} axes"),
            ));
        }
        let mut perm = Vec::with_capacity(r);
        for &a in axes {
            let n = normalize_axis("permute", a, r)?;
            if perm.contains(&n) {
                return Err(Error::invalid(
                    "permute",
                    "axes",
                    format!("{axes:?}"),
                    "an axis appears twice",
                ));
            }
            perm.push(n);
        }
        on_device!(crate::cuda::ops::permute(self, &perm));
        let data = self.data().clone().permuted_axes(IxDyn(&perm));
        let mut inverse = vec![0; r];
        for (i, &p) in perm.iter().enumerate() {
            inverse[p] = i;
        }
        Ok(Tensor::from_op(data, "permute", &[self], move |g, _| {
            Ok(vec![Some(g.permuted_axes(IxDyn(&inverse)))])
        }))
    }

    /// Swaps two axes (a view).
    pub fn transpose(&self, a: isize, b: isize) -> Result<Tensor> {
        let r = self.rank();
        let (a, b) = (
            normalize_axis("transpose", a, r)?,
            normalize_axis("transpose", b, r)?,
        );
        let mut perm: Vec<isize> = (0..r as isize).collect();
        perm.swap(a, b);
        self.permute(&perm)
    }

    /// `len` entries of `axis` starting at `start` (a view).
    pub fn narrow(&self, axis: isize, start: usize, len: usize) -> Result<Tensor> {
        let ax = normalize_axis("narrow", axis, self.rank())?;
        let size = self.shape()[ax];
        if start.checked_add(len).is_none_or(|end| end > size) {
            let end = start.saturating_add(len);
            return Err(Error::Index {
                op: "narrow".into(),
                index: i64::try_from(end).unwrap_or(i64::MAX),
                size,
            });
        }
        on_device!(crate::cuda::shape_ops::narrow(self, ax, start, len));
        let mut data = self.data().clone();
        data.slice_axis_inplace(Axis(ax), Slice::from(start..start + len));
        // Its gradient goes into the slice of the input's gradient, in place (the engine's
        // `run_slice_backward`).
        let slice = crate::tensor::SliceOfInput { axis: ax, start };
        Ok(Tensor::from_slice_op(data, "narrow", self, slice))
    }

    /// Entry `index` of `axis`, with that axis removed (a view).
    pub fn select(&self, axis: isize, index: usize) -> Result<Tensor> {
        let ax = normalize_axis("select", axis, self.rank())?;
        let size = self.shape()[ax];
        if index >= size {
            return Err(Error::Index {
                op: "select".into(),
                index: i64::try_from(index).unwrap_or(i64::MAX),
                size,
            });
        }
        self.narrow(axis, index, 1)?.squeeze(axis)
    }

    /// Inserts an axis of size 1 at `axis` (`-1` appends).
    pub fn unsqueeze(&self, axis: isize) -> Result<Tensor> {
        let ax = normalize_axis("unsqueeze", axis, self.rank() + 1)?;
        let mut shape: Vec<isize> = self.shape().iter().map(|&d| d as isize).collect();
        shape.insert(ax, 1);
        self.reshape(&shape)
    }

    /// Removes `axis`, which must have size 1.
    pub fn squeeze(&self, axis: isize) -> Result<Tensor> {
        let ax = normalize_axis("squeeze", axis, self.rank())?;
        if self.shape()[ax] != 1 {
            return Err(Error::shape(
                "squeeze",
                format!("axis {axis} of {:?} is not of size 1", self.shape()),
            ));
        }
        let mut shape: Vec<isize> = self.shape().iter().map(|&d| d as isize).collect();
        shape.remove(ax);
        self.reshape(&shape)
    }

    /// Broadcasts to `shape` (a view with zero strides; the gradient is summed back).
    pub fn broadcast_to(&self, shape: &[usize]) -> Result<Tensor> {
        on_device!(crate::cuda::shape_ops::broadcast_to(self, shape));
        let data = self.data().broadcast(IxDyn(shape)).ok_or_else(|| {
            Error::shape(
                "broadcast_to",
                format!("{:?} does not broadcast to {:?}", self.shape(), shape),
            )
        })?;
        let data = data.to_owned();
        let in_shape = self.shape().to_vec();
        Ok(Tensor::from_op(
            data,
            "broadcast_to",
            &[self],
            move |g, _| Ok(vec![Some(sum_to(g, &in_shape))]),
        ))
    }

    /// A copy in row-major (C) order; a no-op view if already contiguous.
    pub fn contiguous(&self) -> Tensor {
        on_device!(crate::cuda::shape_ops::contiguous(self));
        if self.data().is_standard_layout() {
            return self.clone();
        }
        let data = to_standard(&self.view());
        Tensor::from_op(data, "contiguous", &[self], |g, _| Ok(vec![Some(g)]))
    }

    /// Pads `axis` with `before` and `after` entries of `value`.
    pub fn pad(&self, axis: isize, before: usize, after: usize, value: f32) -> Result<Tensor> {
        let ax = normalize_axis("pad", axis, self.rank())?;
        let mut shape = self.shape().to_vec();
        let len = shape[ax];
        let padded = before.checked_add(after).and_then(|p| p.checked_add(len));
        let fits = padded.is_some_and(|p| {
            shape
                .iter()
                .enumerate()
                .try_fold(1usize, |acc, (i, &d)| {
                    acc.checked_mul(if i == ax { p } else { d })
                })
                .is_some_and(|n| n <= isize::MAX as usize / std::mem::size_of::<f32>())
        });
        let Some(padded) = padded.filter(|_| fits) else {
            return Err(Error::invalid(
                "pad",
                "before + after",
                format!("{before} + {after}"),
                format!(
                    "the padded shape of {:?} along axis {axis} overflows memory",
                    self.shape()
                ),
            ));
        };
        on_device!(crate::cuda::shape_ops::pad(self, ax, before, after, value));
        shape[ax] = padded;
        let mut out = ArrayD::from_elem(IxDyn(&shape), value);
        out.slice_axis_mut(Axis(ax), Slice::from(before..before + len))
            .assign(&self.view());
        Ok(Tensor::from_op(out, "pad", &[self], move |g, _| {
            Ok(vec![Some(
                g.slice_axis(Axis(ax), Slice::from(before..before + len))
                    .to_owned(),
            )])
        }))
    }

    /// Splits `axis` into pieces of `size` entries (the last may be shorter), as views.
    pub fn split(&self, size: usize, axis: isize) -> Result<Vec<Tensor>> {
        let ax = normalize_axis("split", axis, self.rank())?;
        if size == 0 {
            return Err(Error::invalid("split", "size", 0, "must be positive"));
        }
        let len = self.shape()[ax];
        (0..len)
            .step_by(size)
            .map(|s| self.narrow(ax as isize, s, size.min(len - s)))
            .collect()
    }

    /// Splits `axis` into pieces of the given sizes, which must add up to its length.
    pub fn split_sizes(&self, sizes: &[usize], axis: isize) -> Result<Vec<Tensor>> {
        let ax = normalize_axis("split_sizes", axis, self.rank())?;
        let len = self.shape()[ax];
        if sizes.iter().try_fold(0usize, |acc, &s| acc.checked_add(s)) != Some(len) {
            return Err(Error::invalid(
                "split_sizes",
                "sizes",
                format!("{sizes:?}"),
                format!("must add up to {len}"),
            ));
        }
        let mut start = 0;
        let mut out = Vec::with_capacity(sizes.len());
        for &s in sizes {
            out.push(self.narrow(ax as isize, start, s)?);
            start += s;
        }
        Ok(out)
    }

    /// Splits `axis` into `chunks` pieces as PyTorch's `chunk` does: pieces of
    /// `ceil(len / chunks)` entries, so there may be fewer than `chunks` pieces.
    pub fn chunk(&self, chunks: usize, axis: isize) -> Result<Vec<Tensor>> {
        let ax = normalize_axis("chunk", axis, self.rank())?;
        if chunks == 0 {
            return Err(Error::invalid("chunk", "chunks", 0, "must be positive"));
        }
        let len = self.shape()[ax];
        if len == 0 {
            return Ok(vec![self.clone()]);
        }
        self.split(len.div_ceil(chunks), axis)
    }

    /// Concatenates tensors along `axis`; all other sizes must agree.
    pub fn cat(tensors: &[Tensor], axis: isize) -> Result<Tensor> {
        let first = tensors
            .first()
            .ok_or_else(|| Error::invalid("cat", "tensors", "[]", "needs at least one tensor"))?;
        let ax = normalize_axis("cat", axis, first.rank())?;
        for t in tensors {
            let same_rank = t.rank() == first.rank();
            if !same_rank
                || t.shape()
                    .iter()
                    .enumerate()
                    .any(|(i, &d)| i != ax && d != first.shape()[i])
            {
                return Err(Error::shape(
                    "cat",
                    format!(
                        "{:?} and {:?} differ outside axis {axis}",
                        first.shape(),
                        t.shape()
                    ),
                ));
            }
        }
        on_device!(crate::cuda::shape_ops::cat(tensors, ax));
        // Each piece is written row by row into its slice of the result (ndarray's
        // `concatenate` walked a dynamic-rank index per element).
        let mut out_shape = first.shape().to_vec();
        out_shape[ax] = tensors.iter().map(|t| t.shape()[ax]).sum();
        let mut out = crate::alloc::uninit_array(&out_shape);
        let mut start = 0;
        for t in tensors {
            let len = t.shape()[ax];
            if len > 0 {
                let piece = out.slice_axis_mut(Axis(ax), Slice::from(start..start + len));
                write_rows(piece, &t.view());
            }
            start += len;
        }
        // SAFETY: the pieces cover axis `ax` of `out` from 0 to its length, and `write_rows`
        // wrote every element of each.
        let out = unsafe { crate::alloc::assume_init(out) };
        let sizes: Vec<usize> = tensors.iter().map(|t| t.shape()[ax]).collect();
        let refs: Vec<&Tensor> = tensors.iter().collect();
        Ok(Tensor::from_op(out, "cat", &refs, move |g, needs| {
            let mut start = 0;
            let mut grads = Vec::with_capacity(sizes.len());
            for (&s, &need) in sizes.iter().zip(needs) {
                grads.push(need.then(|| {
                    g.slice_axis(Axis(ax), Slice::from(start..start + s))
                        .to_owned()
                }));
                start += s;
            }
            Ok(grads)
        }))
    }

    /// Stacks tensors of one shape along a new axis.
    pub fn stack(tensors: &[Tensor], axis: isize) -> Result<Tensor> {
        let first = tensors
            .first()
            .ok_or_else(|| Error::invalid("stack", "tensors", "[]", "needs at least one tensor"))?;
        let ax = normalize_axis("stack", axis, first.rank() + 1)?;
        let expanded = tensors.iter().map(|t| {
            if t.shape() != first.shape() {
                return Err(Error::shape(
                    "stack",
                    format!("{:?} and {:?} differ", first.shape(), t.shape()),
                ));
            }
            t.unsqueeze(ax as isize)
        });
        let expanded: Vec<Tensor> = expanded.collect::<Result<_>>()?;
        Tensor::cat(&expanded, ax as isize)
    }
}

/// Resolves a target shape with at most one -1 against an element count.
fn infer_shape(current: &[usize], target: &[isize]) -> Result<Vec<usize>> {
    let total = numel(current);
    let bad = || {
        Error::shape(
            "reshape",
            format!("cannot view {current:?} ({total} elements) as {target:?}"),
        )
    };
    let mut inferred = None;
    let mut known = 1usize;
    for (i, &d) in target.iter().enumerate() {
        match d {
            -1 if inferred.is_none() => inferred = Some(i),
            d if d >= 0 => known = known.checked_mul(d as usize).ok_or_else(bad)?,
            _ => return Err(bad()),
        }
    }
    let mut out: Vec<usize> = target.iter().map(|&d| d.max(0) as usize).collect();
    if let Some(i) = inferred {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(bad());
        }
        out[i] = total / known;
    } else if known != total {
        return Err(bad());
    }
    Ok(out)
}
