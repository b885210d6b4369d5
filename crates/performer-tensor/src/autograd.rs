//! Define-by-run reverse-mode differentiation.
//!
//! Every op whose inputs include a tracked tensor (while gradients are enabled) creates a
//! [`Node`] holding its inputs and a backward closure. [`Tensor::backward`] sorts the nodes
//! reachable from the root in reverse topological order and runs each closure once, handing it
//! the gradients of the node's outputs. Gradients of intermediate tensors are dropped as soon
//! as their producer has consumed them; the gradients of leaves (variables and parameters) are
//! returned in a [`Gradients`] store keyed by [`TensorId`]. The graph itself is never mutated,
//! so a graph can be differentiated twice and tensors stay `Send + Sync`.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ndarray::{ArrayD, ArrayViewMutD, Axis, IxDyn, Slice, Zip};

use crate::tensor::{BackwardFn, Data, GradLink, Node, SliceOfInput, TensorId};
use crate::{Error, Result, Tensor};

/// What [`Tensor::backward_with_hook`] calls with each leaf's final gradient.
pub type LeafHook<'a> = dyn FnMut(TensorId, &ArrayD<f32>) -> Result<()> + 'a;

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether ops on this thread record the graph.
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Sets this thread's gradient mode; returns the previous one.
pub(crate) fn set_grad_enabled(enabled: bool) -> bool {
    GRAD_ENABLED.with(|g| g.replace(enabled))
}

/// Restores the previous gradient mode when dropped.
pub struct GradModeGuard {
    previous: bool,
}

impl GradModeGuard {
    /// Sets the gradient mode of this thread until the guard is dropped.
    pub fn new(enabled: bool) -> Self {
        let previous = GRAD_ENABLED.with(|g| g.replace(enabled));
        GradModeGuard { previous }
    }
}

impl Drop for GradModeGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.previous));
    }
}

/// Runs `f` without recording the graph (inference, optimizer updates).
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    let _guard = GradModeGuard::new(false);
    f()
}

/// Runs `f` with graph recording on, even inside a `no_grad` scope or a backward pass
/// (reversible layers recompute their blocks this way).
pub fn enable_grad<R>(f: impl FnOnce() -> R) -> R {
    let _guard = GradModeGuard::new(true);
    f()
}

impl Tensor {
    /// The result of an op with one output. Records `backward` when gradients are enabled and
    /// some input is tracked; otherwise the closure is dropped unused.
    pub fn from_op(
        data: impl Into<Data>,
        name: &'static str,
        inputs: &[&Tensor],
        backward: impl Fn(ArrayD<f32>, &[bool]) -> Result<Vec<Option<ArrayD<f32>>>>
        + Send
        + Sync
        + 'static,
    ) -> Tensor {
        let data = data.into();
        crate::profile::op_done(name, || traffic_bytes(std::slice::from_ref(&data), inputs));
        if !needs_graph(inputs) {
            return Tensor::new(data);
        }
        let wrapped = move |grads: Vec<Option<ArrayD<f32>>>, needs: &[bool]| match grads
            .into_iter()
            .next()
            .flatten()
        {
            Some(g) => backward(g, needs),
            None => Ok(vec![None; needs.len()]),
        };
        Self::record_multi_op(vec![data], name, inputs, Some(Box::new(wrapped)), None)
            .pop()
            .expect("one output")
    }

    /// The result of an op whose output `data` is entries `start..` of `slice.axis` of `input`
    /// (`narrow`). It records no backward closure: the engine adds the output's gradient into
    /// that slice of the input's gradient in place (`run_slice_backward`).
    pub(crate) fn from_slice_op(
        data: impl Into<Data>,
        name: &'static str,
        input: &Tensor,
        slice: SliceOfInput,
    ) -> Tensor {
        let data = data.into();
        let inputs = [input];
        crate::profile::op_done(name, || traffic_bytes(std::slice::from_ref(&data), &inputs));
        Self::record_multi_op(vec![data], name, &inputs, None, Some(slice))
            .pop()
            .expect("one output")
    }

    /// The results of an op with several outputs, sharing one backward.
    pub fn from_multi_op(
        datas: Vec<Data>,
        name: &'static str,
        inputs: &[&Tensor],
        backward: impl Fn(Vec<Option<ArrayD<f32>>>, &[bool]) -> Result<Vec<Option<ArrayD<f32>>>>
        + Send
        + Sync
        + 'static,
    ) -> Vec<Tensor> {
        crate::profile::op_done(name, || traffic_bytes(&datas, inputs));
        Self::record_multi_op(datas, name, inputs, Some(Box::new(backward)), None)
    }

