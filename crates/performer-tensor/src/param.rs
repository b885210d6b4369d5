//! Trainable parameters and non-trainable buffers.
//!
//! A [`Param`] is a cheap handle (modules that share weights share the handle) with a stable
//! [`TensorId`]: every [`Param::tensor`] call returns a leaf with that id, so the gradients of
//! all its uses in a graph add up under one key. Optimizers replace its value in place.

use std::sync::{Arc, Mutex, RwLock};

use ndarray::{ArrayD, IxDyn};

use crate::tensor::{Data, TensorId};
use crate::{Device, Error, Result, Tensor};

struct ParamInner {
    id: TensorId,
    value: RwLock<Data>,
    /// The contiguous transpose of a 2-D value ([`Param::transposed`]), made on first use and
    /// dropped whenever the value changes. Locked only while `value`'s lock is held (read to
    /// fill it, write to clear it), so it can never outlive the value it was made from.
    transposed: Mutex<Option<Data>>,
    /// The value while the parameter lives on a device ([`Param::to_device`]); the host slot
    /// then holds an empty array and every accessor reads this one.
    #[cfg(feature = "cuda")]
    device: RwLock<Option<crate::device_memory::DeviceStorage>>,
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
            #[cfg(feature = "cuda")]
            device: RwLock::new(None),
        }))
    }

    /// Where the value lives.
    pub fn device(&self) -> Device {
        #[cfg(feature = "cuda")]
        if let Some(s) = self.device_storage() {
            return s.device;
        }
        Device::Cpu
    }

    /// Moves the value to `device` (a copy there; the host copy is released). The id stays,
    /// so gradients and optimizer state keep their keys; gradients of later graphs live on
    /// `device`. Without the `cuda` feature only [`Device::Cpu`] is accepted.
    pub fn to_device(&self, device: Device) -> Result<()> {
        if device == self.device() {
            return Ok(());
        }
        #[cfg(feature = "cuda")]
        {
            let host = self.value().to_owned();
            let mut slot = self.0.value.write().unwrap_or_else(|e| e.into_inner());
            let mut dev = self.0.device.write().unwrap_or_else(|e| e.into_inner());
            if device.is_cpu() {
                *slot = host.into_shared();
                *dev = None;
            } else {
                *dev = Some(crate::device_memory::upload(
                    "Param::to_device",
                    &host,
                    device,
                )?);
                *slot = ArrayD::zeros(IxDyn(&[0])).into_shared();
            }
            *self.0.transposed.lock().unwrap_or_else(|e| e.into_inner()) = None;
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        Err(Error::Unsupported {
            op: "Param::to_device".into(),
            device: device.to_string(),
            detail: "performer-tensor was built without its `cuda` feature".into(),
        })
    }

    /// The device value, where the parameter lives on a device.
    #[cfg(feature = "cuda")]
    pub(crate) fn device_storage(&self) -> Option<crate::device_memory::DeviceStorage> {
        self.0
            .device
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the device value (optimizers; same shape and device, checked by the caller).
    #[cfg(feature = "cuda")]
    pub(crate) fn set_device_storage(&self, s: crate::device_memory::DeviceStorage) {
        *self.0.device.write().unwrap_or_else(|e| e.into_inner()) = Some(s);
    }

    /// The stable id its gradients are stored under.
    pub fn id(&self) -> TensorId {
        self.0.id
    }

    /// The current value as a leaf tensor (ops record it only while gradients are enabled).
    pub fn tensor(&self) -> Tensor {
        #[cfg(feature = "cuda")]
        if let Some(s) = self.device_storage() {
            return Tensor::leaf_from_storage(self.0.id, crate::tensor::Storage::Device(s));
        }
        Tensor::leaf_with_id(self.0.id, self.value())
    }

    /// The current value (shared, no copy; on a device, a copy brought to the host, which
    /// panics if the copy fails).
    pub fn value(&self) -> Data {
        #[cfg(feature = "cuda")]
        if let Some(s) = self.device_storage() {
            return s
                .to_array()
                .unwrap_or_else(|e| panic!("Param::value: {e}"))
                .into_shared();
        }
        self.0
            .value
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The shape.
    pub fn shape(&self) -> Vec<usize> {
        #[cfg(feature = "cuda")]
        if let Some(s) = self.device_storage() {
            return s.shape.clone();
        }
        self.value().shape().to_vec()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        #[cfg(feature = "cuda")]
        if let Some(s) = self.device_storage() {
            return s.numel();
        }
        self.value().len()
    }

    /// Replaces the value; the shape must stay the same.
    pub fn set(&self, value: impl Into<Data>) -> Result<()> {
        let value = value.into();
        #[cfg(feature = "cuda")]
        if let Some(s) = self.device_storage() {
            if s.shape != value.shape() {
                return Err(Error::shape(
                    "Param::set",
                    format!("parameter {:?}, new value {:?}", s.shape, value.shape()),
                ));
            }
            let up = crate::device_memory::upload("Param::set", &value.to_owned(), s.device)?;
            self.set_device_storage(up);
            return Ok(());
        }
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
        #[cfg(feature = "cuda")]
        if let Some(s) = self.device_storage() {
            let mut host = s
                .to_array()
                .unwrap_or_else(|e| panic!("Param::update: {e}"));
            f(&mut host);
            self.set(host)
                .unwrap_or_else(|e| panic!("Param::update: {e}"));
            return;
        }
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
        if !self.device().is_cpu() {
            return Err(Error::Unsupported {
                op: "Param::transposed".into(),
                device: self.device().to_string(),
                detail: "a host-side cache of the transpose; device layers use the value".into(),
            });
        }
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
pub struct Buffer {
    value: Arc<RwLock<StateValue>>,
    /// A device copy of a float value after [`Buffer::to_device`] (the host value stays the
    /// authority: buffers change only through [`Buffer::set`], which refreshes the copy).
    #[cfg(feature = "cuda")]
    device: Arc<RwLock<Option<crate::device_memory::DeviceStorage>>>,
}

impl Buffer {
    /// A float buffer.
    pub fn new(value: impl Into<Data>) -> Self {
        Self::from_value(StateValue::F32(value.into()))
    }

    /// An integer buffer.
    pub fn new_i64(value: ArrayD<i64>) -> Self {
        Self::from_value(StateValue::I64(value))
    }

    fn from_value(value: StateValue) -> Self {
        Buffer {
            value: Arc::new(RwLock::new(value)),
            #[cfg(feature = "cuda")]
            device: Arc::new(RwLock::new(None)),
        }
    }

    /// Where [`Buffer::tensor`] puts its tensor (integer buffers always stay on the host).
    pub fn device(&self) -> Device {
        #[cfg(feature = "cuda")]
        if let Some(s) = &*self.device.read().unwrap_or_else(|e| e.into_inner()) {
            return s.device;
        }
        Device::Cpu
    }

    /// Keeps a copy of a float value on `device` for [`Buffer::tensor`] (integer buffers stay
    /// on the host: they are read there). Without the `cuda` feature only [`Device::Cpu`].
    pub fn to_device(&self, device: Device) -> Result<()> {
        if device == self.device() {
            return Ok(());
        }
        #[cfg(feature = "cuda")]
        {
            let value = self.get();
            let mut dev = self.device.write().unwrap_or_else(|e| e.into_inner());
            *dev = match (&value, device.is_cpu()) {
                (StateValue::F32(a), false) => Some(crate::device_memory::upload(
                    "Buffer::to_device",
                    &a.to_owned(),
                    device,
                )?),
                _ => None,
            };
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        Err(Error::Unsupported {
            op: "Buffer::to_device".into(),
            device: device.to_string(),
            detail: "performer-tensor was built without its `cuda` feature".into(),
        })
    }

    /// The current value (shared for float buffers).
    pub fn get(&self) -> StateValue {
        self.value.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The float value as a constant tensor (an error for an integer buffer).
    pub fn tensor(&self) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(s) = &*self.device.read().unwrap_or_else(|e| e.into_inner()) {
            return Ok(Tensor::from_storage(
                TensorId::fresh(),
                crate::tensor::Storage::Device(s.clone()),
                None,
            ));
        }
        match &*self.value.read().unwrap_or_else(|e| e.into_inner()) {
            StateValue::F32(a) => Ok(Tensor::new(a.clone())),
            StateValue::I64(_) => Err(Error::Other("an integer buffer has no float tensor".into())),
        }
    }

    /// Replaces the value; kind and shape must match.
    pub fn set(&self, value: StateValue) -> Result<()> {
        let mut slot = self.value.write().unwrap_or_else(|e| e.into_inner());
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
        #[cfg(feature = "cuda")]
        {
            let mut dev = self.device.write().unwrap_or_else(|e| e.into_inner());
            if let (Some(s), StateValue::F32(a)) = (&*dev, &value) {
                let up = crate::device_memory::upload("Buffer::set", &a.to_owned(), s.device)?;
                *dev = Some(up);
            }
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
