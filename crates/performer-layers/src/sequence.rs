//! Stacks of residual layers: [`SequentialSequence`] (`x += f(x); x += g(x)`) and
//! [`ReversibleSequence`] (RevNet coupling on two copies of the stream), with performer-pytorch's
//! argument routing: mask and position embedding to every layer's attention branch `f`,
//! context and context mask to cross-attention layers' `f`, nothing to the feed-forward `g`.

use ndarray::{Array2, ArrayD, ArrayView2};
use performer_favor::FastAttention;
use performer_tensor::rng::{self, RngState};
use performer_tensor::team::Team;
use performer_tensor::{
    CustomOp, Data, Error, Module, Param, Result, Tensor, Visitor, apply_custom_op, enable_grad,
    no_grad,
};

use crate::block::{Block, BlockInputs};
use crate::state::BlockState;

use crate::layer::Layer;

/// The per-layer states of a stack, created on first use.
fn layer_states(state: &mut BlockState, layers: usize) -> Result<&mut Vec<[BlockState; 2]>> {
    if matches!(state, BlockState::Empty) {
        *state = BlockState::Layers(
            (0..layers)
                .map(|_| [BlockState::Empty, BlockState::Empty])
                .collect(),
        );
    }
    match state {
        BlockState::Layers(v) if v.len() == layers => Ok(v),
        _ => Err(Error::Other(
            "decode: the state belongs to another block".into(),
        )),
    }
}

fn for_each_fast_attention(layers: &[Layer], f: &mut dyn FnMut(&FastAttention)) {
    for l in layers {
        l.f.for_each_fast_attention(f);
        l.g.for_each_fast_attention(f);
    }
}

/// [`Block::decode`] through residual layers `x = x + f(x); x = x + g(x)`.
fn decode_layers(
    layers: &[Layer],
    states: &mut [[BlockState; 2]],
    x: &Tensor,
    inputs: &BlockInputs<'_>,
) -> Result<Tensor> {
    let mut x = x.clone();
    for (l, [sf, sg]) in layers.iter().zip(states.iter_mut()) {
        x = x.add(&l.f.decode(&x, &l.f_inputs(inputs), sf)?)?;
        x = x.add(&l.g.decode(&x, &BlockInputs::none(), sg)?)?;
    }
    Ok(x)
}

/// `x = x + f(x); x = x + g(x)` per layer; parameters named `layers.{i}.0.*` and `layers.{i}.1.*`.
pub struct SequentialSequence {
    /// The layers.
    pub layers: Vec<Layer>,
}

impl Module for SequentialSequence {
    fn visit(&self, v: &mut Visitor<'_>) {
        for (i, l) in self.layers.iter().enumerate() {
            v.child(&format!("layers.{i}.0"), l.f.as_ref());
            v.child(&format!("layers.{i}.1"), l.g.as_ref());
        }
    }
}

impl Block for SequentialSequence {
    fn forward(&self, x: &Tensor, inputs: &BlockInputs<'_>) -> Result<Tensor> {
        let mut x = x.clone();
        for l in &self.layers {
            x = x.add(&l.f.forward(&x, &l.f_inputs(inputs))?)?;
            x = x.add(&l.g.forward(&x, &BlockInputs::none())?)?;
        }
        Ok(x)
    }

    fn for_each_fast_attention(&self, f: &mut dyn FnMut(&FastAttention)) {
        for_each_fast_attention(&self.layers, f)
    }

    fn decode(
        &self,
        x: &Tensor,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
    ) -> Result<Tensor> {
        let states = layer_states(state, self.layers.len())?;
        decode_layers(&self.layers, states, x, inputs)
    }

    fn decode_last(
        &self,
        x: &Tensor,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
    ) -> Result<Tensor> {
        // Only the last layer can skip positions: its attention needs every key but one query,
        // and a position-wise feed-forward after it needs the last position alone.
        let Some((last, layers)) = self.layers.split_last() else {
            return Err(Error::Other("decode_last: an empty stack".into()));
        };
        if !last.g.position_wise() {
            let out = self.decode(x, inputs, state)?;
            let n = out.shape()[1];
            return out.narrow(1, n - 1, 1);
        }
        let states = layer_states(state, self.layers.len())?;
        let (last_state, states) = states.split_last_mut().expect("as many states as layers");
        let x = decode_layers(layers, states, x, inputs)?;
        let [sf, sg] = last_state;
        let n = x.shape()[1];
        let y =
            x.narrow(1, n - 1, 1)?
                .add(&last.f.decode_last(&x, &last.f_inputs(inputs), sf)?)?;
        y.add(&last.g.decode(&y, &BlockInputs::none(), sg)?)
    }

    fn decode_rows(
        &self,
        x: &ArrayView2<f32>,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
        team: &Team,
    ) -> Result<Array2<f32>> {
        let states = layer_states(state, self.layers.len())?;
        let mut x = x.to_owned();
        for (l, st) in self.layers.iter().zip(states.iter_mut()) {
            let [sf, sg] = st;
            x += &l.f.decode_rows(&x.view(), &l.f_inputs(inputs), sf, team)?;
            x += &l.g.decode_rows(&x.view(), &BlockInputs::none(), sg, team)?;
        }
        Ok(x)
    }
}

