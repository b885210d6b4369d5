//! Trainable parameters and non-trainable buffers.
//!
//! A [`Param`] is a cheap handle (modules that share weights share the handle) with a stable
//! [`TensorId`]: every [`Param::tensor`] call returns a leaf with that id, so the gradients of
//! all its uses in a graph add up under one key. Optimizers replace its value in place.
//!
//! A parameter is stored in f32, or in bfloat16 for inference ([`Param::to_dtype`]): readers
//! still get f32 values ([`Param::value`] widens a copy), and the decoding step's
//! matrix-vector products read the bf16 transpose directly ([`Param::transposed_weights`]).

use std::sync::{Arc, Mutex, RwLock};

use half::bf16;
use ndarray::{ArcArray, ArrayD, IxDyn};

use crate::bf16_gemm::Bf16Pairs;
use crate::dtype::{DType, from_bf16, to_bf16};
use crate::tensor::{Data, TensorId};
use crate::{Device, Error, Result, Tensor};

/// A parameter's values in their storage type.
#[derive(Clone)]
enum Stored {
    F32(Data),
    Bf16(ArcArray<bf16, IxDyn>),
}

impl Stored {
    fn shape(&self) -> &[usize] {
        match self {
            Stored::F32(a) => a.shape(),
            Stored::Bf16(a) => a.shape(),
        }
    }

    fn to_f32(&self) -> Data {
        match self {
            Stored::F32(a) => a.clone(),
            Stored::Bf16(a) => a.mapv(from_bf16).into_shared(),
        }
    }

    fn from_f32(value: Data, dtype: DType) -> Self {
        match dtype {
            DType::F32 => Stored::F32(value),
            DType::BF16 => Stored::Bf16(value.mapv(to_bf16).into_shared()),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            Stored::F32(_) => DType::F32,
            Stored::Bf16(_) => DType::BF16,
        }
    }
}

/// The contiguous transpose `(in, out)` of a 2-D parameter in its storage type
/// ([`Param::transposed_weights`]): what the matrix-vector products of decoding read.
#[derive(Clone, Debug)]
pub enum Transposed {
    /// f32 values.
    F32(Data),
    /// bfloat16 values, widened to f32 as the products read them.
    BF16(ArcArray<bf16, IxDyn>),
}

impl Transposed {
    /// The shape, `(in, out)` for a Linear weight.
    pub fn shape(&self) -> &[usize] {
        match self {
            Transposed::F32(a) => a.shape(),
            Transposed::BF16(a) => a.shape(),
        }
    }
}

struct ParamInner {
    id: TensorId,
    value: RwLock<Stored>,
    /// The contiguous transpose of a 2-D value ([`Param::transposed_weights`]) in the storage
    /// type, made on first use and dropped whenever the value changes. Locked only while
    /// `value`'s lock is held (read to fill it, write to clear it), so it can never outlive the
    /// value it was made from.
    transposed: Mutex<Option<Transposed>>,
    /// A bf16 value's transpose packed for the CPU's bf16 dot products
    /// ([`Param::bf16_pairs`]), kept and dropped as `transposed` is.
    pairs: Mutex<Option<Arc<Bf16Pairs>>>,
    /// The value while the parameter lives on a device ([`Param::to_device`]); the host slot
    /// then holds an empty array and every accessor reads this one (a device value is f32).
    #[cfg(feature = "cuda")]
    device: RwLock<Option<crate::device_memory::DeviceStorage>>,
}

/// A trainable tensor, stored in f32 (or bfloat16 for inference, see [`Param::to_dtype`]).
#[derive(Clone)]
pub struct Param(Arc<ParamInner>);