    /// [`Tensor::from_multi_op`] once the op's time has been accounted for: `backward` a
    /// closure, or `slice_of_input` for a slicing op (one of the two).
    fn record_multi_op(
        datas: Vec<Data>,
        name: &'static str,
        inputs: &[&Tensor],
        backward: Option<Box<BackwardFn>>,
        slice_of_input: Option<SliceOfInput>,
    ) -> Vec<Tensor> {
        if !needs_graph(inputs) {
            return datas.into_iter().map(Tensor::new).collect();
        }
        let ids: Vec<TensorId> = datas.iter().map(|_| TensorId::fresh()).collect();
        let node = Arc::new(Node {
            name,
            inputs: inputs.iter().map(|t| (*t).clone()).collect(),
            outputs: ids
                .iter()
                .zip(&datas)
                .map(|(id, d)| (*id, d.shape().to_vec()))
                .collect(),
            backward,
            slice_of_input,
            #[cfg(feature = "cuda")]
            device_backward: None,
        });
        let tensors = datas
            .into_iter()
            .zip(ids)
            .enumerate()
            .map(|(output, (data, id))| {
                Tensor::from_parts(
                    id,
                    data,
                    Some(GradLink {
                        node: node.clone(),
                        output,
                    }),
                )
            })
            .collect();
        crate::profile::autograd_done();
        tensors
    }

    /// Differentiates this one-element tensor with respect to every leaf it depends on.
    pub fn backward(&self) -> Result<Gradients> {
        if self.numel() != 1 {
            return Err(Error::Backward(format!(
                "backward() needs a one-element tensor, got shape {:?}; use backward_with_grad",
                self.shape()
            )));
        }
        self.backward_with_grad(ArrayD::from_elem(IxDyn(self.shape()), 1.0))
    }

    /// Differentiates with `grad` as the gradient of this tensor (a vector-Jacobian product).
    pub fn backward_with_grad(&self, grad: ArrayD<f32>) -> Result<Gradients> {
        self.backward_inner(grad, None)
    }

    /// [`Tensor::backward`] that hands each leaf's gradient to `on_ready` as soon as it is
    /// final, i.e. once the last op that takes the leaf as an input has run, while the rest of
    /// the backward is still to come (data-parallel training starts reducing those gradients
    /// across processes there). Every leaf that receives a gradient through an op is handed
    /// over exactly once, in the order they become final; an error from `on_ready` stops the
    /// backward and is returned. The returned store is the same as `backward`'s. A leaf on a
    /// device (feature `cuda`) is handed over as a host copy of its gradient, read from the
    /// device when it becomes final.
    pub fn backward_with_hook(&self, on_ready: &mut LeafHook<'_>) -> Result<Gradients> {
        if self.numel() != 1 {
            return Err(Error::Backward(format!(
                "backward_with_hook() needs a one-element tensor, got shape {:?}",
                self.shape()
            )));
        }
        self.backward_inner(ArrayD::from_elem(IxDyn(self.shape()), 1.0), Some(on_ready))
    }