/// Reversible residual layers (Reformer): the stream is duplicated to `[x1 | x2]` and each layer
/// maps it to `y1 = x1 + f(x2)`, `y2 = x2 + g(y1)`; the output is `y1 + y2` of the last layer.
/// The forward keeps no per-layer activations: the backward reconstructs each layer's input from
/// its output, recomputes `f` and `g` with the dropout generator's recorded state, and
/// accumulates the parameters' gradients, so memory stays constant in depth. Parameters are
/// named `blocks.{i}.f.net.*` and `blocks.{i}.g.net.*` as in performer-pytorch.
pub struct ReversibleSequence {
    /// The layers.
    pub layers: Vec<Layer>,
}

impl Module for ReversibleSequence {
    fn visit(&self, v: &mut Visitor<'_>) {
        for (i, l) in self.layers.iter().enumerate() {
            v.child(&format!("blocks.{i}.f.net"), l.f.as_ref());
            v.child(&format!("blocks.{i}.g.net"), l.g.as_ref());
        }
    }
}

impl Block for ReversibleSequence {
    fn forward(&self, x: &Tensor, inputs: &BlockInputs<'_>) -> Result<Tensor> {
        if x.rank() != 3 {
            return Err(Error::shape(
                "ReversibleSequence",
                format!("input must be (b, n, dim), got {:?}", x.shape()),
            ));
        }
        // Device tensors: the same coupling and replaying backward, kept on the device.
        #[cfg(feature = "cuda")]
        if !x.device().is_cpu() {
            return crate::reversible_device::forward(&self.layers, self.parameters(), x, inputs);
        }
        let doubled = Tensor::cat(&[x.clone(), x.clone()], -1)?;
        let params = self.parameters();
        let mut op_inputs = vec![doubled];
        let has_context = inputs.context.is_some();
        if let Some(c) = inputs.context {
            op_inputs.push(c.clone());
        }
        op_inputs.extend(params.iter().map(Param::tensor));
        let refs: Vec<&Tensor> = op_inputs.iter().collect();
        let op = ReversibleOp {
            layers: self.layers.clone(),
            params,
            has_context,
            mask: inputs.mask.map(|m| m.to_owned()),
            context_mask: inputs.context_mask.map(|m| m.to_owned()),
            pos_emb: inputs.pos_emb.map(Tensor::detach),
        };
        let out = apply_custom_op(op, &refs)?.remove(0);
        let halves = out.chunk(2, -1)?;
        halves[0].add(&halves[1])
    }

    fn for_each_fast_attention(&self, f: &mut dyn FnMut(&FastAttention)) {
        for_each_fast_attention(&self.layers, f)
    }

    fn decode(
        &self,
        x: &Tensor,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
    ) -> Result<Tensor> {
        // Without gradients the coupling is computed directly: y1 = x1 + f(x2), y2 = x2 + g(y1).
        let states = layer_states(state, self.layers.len())?;
        let (mut x1, mut x2) = (x.clone(), x.clone());
        for (l, st) in self.layers.iter().zip(states.iter_mut()) {
            let [sf, sg] = st;
            let y1 = x1.add(&l.f.decode(&x2, &l.f_inputs(inputs), sf)?)?;
            let y2 = x2.add(&l.g.decode(&y1, &BlockInputs::none(), sg)?)?;
            (x1, x2) = (y1, y2);
        }
        x1.add(&x2)
    }

    fn decode_rows(
        &self,
        x: &ArrayView2<f32>,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
        team: &Team,
    ) -> Result<Array2<f32>> {
        let states = layer_states(state, self.layers.len())?;
        let (mut x1, mut x2) = (x.to_owned(), x.to_owned());
        for (l, st) in self.layers.iter().zip(states.iter_mut()) {
            let [sf, sg] = st;
            let y1 = x1 + &l.f.decode_rows(&x2.view(), &l.f_inputs(inputs), sf, team)?;
            let y2 = x2
                + &l.g
                    .decode_rows(&y1.view(), &BlockInputs::none(), sg, team)?;
            (x1, x2) = (y1, y2);
        }
        Ok(x1 + &x2)
    }
}

struct ReversibleOp {
    layers: Vec<Layer>,
    params: Vec<Param>,
    has_context: bool,
    mask: Option<Array2<bool>>,
    context_mask: Option<Array2<bool>>,
    pos_emb: Option<Tensor>,
}

impl ReversibleOp {
    fn inputs<'a>(&'a self, context: Option<&'a Tensor>) -> BlockInputs<'a> {
        BlockInputs {
            mask: self.mask.as_ref().map(|m| m.view()),
            pos_emb: self.pos_emb.as_ref(),
            context,
            context_mask: self.context_mask.as_ref().map(|m| m.view()),
        }
    }
}

