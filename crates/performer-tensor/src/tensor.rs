//! The [`Tensor`] handle: shared f32 data plus an optional link into the autograd graph, and
//! the graph's nodes, which hold tensors in turn (recording and walking the graph is
//! [`crate::autograd`]'s).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ndarray::{ArcArray, ArrayD, ArrayViewD, IxDyn};

use crate::{Error, Result};

/// Stable identity of a tensor (or of a [`crate::Param`]): gradients are stored under it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    /// A fresh id, never handed out before in this process.
    pub fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// The shared storage type of tensors: reference counted, any rank, any strides.
pub type Data = ArcArray<f32, IxDyn>;

/// An f32 tensor of any rank.
///
/// Cloning is cheap (two reference counts). The data is immutable once created; views,
/// transposes and slices share it. A tensor produced by an op on a *tracked* tensor while
/// gradients are enabled (see [`crate::no_grad`]) records how to differentiate that op, and
/// [`Tensor::backward`] walks those records.
#[derive(Clone)]
pub struct Tensor {
    inner: Arc<Inner>,
}

struct Inner {
    id: TensorId,
    storage: Storage,
    grad: Option<GradLink>,
}

/// Where a tensor's values are: host memory, or (feature `cuda`) a device buffer. With the
/// feature off there is one variant and every match on it compiles away.
#[derive(Clone)]
pub(crate) enum Storage {
    /// An ndarray array in host memory (any strides).
    Host(Data),
    /// A contiguous row-major buffer on a CUDA device or the emulated device.
    #[cfg(feature = "cuda")]
    Device(crate::device_memory::DeviceStorage),
}

// ---------------------------------------------------------------------------------------------
// The graph

/// Gradients of a node's outputs (`None` where no gradient reached an output) and which
/// inputs need a gradient, in; gradients of the inputs (`None` where not needed), out.
pub type BackwardFn =
    dyn Fn(Vec<Option<ArrayD<f32>>>, &[bool]) -> Result<Vec<Option<ArrayD<f32>>>> + Send + Sync;

/// Gradients of a device op's outputs in (None where none reached them), gradients of its
/// inputs out, as tensors where those inputs live.
#[cfg(feature = "cuda")]
pub(crate) type DeviceBackwardFn =
    dyn Fn(Vec<Option<Tensor>>, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync;

/// One recorded op (or a leaf variable, which has no backward).
pub(crate) struct Node {
    pub(crate) name: &'static str,
    pub(crate) inputs: Vec<Tensor>,
    pub(crate) outputs: Vec<(TensorId, Vec<usize>)>,
    pub(crate) backward: Option<Box<BackwardFn>>,
    /// Set for an op whose one output is a slice of its one input along one axis (`narrow`),
    /// which has no `backward`: the engine adds the output's gradient into that slice of the
    /// input's gradient in place (a closure could only return it padded with zeros to the
    /// input's shape, a whole-input array to fill and then add).
    pub(crate) slice_of_input: Option<SliceOfInput>,
    /// The backward of an op on device tensors (its gradients are tensors).
    #[cfg(feature = "cuda")]
    pub(crate) device_backward: Option<Box<DeviceBackwardFn>>,
}

/// Where a slicing op's output sits in its input: entries `start..start + len` of `axis`,
/// `len` being the output's size along `axis`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SliceOfInput {
    pub(crate) axis: usize,
    pub(crate) start: usize,
}

/// Which output of which node a tensor is.
#[derive(Clone)]
pub(crate) struct GradLink {
    pub(crate) node: Arc<Node>,
    #[allow(dead_code)]
    pub(crate) output: usize,
}

impl Node {
    pub(crate) fn leaf(id: TensorId, shape: Vec<usize>) -> Self {
        Node {
            name: "leaf",
            inputs: Vec::new(),
            outputs: vec![(id, shape)],
            backward: None,
            slice_of_input: None,
            #[cfg(feature = "cuda")]
            device_backward: None,
        }
    }

    /// Whether this is a leaf (a variable or parameter): a node without any backward.
    pub(crate) fn is_leaf(&self) -> bool {
        #[cfg(feature = "cuda")]
        if self.device_backward.is_some() {
            return false;
        }
        self.backward.is_none() && self.slice_of_input.is_none()
    }
}