    fn backward_inner(
        &self,
        grad: ArrayD<f32>,
        mut on_ready: Option<&mut LeafHook<'_>>,
    ) -> Result<Gradients> {
        if grad.shape() != self.shape() {
            return Err(Error::Backward(format!(
                "seed gradient has shape {:?}, the tensor has shape {:?}",
                grad.shape(),
                self.shape()
            )));
        }
        let Some(link) = self.grad_link() else {
            return Err(Error::Backward(
                "the tensor does not depend on any tracked tensor (was it computed under no_grad, \
                 or from constants only?)"
                    .into(),
            ));
        };
        let order = topological_order(&link.node);
        // Where a hook waits for leaves, the step after which each leaf's gradient is final:
        // the last node (in the order they run) that takes the leaf as an input.
        let ready_after = on_ready.as_ref().map(|_| leaves_final_after(&order));
        let mut grads: HashMap<TensorId, ArrayD<f32>> = HashMap::new();
        #[cfg(feature = "cuda")]
        let mut dgrads = crate::cuda::autograd::DeviceGrads::new();
        #[cfg(feature = "cuda")]
        if !self.device().is_cpu() {
            dgrads.insert(self.id(), Tensor::new(grad).to_device(self.device())?);
        } else {
            grads.insert(self.id(), grad);
        }
        #[cfg(not(feature = "cuda"))]
        grads.insert(self.id(), grad);
        // Closures compute on arrays; ops they build from tensors are not part of this graph.
        let _mode = GradModeGuard::new(false);
        for (step, node) in order.iter().rev().enumerate() {
            #[cfg(feature = "cuda")]
            if let Some(backward) = &node.device_backward {
                crate::cuda::autograd::run_device_node(node, backward, &mut grads, &mut dgrads)?;
            }
            run_node_backward(node, &mut grads)?;
            if let (Some(hook), Some(ready)) = (on_ready.as_deref_mut(), &ready_after) {
                for id in &ready[step] {
                    if let Some(g) = grads.get(id) {
                        hook(*id, g)?;
                    }
                    // A device leaf's gradient is handed over as a host copy (the hook's
                    // signature is the host's); the store keeps the device tensor.
                    #[cfg(feature = "cuda")]
                    if let Some(g) = dgrads.get(id) {
                        hook(*id, &g.to_host()?.to_array())?;
                    }
                }
            }
        }
        Ok(Gradients {
            map: grads,
            #[cfg(feature = "cuda")]
            device: dgrads,
        })
    }
}

/// Runs one node's backward: takes its outputs' gradients out of `grads` and adds its inputs'
/// gradients in.
fn run_node_backward(node: &Node, grads: &mut HashMap<TensorId, ArrayD<f32>>) -> Result<()> {
    if let Some(slice) = node.slice_of_input {
        return run_slice_backward(node, slice, grads);
    }
    let Some(backward) = &node.backward else {
        return Ok(());
    };
    let out_grads: Vec<Option<ArrayD<f32>>> = node
        .outputs
        .iter()
        .map(|(id, _)| grads.remove(id))
        .collect();
    if out_grads.iter().all(Option::is_none) {
        return Ok(());
    }
    let needs: Vec<bool> = node.inputs.iter().map(Tensor::is_tracked).collect();
    crate::profile::autograd_done();
    let in_grads = backward(out_grads, &needs)?;
    crate::profile::op_done(node.name, || {
        let inputs: usize = node.inputs.iter().map(Tensor::numel).sum();
        let outputs: usize = node
            .outputs
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        4 * (inputs + outputs) as u64
    });
    if in_grads.len() != node.inputs.len() {
        return Err(Error::Backward(format!(
            "op `{}` returned {} input gradients for {} inputs",
            node.name,
            in_grads.len(),
            node.inputs.len()
        )));
    }
    for (input, g) in node.inputs.iter().zip(in_grads) {
        let Some(g) = g else { continue };
        if !input.is_tracked() {
            continue;
        }
        if g.shape() != input.shape() {
            return Err(Error::Backward(format!(
                "op `{}` returned a gradient of shape {:?} for an input of shape {:?}",
                node.name,
                g.shape(),
                input.shape()
            )));
        }
        accumulate(grads, input.id(), g);
    }
    Ok(())
}

/// The backward of a slicing op (`narrow`): adds its output's gradient into the slice of its
/// input's gradient that the output was taken from. The first gradient to reach the input is
/// made here, zeros around the slice (the gradient padded to the input's shape); a later one is
/// added into the slice alone. Either way every element gets the sums that adding the padded
/// gradient would give (`x + 0` is `x`).
fn run_slice_backward(
    node: &Node,
    slice: SliceOfInput,
    grads: &mut HashMap<TensorId, ArrayD<f32>>,
) -> Result<()> {
    let (Some((out_id, _)), Some(input)) = (node.outputs.first(), node.inputs.first()) else {
        return Err(Error::Backward(format!(
            "slicing op `{}` needs one input and one output",
            node.name
        )));
    };
    let Some(g) = grads.remove(out_id) else {
        return Ok(());
    };
    crate::profile::autograd_done();
    if input.is_tracked() {
        let (axis, start) = (slice.axis, slice.start);
        let fits = g.ndim() == input.rank()
            && axis < g.ndim()
            && g.shape()
                .iter()
                .zip(input.shape())
                .enumerate()
                .all(
                    |(a, (&o, &i))| {
                        if a == axis { start + o <= i } else { o == i }
                    },
                );
        if !fits {
            return Err(Error::Backward(format!(
                "op `{}` has a gradient of shape {:?} for entries from {start} of axis {axis} \
                 of an input of shape {:?}",
                node.name,
                g.shape(),
                input.shape()
            )));
        }
        let range = Slice::from(start..start + g.shape()[axis]);
        match grads.get_mut(&input.id()) {
            Some(acc) => add_assign_view(acc.slice_axis_mut(Axis(axis), range), &g),
            None => {
                let mut full = ArrayD::<f32>::zeros(IxDyn(input.shape()));
                full.slice_axis_mut(Axis(axis), range).assign(&g);
                grads.insert(input.id(), full);
            }
        }
    }
    crate::profile::op_done(node.name, || 4 * (input.numel() + g.len()) as u64);
    Ok(())
}