impl Param {
    /// A parameter with the given initial value.
    pub fn new(value: impl Into<Data>) -> Self {
        Param(Arc::new(ParamInner {
            id: TensorId::fresh(),
            value: RwLock::new(Stored::F32(value.into())),
            transposed: Mutex::new(None),
            pairs: Mutex::new(None),
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
                *slot = Stored::F32(host.into_shared());
                *dev = None;
            } else {
                *dev = Some(crate::device_memory::upload(
                    "Param::to_device",
                    &host,
                    device,
                )?);
                *slot = Stored::F32(ArrayD::zeros(IxDyn(&[0])).into_shared());
            }
            *self.0.transposed.lock().unwrap_or_else(|e| e.into_inner()) = None;
            *self.0.pairs.lock().unwrap_or_else(|e| e.into_inner()) = None;
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

    /// The current value in f32: shared, no copy, for an f32 parameter; a widened copy for a
    /// bf16 one; on a device, a copy brought to the host (which panics if the copy fails).
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
            .to_f32()
    }

    /// How the values are stored.
    pub fn dtype(&self) -> DType {
        self.0
            .value
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .dtype()
    }

    /// Stores the values as `dtype` from now on: f32 to bf16 rounds each value to the nearest
    /// bfloat16 (ties to even), bf16 to f32 is exact. [`Param::set`] and [`Param::update`] keep
    /// the storage type. A bf16 parameter is for inference: optimizers refuse it.
    pub fn to_dtype(&self, dtype: DType) {
        let mut slot = self.0.value.write().unwrap_or_else(|e| e.into_inner());
        if slot.dtype() != dtype {
            *slot = Stored::from_f32(slot.to_f32(), dtype);
            self.forget_transposed();
        }
    }

    /// The shape.
    pub fn shape(&self) -> Vec<usize> {
        #[cfg(feature = "cuda")]
        if let Some(s) = self.device_storage() {
            return s.shape.clone();
        }
        self.0
            .value
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .shape()
            .to_vec()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        #[cfg(feature = "cuda")]
        if let Some(s) = self.device_storage() {
            return s.numel();
        }
        self.shape().iter().product()
    }

    /// Replaces the value; the shape must stay the same. A bf16 parameter stores the value
    /// rounded to bf16.
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
        *slot = Stored::from_f32(value, slot.dtype());
        self.forget_transposed();
        Ok(())
    }

    /// Updates the value in place (copy-on-write if a graph still holds the old value). A bf16
    /// parameter is widened, updated and rounded back (optimizers never get here: they refuse
    /// bf16 parameters, whose small updates would round away).
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
        let dtype = slot.dtype();
        let value = match std::mem::replace(
            &mut *slot,
            Stored::F32(ArrayD::zeros(IxDyn(&[0])).into_shared()),
        ) {
            Stored::F32(a) => a,
            bf16 @ Stored::Bf16(_) => bf16.to_f32(),
        };
        let mut owned = value.into_owned();
        f(&mut owned);
        *slot = Stored::from_f32(owned.into_shared(), dtype);
        self.forget_transposed();
    }

    /// The transpose of a 2-D value as a contiguous f32 array: `(in, out)` for a Linear weight
    /// stored `(out, in)`. Products with many rows run about a fifth faster against this
    /// layout than against the strided transpose of the weight (the GEMM's packing of a
    /// column-major right operand is the slow case), so inference keeps one copy: it is made
    /// on the first call and kept until the value changes ([`Param::set`], [`Param::update`]).
    /// For a bf16 parameter the kept copy is bf16 ([`Param::transposed_weights`]) and this
    /// returns a widened copy of it (a prompt's GEMMs then read f32, and only for the call).
    pub fn transposed(&self) -> Result<Data> {
        match self.transposed_weights()? {
            Transposed::F32(a) => Ok(a),
            Transposed::BF16(a) => Ok(a.mapv(from_bf16).into_shared()),
        }
    }

    /// The contiguous transpose of a 2-D value in the storage type, cached as
    /// [`Param::transposed`] describes: what the decoding step's matrix-vector products read.
    pub fn transposed_weights(&self) -> Result<Transposed> {
        if !self.device().is_cpu() {
            return Err(Error::Unsupported {
                op: "Param::transposed".into(),
                device: self.device().to_string(),
                detail: "a host-side cache of the transpose; device layers use the value".into(),
            });
        }
        let value = self.0.value.read().unwrap_or_else(|e| e.into_inner());
        if value.shape().len() != 2 {
            return Err(Error::shape(
                "Param::transposed",
                format!("a 2-D value, got {:?}", value.shape()),
            ));
        }
        let mut cached = self.0.transposed.lock().unwrap_or_else(|e| e.into_inner());
        Ok(cached
            .get_or_insert_with(|| match &*value {
                Stored::F32(a) => Transposed::F32(transpose_2d(a)),
                Stored::Bf16(a) => Transposed::BF16(transpose_2d(a)),
            })
            .clone())
    }