impl Drop for Node {
    /// Frees the graph behind this node with an explicit stack: the default drop would
    /// recurse once per op of a chain, and a 100k-op graph would overflow the thread's stack.
    /// Nodes still referenced from elsewhere are left to their other owners.
    fn drop(&mut self) {
        let mut pending = std::mem::take(&mut self.inputs);
        while let Some(tensor) = pending.pop() {
            let Some(link) = tensor.into_unique_grad_link() else {
                continue;
            };
            if let Ok(mut node) = Arc::try_unwrap(link.node) {
                pending.append(&mut node.inputs);
                // `node` drops here with no inputs left, so this does not recurse.
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

impl Tensor {
    pub(crate) fn from_parts(id: TensorId, data: Data, grad: Option<GradLink>) -> Self {
        Self::from_storage(id, Storage::Host(data), grad)
    }

    pub(crate) fn from_storage(id: TensorId, storage: Storage, grad: Option<GradLink>) -> Self {
        Tensor {
            inner: Arc::new(Inner { id, storage, grad }),
        }
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn storage(&self) -> &Storage {
        &self.inner.storage
    }

    /// How the values are stored: f32, or bf16 for a device tensor stored so
    /// ([`Tensor::to_dtype`], or an op inside [`crate::autocast::autocast_bf16`]). Ops compute in
    /// f32 either way; host tensors are always f32.
    pub fn dtype(&self) -> crate::DType {
        match &self.inner.storage {
            Storage::Host(_) => crate::DType::F32,
            #[cfg(feature = "cuda")]
            Storage::Device(s) => s.dtype(),
        }
    }

    /// Where the values live.
    pub fn device(&self) -> crate::Device {
        match &self.inner.storage {
            Storage::Host(_) => crate::Device::Cpu,
            #[cfg(feature = "cuda")]
            Storage::Device(s) => s.device,
        }
    }

    /// A constant (untracked) tensor over `data`.
    pub fn new(data: impl Into<Data>) -> Self {
        Self::from_parts(TensorId::fresh(), data.into(), None)
    }

    /// A leaf variable: gradients flow into it and [`crate::Gradients`] reports them under
    /// its id. Like a PyTorch tensor with `requires_grad`, it is a leaf whatever the gradient
    /// mode; ops only record it while gradients are enabled.
    pub fn var(data: impl Into<Data>) -> Self {
        Self::leaf_with_id(TensorId::fresh(), data.into())
    }

    /// A leaf variable with a given id (used by [`crate::Param`], whose id is stable).
    pub fn leaf_with_id(id: TensorId, data: Data) -> Self {
        Self::leaf_from_storage(id, Storage::Host(data))
    }

    pub(crate) fn leaf_from_storage(id: TensorId, storage: Storage) -> Self {
        let node = Node::leaf(id, storage_shape(&storage).to_vec());
        Self::from_storage(
            id,
            storage,
            Some(GradLink {
                node: Arc::new(node),
                output: 0,
            }),
        )
    }

    /// A tensor of the given shape from row-major values.
    pub fn from_vec(values: Vec<f32>, shape: &[usize]) -> Result<Self> {
        if crate::shape::checked_numel(shape) != Some(values.len()) {
            return Err(Error::shape(
                "from_vec",
                format!("{} values cannot fill shape {:?}", values.len(), shape),
            ));
        }
        let arr = ArrayD::from_shape_vec(IxDyn(shape), values)
            .map_err(|e| Error::shape("from_vec", e.to_string()))?;
        Ok(Self::new(arr))
    }

    /// A tensor filled with `value`.
    ///
    /// # Panics
    /// If the shape's size in bytes overflows `isize` (see [`Tensor::try_full`] for shapes
    /// that come from outside the program).
    pub fn full(shape: &[usize], value: f32) -> Self {
        Self::new(ArrayD::from_elem(IxDyn(shape), value))
    }

    /// A tensor filled with `value`, or a shape error if no array of that shape can exist.
    pub fn try_full(shape: &[usize], value: f32) -> Result<Self> {
        if crate::shape::checked_numel(shape).is_none() {
            return Err(Error::shape(
                "full",
                format!("{shape:?} is too large to allocate"),
            ));
        }
        Ok(Self::full(shape, value))
    }

    /// A tensor of zeros (panics like [`Tensor::full`]).
    pub fn zeros(shape: &[usize]) -> Self {
        Self::full(shape, 0.0)
    }

    /// A tensor of ones (panics like [`Tensor::full`]).
    pub fn ones(shape: &[usize]) -> Self {
        Self::full(shape, 1.0)
    }

    /// A rank-0 tensor.
    pub fn scalar(value: f32) -> Self {
        Self::new(ArrayD::from_elem(IxDyn(&[]), value))
    }

    /// Standard normal samples from the global generator ([`crate::rng`]); panics like
    /// [`Tensor::full`].
    pub fn randn(shape: &[usize]) -> Self {
        Self::new(crate::rng::randn(shape))
    }

    /// Uniform samples in `[low, high)` from the global generator; panics like [`Tensor::full`].
    pub fn rand_uniform(shape: &[usize], low: f32, high: f32) -> Self {
        Self::new(crate::rng::uniform(shape, low, high))
    }

    /// This tensor's id.
    pub fn id(&self) -> TensorId {
        self.inner.id
    }

    /// The shared host data (any strides).
    ///
    /// # Panics
    /// If the tensor lives on a device (feature `cuda`): the ops with a device implementation
    /// never get here; call [`Tensor::to_host`] before an op that has none.
    pub fn data(&self) -> &Data {
        match &self.inner.storage {
            Storage::Host(d) => d,
            #[cfg(feature = "cuda")]
            Storage::Device(s) => s.host_access_panic(),
        }
    }

    /// A view of the host data (panics on a device tensor, like [`Tensor::data`]).
    pub fn view(&self) -> ArrayViewD<'_, f32> {
        self.data().view()
    }

    /// The data as an owned host array (copies; from a device, waits for it and panics if the
    /// copy fails: [`Tensor::to_host`] returns that error instead).
    pub fn to_array(&self) -> ArrayD<f32> {
        match &self.inner.storage {
            Storage::Host(d) => d.to_owned(),
            #[cfg(feature = "cuda")]
            Storage::Device(s) => s.to_array().unwrap_or_else(|e| panic!("to_array: {e}")),
        }
    }

    /// The values in row-major order (copied from a device like [`Tensor::to_array`]).
    pub fn to_vec(&self) -> Vec<f32> {
        match &self.inner.storage {
            Storage::Host(d) => d.iter().copied().collect(),
            #[cfg(feature = "cuda")]
            Storage::Device(s) => s.to_vec().unwrap_or_else(|e| panic!("to_vec: {e}")),
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        storage_shape(&self.inner.storage)
    }

    /// Number of axes.
    pub fn rank(&self) -> usize {
        self.shape().len()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        match &self.inner.storage {
            Storage::Host(d) => d.len(),
            #[cfg(feature = "cuda")]
            Storage::Device(s) => s.numel(),
        }
    }

    /// Size of `axis` (negative counts from the end).
    pub fn dim(&self, axis: isize) -> Result<usize> {
        let ax = crate::shape::normalize_axis("dim", axis, self.rank())?;
        Ok(self.shape()[ax])
    }

    /// The single value of a one-element tensor.
    pub fn item(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(Error::shape(
                "item",
                format!(
                    "needs exactly one element, the tensor has shape {:?}",
                    self.shape()
                ),
            ));
        }
        match &self.inner.storage {
            Storage::Host(d) => Ok(*d.iter().next().expect("one element")),
            // The one place a training step reads the device: the loss, when asked.
            #[cfg(feature = "cuda")]
            Storage::Device(s) => Ok(s.to_vec()?[0]),
        }
    }

    /// Whether gradients flow through this tensor.
    pub fn is_tracked(&self) -> bool {
        self.inner.grad.is_some()
    }

    /// A leaf variable over this tensor's values, wherever they live (a new id; like
    /// `detach().requires_grad_()` in PyTorch): how a variable is made on a device.
    pub fn to_var(&self) -> Tensor {
        Self::leaf_from_storage(TensorId::fresh(), self.inner.storage.clone())
    }

    /// The same data, cut from the graph (a new id; no gradient flows through it).
    pub fn detach(&self) -> Tensor {
        Self::from_storage(TensorId::fresh(), self.inner.storage.clone(), None)
    }

    pub(crate) fn grad_link(&self) -> Option<&GradLink> {
        self.inner.grad.as_ref()
    }

    /// Consumes this handle; if it was the last one, returns its graph link (for the
    /// iterative drop of graphs in `autograd`).
    pub(crate) fn into_unique_grad_link(self) -> Option<GradLink> {
        Arc::try_unwrap(self.inner)
            .ok()
            .and_then(|inner| inner.grad)
    }
}

fn storage_shape(storage: &Storage) -> &[usize] {
    match storage {
        Storage::Host(d) => d.shape(),
        #[cfg(feature = "cuda")]
        Storage::Device(s) => &s.shape,
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor(id={:?}, shape={:?}, tracked={}",
            self.id(),
            self.shape(),
            self.is_tracked()
        )?;
        if !self.device().is_cpu() {
            write!(f, ", device={}", self.device())?;
        } else if self.numel() <= 16 {
            write!(f, ", values={:?}", self.to_vec())?;
        }
        write!(f, ")")
    }
}

impl From<ArrayD<f32>> for Tensor {
    fn from(a: ArrayD<f32>) -> Self {
        Tensor::new(a)
    }
}