/// For each node of `order` in the order the backward runs them (reversed), the leaves whose
/// gradient is final once that node has run: those it is the last consumer of. A parameter
/// used several times appears as several leaf nodes with one id, so leaves are keyed by id.
fn leaves_final_after(order: &[Arc<Node>]) -> Vec<Vec<TensorId>> {
    let mut last_use: HashMap<TensorId, usize> = HashMap::new();
    for (step, node) in order.iter().rev().enumerate() {
        for input in &node.inputs {
            if input.grad_link().is_some_and(|link| link.node.is_leaf()) {
                last_use.insert(input.id(), step);
            }
        }
    }
    let mut ready = vec![Vec::new(); order.len()];
    for (id, step) in last_use {
        ready[step].push(id);
    }
    // The map's order is arbitrary; hand leaves that become final together over in a fixed one.
    for ids in &mut ready {
        ids.sort_unstable();
    }
    ready
}

/// Bytes an op reads and writes, roughly: its inputs and outputs once each (the profile's GB/s).
fn traffic_bytes(outputs: &[Data], inputs: &[&Tensor]) -> u64 {
    let n: usize = outputs.iter().map(|d| d.len()).sum::<usize>()
        + inputs.iter().map(|t| t.numel()).sum::<usize>();
    4 * n as u64
}

pub(crate) fn needs_graph(inputs: &[&Tensor]) -> bool {
    is_grad_enabled() && inputs.iter().any(|t| t.is_tracked())
}

pub(crate) fn accumulate(grads: &mut HashMap<TensorId, ArrayD<f32>>, id: TensorId, g: ArrayD<f32>) {
    match grads.get_mut(&id) {
        Some(acc) => add_assign(acc, &g),
        None => {
            grads.insert(id, g);
        }
    }
}

/// `acc += g`, in parallel for large arrays.
pub(crate) fn add_assign(acc: &mut ArrayD<f32>, g: &ArrayD<f32>) {
    add_assign_view(acc.view_mut(), g);
}

/// [`add_assign`] into a view (a slice of a gradient).
fn add_assign_view(acc: ArrayViewMutD<f32>, g: &ArrayD<f32>) {
    let z = Zip::from(acc).and(g);
    if g.len() >= crate::parallel::PAR_THRESHOLD {
        z.par_for_each(|a, &b| *a += b);
    } else {
        z.for_each(|a, &b| *a += b);
    }
}

/// Nodes reachable from `root`, each after all of its inputs' nodes (iterative DFS, so deep
/// graphs cannot overflow the stack).
fn topological_order(root: &Arc<Node>) -> Vec<Arc<Node>> {
    let mut order = Vec::new();
    let mut visited: HashSet<*const Node> = HashSet::new();
    let mut stack: Vec<(Arc<Node>, usize)> = vec![(root.clone(), 0)];
    visited.insert(Arc::as_ptr(root));
    while let Some((node, next_input)) = stack.pop() {
        if next_input < node.inputs.len() {
            let child = node.inputs[next_input].grad_link().map(|l| l.node.clone());
            stack.push((node, next_input + 1));
            if let Some(child) = child
                && visited.insert(Arc::as_ptr(&child))
            {
                stack.push((child, 0));
            }
        } else {
            order.push(node);
        }
    }
    order
}

/// Gradients of the leaves of a graph, by tensor id (a parameter's id is stable, so
/// `grads.get_param(&p)` finds its gradient).
///
/// Gradients live where their tensors live: those of device tensors are device tensors,
/// reached through [`Gradients::tensor`] (the array accessors see host gradients only).
#[derive(Default, Debug, Clone)]
pub struct Gradients {
    map: HashMap<TensorId, ArrayD<f32>>,
    #[cfg(feature = "cuda")]
    device: HashMap<TensorId, Tensor>,
}