    /// The transpose `(in, out)` of a 2-D bf16 value packed for the CPU's bf16 dot products
    /// ([`crate::bf16_gemm`]): what a bf16 Linear layer's native products read. Made on the
    /// first call and kept until the value changes, as [`Param::transposed`] is. An f32 or
    /// non-2-D value is an error.
    pub fn bf16_pairs(&self) -> Result<Arc<Bf16Pairs>> {
        let value = self.0.value.read().unwrap_or_else(|e| e.into_inner());
        let Stored::Bf16(a) = &*value else {
            return Err(Error::invalid(
                "Param::bf16_pairs",
                "dtype",
                "f32",
                "packs bf16 values only (Param::to_dtype(DType::BF16) first)",
            ));
        };
        let a = a
            .view()
            .into_dimensionality::<ndarray::Ix2>()
            .map_err(|_| {
                Error::shape(
                    "Param::bf16_pairs",
                    format!("a 2-D value, got {:?}", a.shape()),
                )
            })?;
        let mut cached = self.0.pairs.lock().unwrap_or_else(|e| e.into_inner());
        Ok(cached
            .get_or_insert_with(|| Arc::new(Bf16Pairs::from_weight(&a)))
            .clone())
    }

    /// Rows `ids` of a 2-D value, `(ids.len(), columns)` in f32: an embedding lookup without
    /// a graph, which widens only the rows it reads from a bf16 parameter (not the table).
    /// An id past the rows is an [`Error::Index`] naming `op`.
    pub fn rows(&self, op: &str, ids: &[usize]) -> Result<ndarray::Array2<f32>> {
        if !self.device().is_cpu() {
            return Err(Error::Unsupported {
                op: op.to_string(),
                device: self.device().to_string(),
                detail: "a host-side lookup; device layers gather on the device".into(),
            });
        }
        let value = self.0.value.read().unwrap_or_else(|e| e.into_inner());
        let &[n, cols] = value.shape() else {
            return Err(Error::shape(
                op,
                format!("the table must be 2-D, got {:?}", value.shape()),
            ));
        };
        if let Some(&bad) = ids.iter().find(|&&i| i >= n) {
            return Err(Error::Index {
                op: op.to_string(),
                index: bad as i64,
                size: n,
            });
        }
        let mut out = ndarray::Array2::<f32>::zeros((ids.len(), cols));
        for (mut row, &i) in out.rows_mut().into_iter().zip(ids) {
            match &*value {
                Stored::F32(a) => row.assign(&a.index_axis(ndarray::Axis(0), i)),
                Stored::Bf16(a) => row.zip_mut_with(&a.index_axis(ndarray::Axis(0), i), |o, &w| {
                    *o = from_bf16(w)
                }),
            }
        }
        Ok(out)
    }