/// The generator's state before `f` and before `g` of each layer.
type LayerStates = Vec<(RngState, RngState)>;

fn halves(t: &Tensor) -> Result<(Tensor, Tensor)> {
    let mut h = t.chunk(2, -1)?;
    let b = h
        .pop()
        .ok_or_else(|| Error::Other("reversible: empty stream".into()))?;
    let a = h
        .pop()
        .ok_or_else(|| Error::Other("reversible: empty stream".into()))?;
    Ok((a, b))
}

fn add_into(slot: &mut Option<ArrayD<f32>>, g: &ArrayD<f32>) {
    match slot {
        Some(acc) => *acc += g,
        None => *slot = Some(g.clone()),
    }
}

impl CustomOp for ReversibleOp {
    type Saved = (LayerStates, Data);

    fn name(&self) -> &'static str {
        "ReversibleSequence"
    }

    fn forward(&self, inputs: &[&Data], save: bool) -> Result<(Vec<ArrayD<f32>>, Self::Saved)> {
        let context = self.has_context.then(|| Tensor::new(inputs[1].clone()));
        let block_inputs = self.inputs(context.as_ref());
        let mut x = Tensor::new(inputs[0].clone());
        let mut states = Vec::with_capacity(self.layers.len());
        no_grad(|| -> Result<()> {
            for l in &self.layers {
                let (x1, x2) = halves(&x)?;
                let sf = rng::get_state();
                let y1 = x1.add(&l.f.forward(&x2, &l.f_inputs(&block_inputs))?)?;
                let sg = rng::get_state();
                let y2 = x2.add(&l.g.forward(&y1, &BlockInputs::none())?)?;
                states.push((sf, sg));
                x = Tensor::cat(&[y1, y2], -1)?;
            }
            Ok(())
        })?;
        let out = x.to_array();
        let kept = if save {
            out.clone().into_shared()
        } else {
            ArrayD::zeros(ndarray::IxDyn(&[0])).into_shared()
        };
        Ok((vec![out], (states, kept)))
    }

    fn backward(
        &self,
        inputs: &[Data],
        saved: &Self::Saved,
        grads: &[Option<ArrayD<f32>>],
        needs: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        let Some(g) = &grads[0] else {
            return Ok(vec![None; inputs.len()]);
        };
        let (states, out) = saved;
        let context = self.has_context.then(|| Tensor::var(inputs[1].clone()));
        let block_inputs = self.inputs(context.as_ref());
        let resume = rng::get_state();
        let mut y = Tensor::new(out.clone());
        let mut dy = Tensor::new(g.clone());
        let mut dparams: Vec<Option<ArrayD<f32>>> = vec![None; self.params.len()];
        let mut dcontext: Option<ArrayD<f32>> = None;
        let mut collect = |grads: &performer_tensor::Gradients| {
            for (slot, p) in dparams.iter_mut().zip(&self.params) {
                if let Some(dp) = grads.get_param(p) {
                    add_into(slot, dp);
                }
            }
            if let Some(c) = &context
                && let Some(dc) = grads.get(c)
            {
                add_into(&mut dcontext, dc);
            }
        };
        for (l, (sf, sg)) in self.layers.iter().zip(states).rev() {
            let (y1, y2) = halves(&y)?;
            let (dy1, dy2) = halves(&dy)?;
            // g: recompute g(y1), take its gradient, reconstruct x2 = y2 - g(y1).
            rng::set_state(*sg);
            let y1v = Tensor::var(y1.to_array());
            let gy1 = enable_grad(|| l.g.forward(&y1v, &BlockInputs::none()))?;
            let grads_g = gy1.backward_with_grad(dy2.to_array())?;
            collect(&grads_g);
            let x2 = y2.sub(&gy1.detach())?;
            let dx1 = match grads_g.get(&y1v) {
                Some(d) => dy1.add(&Tensor::new(d.clone()))?,
                None => dy1,
            };
            // f: recompute f(x2), take its gradient, reconstruct x1 = y1 - f(x2).
            rng::set_state(*sf);
            let x2v = Tensor::var(x2.to_array());
            let fx2 = enable_grad(|| l.f.forward(&x2v, &l.f_inputs(&block_inputs)))?;
            let grads_f = fx2.backward_with_grad(dx1.to_array())?;
            collect(&grads_f);
            let x1 = y1.sub(&fx2.detach())?;
            let dx2 = match grads_f.get(&x2v) {
                Some(d) => dy2.add(&Tensor::new(d.clone()))?,
                None => dy2,
            };
            y = Tensor::cat(&[x1, x2], -1)?;
            dy = Tensor::cat(&[dx1, dx2], -1)?;
        }
        rng::set_state(resume);
        let mut out = vec![needs[0].then(|| dy.to_array())];
        if self.has_context {
            out.push(dcontext.filter(|_| needs[1]));
        }
        out.extend(dparams);
        Ok(out)
    }
}