impl Gradients {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The gradient of `t`, if one reached it.
    pub fn get(&self, t: &Tensor) -> Option<&ArrayD<f32>> {
        self.map.get(&t.id())
    }

    /// The gradient stored under `id`.
    pub fn get_id(&self, id: TensorId) -> Option<&ArrayD<f32>> {
        self.map.get(&id)
    }

    /// The gradient of a parameter.
    pub fn get_param(&self, p: &crate::Param) -> Option<&ArrayD<f32>> {
        self.map.get(&p.id())
    }

    /// Mutable access to the gradient under `id`.
    pub fn get_mut(&mut self, id: TensorId) -> Option<&mut ArrayD<f32>> {
        self.map.get_mut(&id)
    }

    /// Removes and returns the gradient under `id`.
    pub fn remove(&mut self, id: TensorId) -> Option<ArrayD<f32>> {
        self.map.remove(&id)
    }

    /// Adds `g` to the gradient under `id` (inserting it if absent).
    pub fn accumulate(&mut self, id: TensorId, g: ArrayD<f32>) -> Result<()> {
        if let Some(acc) = self.map.get(&id)
            && acc.shape() != g.shape()
        {
            return Err(Error::shape(
                "Gradients::accumulate",
                format!("stored {:?}, adding {:?}", acc.shape(), g.shape()),
            ));
        }
        accumulate(&mut self.map, id, g);
        Ok(())
    }

    /// Adds every gradient of `other` into this store (gradient accumulation over micro-batches).
    pub fn merge(&mut self, other: Gradients) -> Result<()> {
        for (id, g) in other.map {
            self.accumulate(id, g)?;
        }
        #[cfg(feature = "cuda")]
        for (id, g) in other.device {
            no_grad(|| crate::cuda::autograd::accumulate(&mut self.device, id, g))?;
        }
        Ok(())
    }

    /// Multiplies every gradient by `factor`.
    pub fn scale(&mut self, factor: f32) {
        for g in self.map.values_mut() {
            g.mapv_inplace(|x| x * factor);
        }
        #[cfg(feature = "cuda")]
        for g in self.device.values_mut() {
            *g = no_grad(|| g.mul_scalar(factor));
        }
    }

    /// The gradient under `id` as an untracked tensor where it lives: a device tensor for a
    /// device tensor's gradient, a host tensor (a copy of the array) otherwise.
    pub fn tensor(&self, id: TensorId) -> Option<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(t) = self.device.get(&id) {
            return Some(t.clone());
        }
        self.map.get(&id).map(|a| Tensor::new(a.clone()))
    }

    /// Stores `g` (host or device) under `id`, replacing what was there.
    pub fn insert_tensor(&mut self, id: TensorId, g: Tensor) {
        #[cfg(feature = "cuda")]
        if !g.device().is_cpu() {
            self.map.remove(&id);
            self.device.insert(id, g.detach());
            return;
        }
        self.map.insert(id, g.to_array());
    }

    /// The ids of every stored gradient, host and device, in no particular order.
    pub fn ids(&self) -> Vec<TensorId> {
        #[allow(unused_mut)]
        let mut ids: Vec<TensorId> = self.map.keys().copied().collect();
        #[cfg(feature = "cuda")]
        ids.extend(self.device.keys().copied());
        ids
    }

    /// Number of stored gradients (host and device).
    pub fn len(&self) -> usize {
        #[cfg(feature = "cuda")]
        return self.map.len() + self.device.len();
        #[cfg(not(feature = "cuda"))]
        self.map.len()
    }

    /// Whether no gradient is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Iterates over (id, gradient).
    pub fn iter(&self) -> impl Iterator<Item = (&TensorId, &ArrayD<f32>)> {
        self.map.iter()
    }

    /// Whether every stored gradient is finite.
    /// Device gradients are copied to the host to be checked.
    pub fn all_finite(&self) -> bool {
        #[cfg(feature = "cuda")]
        if !self
            .device
            .values()
            .all(|g| g.to_vec().iter().all(|x| x.is_finite()))
        {
            return false;
        }
        self.map.values().all(|g| match g.as_slice_memory_order() {
            Some(values) => crate::fast_math::all_finite(values),
            None => g.iter().all(|x| x.is_finite()),
        })
    }
}