    /// Drops the cached transpose; called with the value's write lock held.
    fn forget_transposed(&self) {
        *self.0.transposed.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.0.pairs.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether two handles are the same parameter.
    pub fn same_as(&self, other: &Param) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for Param {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Param(id={:?}, shape={:?}, dtype={})",
            self.id(),
            self.shape(),
            self.dtype()
        )
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

/// The contiguous transpose of a 2-D array (a contiguous one in tiles,
/// [`crate::transpose::transpose_into`]).
fn transpose_2d<T: Copy + Default>(a: &ArcArray<T, IxDyn>) -> ArcArray<T, IxDyn> {
    let (rows, cols) = (a.shape()[0], a.shape()[1]);
    match a.as_slice() {
        Some(values) => ndarray::Array::from_shape_vec(
            IxDyn(&[cols, rows]),
            crate::transpose::transposed(values, rows, cols),
        )
        .expect("rows * cols values")
        .into_shared(),
        None => a.t().as_standard_layout().into_owned().into_shared(),
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
    fn bf16_pairs_are_the_packed_transpose_kept_until_the_value_changes() {
        let p = Param::new(ndarray::arr2(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]]).into_dyn());
        let err = p.bf16_pairs().unwrap_err().to_string();
        assert!(err.contains("Param::bf16_pairs"), "{err}");
        p.to_dtype(DType::BF16);
        let pairs = p.bf16_pairs().unwrap();
        assert_eq!((pairs.k(), pairs.n()), (3, 2));
        assert_eq!(pairs.get(2, 1), 6.0);
        assert!(
            Arc::ptr_eq(&pairs, &p.bf16_pairs().unwrap()),
            "kept, not remade"
        );
        p.set(ndarray::arr2(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, -6.0]]).into_dyn())
            .unwrap();
        assert_eq!(
            p.bf16_pairs().unwrap().get(2, 1),
            -6.0,
            "a stale copy after set"
        );
        p.update(|v| v.mapv_inplace(|x| 2.0 * x));
        assert_eq!(
            p.bf16_pairs().unwrap().get(2, 1),
            -12.0,
            "a stale copy after update"
        );
        let vector = Param::new(ndarray::arr1(&[1.0f32, 2.0]).into_dyn());
        vector.to_dtype(DType::BF16);
        assert!(vector.bf16_pairs().unwrap_err().to_string().contains("2-D"));
    }

    #[test]
    fn bf16_storage_rounds_keeps_its_type_and_converts_back_exactly() {
        let p = param_2x3(0.0);
        p.update(|v| v[[0, 1]] = 1.0 + 3.0 * 2f32.powi(-8));
        let t0 = p.transposed().unwrap();
        p.to_dtype(DType::BF16);
        assert_eq!(p.dtype(), DType::BF16);
        assert_eq!(p.shape(), vec![2, 3]);
        // Rounded to nearest even on the way in; the cached f32 transpose was dropped.
        assert_eq!(p.value()[[0, 1]], 1.0 + 2f32.powi(-6));
        assert_eq!(p.transposed().unwrap()[[1, 0]], 1.0 + 2f32.powi(-6));
        assert_ne!(p.transposed().unwrap(), t0);
        match p.transposed_weights().unwrap() {
            Transposed::BF16(t) => {
                assert_eq!(t.shape(), &[3, 2]);
                assert_eq!(from_bf16(t[[2, 1]]), 5.0);
            }
            Transposed::F32(_) => panic!("a bf16 parameter's transpose is bf16"),
        }
        // set and update keep bf16 (and round).
        p.set(param_2x3(0.0).value()).unwrap();
        assert_eq!(p.dtype(), DType::BF16);
        p.update(|v| v[[1, 2]] = 1.0 + 2f32.powi(-9));
        assert_eq!(p.value()[[1, 2]], 1.0);
        assert_eq!(p.dtype(), DType::BF16);
        // Back to f32: the same (bf16) values, exactly.
        let before = p.value();
        p.to_dtype(DType::F32);
        assert_eq!(p.dtype(), DType::F32);
        assert_eq!(p.value(), before);
        assert!(matches!(
            p.transposed_weights().unwrap(),
            Transposed::F32(_)
        ));
    }

    #[test]
    fn rows_read_either_storage_type_and_refuse_ids_past_the_table() {
        let p = param_2x3(0.5);
        let want = |i: usize| (0..3).map(|j| 0.5 + (3 * i + j) as f32).collect::<Vec<_>>();
        let got = p.rows("lookup", &[1, 0, 1]).unwrap();
        assert_eq!(got.dim(), (3, 3));
        assert_eq!(got.row(0).to_vec(), want(1));
        assert_eq!(got.row(1).to_vec(), want(0));
        p.to_dtype(DType::BF16);
        let got = p.rows("lookup", &[1]).unwrap();
        assert_eq!(got.row(0).to_vec(), want(1)); // these values are exact in bf16
        let err = p.rows("lookup", &[0, 2]).unwrap_err();
        assert!(
            matches!(&err, Error::Index { op, index: 2, size: 2 } if op == "lookup"),
            "{err}"
        );
        let err = Param::new(ndarray::ArrayD::zeros(IxDyn(&[4])))
            .rows("lookup", &[0])
            .unwrap_err()
            .to_string();
        assert!(err.contains("lookup") && err.contains("2-D"), "{err}");
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
