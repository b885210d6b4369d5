//! Trainable parameters and non-trainable buffers.
//!
//! A [`Param`] is a cheap handle (modules that share weights share the handle) with a stable
//! [`TensorId`]: every [`Param::tensor`] call returns a leaf with that id, so the gradients of
//! all its uses in a graph add up under one key. Optimizers replace its value in place.

use std::sync::{Arc, Mutex, RwLock};

use ndarray::{ArrayD, IxDyn};

use crate::tensor::{Data, TensorId};
use crate::{Error, Result, Tensor};

struct ParamInner {
    id: TensorId,
    value: RwLock<Data>,
    /// The contiguous transpose of a 2-D value ([`Param::transposed`]), made on first use and
    /// dropped whenever the value changes. Locked only while `value`'s lock is held (read to
    /// fill it, write to clear it), so it can never outlive the value it was made from.
    transposed: Mutex<Option<Data>>,
}

/// A trainable f32 tensor.
#[derive(Clone)]
pub struct Param(Arc<ParamInner>);

impl Param {
    /// A parameter with the given initial value.
    pub fn new(value: impl Into<Data>) -> Self {
        Param(Arc::new(ParamInner {
            id: TensorId::fresh(),
            value: RwLock::new(value.into()),
            transposed: Mutex::new(None),
        }))
    }

    /// The stable id its gradients are stored under.
    pub fn id(&self) -> TensorId {
        self.0.id
    }

    /// The current value as a leaf tensor (ops record it only while gradients are enabled).
    pub fn tensor(&self) -> Tensor {
        Tensor::leaf_with_id(self.0.id, self.value())
    }

    /// The current value (shared, no copy).
    pub fn value(&self) -> Data {
        self.0
            .value
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The shape.
    pub fn shape(&self) -> Vec<usize> {
        self.value().shape().to_vec()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.value().len()
    }

    /// Replaces the value; the shape must stay the same.
    pub fn set(&self, value: impl Into<Data>) -> Result<()> {
        let value = value.into();
        let mut slot = self.0.value.write().unwrap_or_else(|e| e.into_inner());
        if slot.shape() != value.shape() {
            return Err(Error::shape(
                "Param::set",
                format!(
                    "parameter {:?}, new value {:?}",
                    slot.shape(),
                    value.shape()
                ),
            ));
        }
        *slot = value;
        self.forget_transposed();
        Ok(())
    }

    /// Updates the value in place (copy-on-write if a graph still holds the old value).
    pub fn update(&self, f: impl FnOnce(&mut ArrayD<f32>)) {
        let mut slot = self.0.value.write().unwrap_or_else(|e| e.into_inner());
        let mut owned =
            std::mem::replace(&mut *slot, ArrayD::zeros(IxDyn(&[0])).into_shared()).into_owned();
        f(&mut owned);
        *slot = owned.into_shared();
        self.forget_transposed();
    }

    /// The transpose of a 2-D value as a contiguous array: `(in, out)` for a Linear weight
    /// stored `(out, in)`. Products with many rows run about a fifth faster against this
    /// layout than against the strided transpose of the weight (the GEMM's packing of a
    /// column-major right operand is the slow case), so inference keeps one copy: it is made
    /// on the first call and kept until the value changes ([`Param::set`], [`Param::update`]).
    pub fn transposed(&self) -> Result<Data> {
        let value = self.0.value.read().unwrap_or_else(|e| e.into_inner());
        if value.ndim() != 2 {
            return Err(Error::shape(
                "Param::transposed",
                format!("a 2-D value, got {:?}", value.shape()),
            ));
        }
        let mut cached = self.0.transposed.lock().unwrap_or_else(|e| e.into_inner());
        Ok(cached
            .get_or_insert_with(|| value.t().as_standard_layout().into_owned().into_shared())
            .clone())
    }

    /// Drops the cached transpose; called with the value's write lock held.
    fn forget_transposed(&self) {
        *self.0.transposed.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether two handles are the same parameter.
    pub fn same_as(&self, other: &Param) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for Param {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Param(id={:?}, shape={:?})", self.id(), self.shape())
    }
}

/// A value in a state dict: parameters and most buffers are f32; counters are i64.
#[derive(Clone, Debug, PartialEq)]
pub enum StateValue {
    /// A float tensor (shared storage: cloning is cheap).
    F32(Data),
    /// An integer tensor (e.g. `calls_since_last_redraw`).
    I64(ArrayD<i64>),
}

impl StateValue {
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            StateValue::F32(a) => a.shape(),
            StateValue::I64(a) => a.shape(),
        }
    }
}

/// A non-trainable tensor that belongs to a module's state (projection matrices, fixed
/// position tables, counters).
#[derive(Clone)]
pub struct Buffer(Arc<RwLock<StateValue>>);

impl Buffer {
    /// A float buffer.
    pub fn new(value: impl Into<Data>) -> Self {
        Buffer(Arc::new(RwLock::new(StateValue::F32(value.into()))))
    }

    /// An integer buffer.
    pub fn new_i64(value: ArrayD<i64>) -> Self {
        Buffer(Arc::new(RwLock::new(StateValue::I64(value))))
    }

    /// The current value (shared for float buffers).
    pub fn get(&self) -> StateValue {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The float value as a constant tensor (an error for an integer buffer).
    pub fn tensor(&self) -> Result<Tensor> {
        match &*self.0.read().unwrap_or_else(|e| e.into_inner()) {
            StateValue::F32(a) => Ok(Tensor::new(a.clone())),
            StateValue::I64(_) => Err(Error::Other("an integer buffer has no float tensor".into())),
        }
    }

    /// Replaces the value; kind and shape must match.
    pub fn set(&self, value: StateValue) -> Result<()> {
        let mut slot = self.0.write().unwrap_or_else(|e| e.into_inner());
        let same_kind = matches!(
            (&*slot, &value),
            (StateValue::F32(_), StateValue::F32(_)) | (StateValue::I64(_), StateValue::I64(_))
        );
        if !same_kind || slot.shape() != value.shape() {
            return Err(Error::shape(
                "Buffer::set",
                format!("buffer {:?}, new value {:?}", slot.shape(), value.shape()),
            ));
        }
        *slot = value;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, Ix2};

    fn param_2x3(offset: f32) -> Param {
        Param::new(Array2::from_shape_fn((2, 3), |(i, j)| offset + (3 * i + j) as f32).into_dyn())
    }

    #[test]
    fn transposed_is_the_contiguous_transpose_and_follows_every_change() {
        let p = param_2x3(0.0);
        let t = p
            .transposed()
            .unwrap()
            .into_dimensionality::<Ix2>()
            .unwrap();
        assert_eq!(t.dim(), (3, 2));
        assert!(t.is_standard_layout());
        assert_eq!(t, p.value().into_dimensionality::<Ix2>().unwrap().t());
        // A second call shares the cached copy.
        assert_eq!(p.transposed().unwrap().as_ptr(), t.as_ptr());
        // `set` and `update` both drop it: the next transpose is of the new value.
        p.set(param_2x3(10.0).value()).unwrap();
        assert_eq!(p.transposed().unwrap()[[2, 1]], 15.0);
        p.update(|v| v.mapv_inplace(|x| -x));
        assert_eq!(p.transposed().unwrap()[[2, 1]], -15.0);
    }

    #[test]
    fn transposed_refuses_other_ranks() {
        let p = Param::new(ndarray::ArrayD::zeros(IxDyn(&[4])));
        let err = p.transposed().unwrap_err().to_string();
        assert!(
            err.contains("Param::transposed") && err.contains("[4]"),
            "{err}"
        );
    }
}
