//! What the autograd promises beyond each op's derivative: recording scopes, detaching,
//! repeatable backward passes, custom ops with nested backward passes (reversible layers),
//! gradient stores, parameter sharing, thread safety, and graphs deeper than the stack.

use std::collections::BTreeMap;

use ndarray::{ArrayD, IxDyn, Zip, arr1};
use performer_tensor::optim::clip_grad_norm;
use performer_tensor::{
    Buffer, CustomOp, Data, GradcheckOptions, Gradients, Module, Param, Result, StateValue, Tensor,
    Visitor, apply_custom_op, enable_grad, gradcheck, is_grad_enabled, no_grad, rng::Generator,
};

fn randn(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut g = Generator::seeded(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || g.normal())
}

// ---------------------------------------------------------------------------------------
// Scopes and detach

#[test]
fn no_grad_produces_untracked_tensors() {
    let x = Tensor::var(randn(&[3], 1));
    let p = Param::new(randn(&[3], 2));
    assert!(is_grad_enabled());
    let (y, leaf) = no_grad(|| {
        assert!(!is_grad_enabled());
        // enable_grad inside no_grad records again, and restores no_grad afterwards
        let inner = enable_grad(|| x.exp());
        assert!(inner.is_tracked());
        assert!(!is_grad_enabled());
        (x.mul(&x).unwrap().sum_all(), p.tensor())
    });
    assert!(is_grad_enabled(), "no_grad did not restore the mode");
    assert!(!y.is_tracked());
    // A parameter's tensor is a leaf in any mode (PyTorch: requires_grad stays true under
    // no_grad), but ops on it record nothing under no_grad.
    assert!(leaf.is_tracked());
    assert!(!no_grad(|| leaf.exp()).is_tracked());
    assert!(y.backward().is_err());
    // the guard restores the mode even when the closure panics
    let caught = std::panic::catch_unwind(|| no_grad(|| panic!("inside no_grad")));
    assert!(caught.is_err());
    assert!(is_grad_enabled());
}

#[test]
fn untracked_inputs_record_nothing() {
    let c = Tensor::new(randn(&[2, 2], 3));
    assert!(!c.matmul(&c).unwrap().softmax(-1).unwrap().is_tracked());
    let x = Tensor::var(randn(&[2, 2], 4));
    let y = c.matmul(&x).unwrap();
    assert!(y.is_tracked());
    let g = y.sum_all().backward().unwrap();
    assert_eq!(g.len(), 1, "only the leaf's gradient is returned");
    assert!(g.get(&c).is_none());
}

#[test]
fn detach_cuts_the_graph() {
    let x = Tensor::var(arr1(&[1.0f32, 2.0, 3.0]).into_dyn());
    let d = x.detach();
    assert!(!d.is_tracked());
    assert_ne!(d.id(), x.id());
    assert_eq!(d.to_vec(), x.to_vec());
    // y = x * stop_gradient(x): dy/dx = x, not 2x
    let y = x.mul(&d).unwrap().sum_all();
    let g = y.backward().unwrap();
    assert_eq!(g.get(&x).unwrap().as_slice().unwrap(), &[1.0, 2.0, 3.0]);
    // detaching an intermediate result stops the flow into everything before it
    let z = x.exp().detach().mul(&x).unwrap().sum_all();
    let g = z.backward().unwrap();
    let want: Vec<f32> = x.to_vec().iter().map(|v| v.exp()).collect();
    assert_eq!(g.get(&x).unwrap().as_slice().unwrap(), want.as_slice());
}

#[test]
fn backward_twice_gives_the_same_gradients() {
    let x = Tensor::var(randn(&[4, 5], 5));
    let w = Param::new(randn(&[5, 3], 6));
    let loss = x
        .matmul(&w.tensor())
        .unwrap()
        .gelu()
        .softmax(-1)
        .unwrap()
        .log()
        .mean_all();
    let first = loss.backward().unwrap();
    let second = loss.backward().unwrap();
    assert_eq!(first.get(&x), second.get(&x));
    assert_eq!(first.get_param(&w), second.get_param(&w));
    assert_eq!(first.len(), 2);
}

#[test]
fn a_graph_can_be_differentiated_on_another_thread() {
    let x = Tensor::var(randn(&[8], 7));
    let loss = x.tanh().sum_all();
    let here = loss.backward().unwrap();
    let there = std::thread::spawn(move || loss.backward().unwrap())
        .join()
        .unwrap();
    assert_eq!(here.get(&x), there.get(&x));
}

// ---------------------------------------------------------------------------------------
// Custom ops

/// `tanh(x * w)` whose backward rebuilds the expression from its inputs and differentiates it
/// with a nested backward pass: the pattern of reversible layers.
struct TanhMulRecompute;

impl CustomOp for TanhMulRecompute {
    type Saved = ();

    fn name(&self) -> &'static str {
        "tanh_mul_recompute"
    }

    fn forward(&self, inputs: &[&Data], _save: bool) -> Result<(Vec<ArrayD<f32>>, ())> {
        let out = Zip::from(inputs[0])
            .and(inputs[1])
            .map_collect(|&x, &w| (x * w).tanh());
        Ok((vec![out], ()))
    }

    fn backward(
        &self,
        inputs: &[Data],
        _saved: &(),
        grad_outputs: &[Option<ArrayD<f32>>],
        needs: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        assert!(
            !is_grad_enabled(),
            "backward closures run with recording off"
        );
        let Some(g) = &grad_outputs[0] else {
            return Ok(vec![None, None]);
        };
        enable_grad(|| {
            let x = Tensor::var(inputs[0].clone());
            let w = Tensor::var(inputs[1].clone());
            let y = x.mul(&w)?.tanh();
            let grads = y.backward_with_grad(g.clone())?;
            Ok(vec![
                needs[0].then(|| grads.get(&x).cloned()).flatten(),
                needs[1].then(|| grads.get(&w).cloned()).flatten(),
            ])
        })
    }
}

/// `exp(tanh_mul_recompute(x, w))`, whose backward runs a nested backward through
/// [`TanhMulRecompute`], which runs its own: two levels of nesting.
struct ExpOfRecompute;

impl CustomOp for ExpOfRecompute {
    type Saved = ();

    fn name(&self) -> &'static str {
        "exp_of_recompute"
    }

    fn forward(&self, inputs: &[&Data], _save: bool) -> Result<(Vec<ArrayD<f32>>, ())> {
        let out = Zip::from(inputs[0])
            .and(inputs[1])
            .map_collect(|&x, &w| (x * w).tanh().exp());
        Ok((vec![out], ()))
    }

    fn backward(
        &self,
        inputs: &[Data],
        _saved: &(),
        grad_outputs: &[Option<ArrayD<f32>>],
        _needs: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        let Some(g) = &grad_outputs[0] else {
            return Ok(vec![None, None]);
        };
        enable_grad(|| {
            let x = Tensor::var(inputs[0].clone());
            let w = Tensor::var(inputs[1].clone());
            let y = apply_custom_op(TanhMulRecompute, &[&x, &w])?
                .remove(0)
                .exp();
            let grads = y.backward_with_grad(g.clone())?;
            Ok(vec![grads.get(&x).cloned(), grads.get(&w).cloned()])
        })
    }
}

#[test]
fn custom_op_with_a_nested_backward_passes_gradcheck() {
    let opts = GradcheckOptions::default();
    // alone
    let f = |t: &[Tensor]| -> Result<Tensor> {
        Ok(apply_custom_op(TanhMulRecompute, &[&t[0], &t[1]])?.remove(0))
    };
    gradcheck(f, &[randn(&[3, 4], 8), randn(&[3, 4], 9)], opts).unwrap();
    // inside a larger graph, with a parameter used before and after the op
    let p = Param::new(randn(&[4], 10));
    let f = |t: &[Tensor]| -> Result<Tensor> {
        let pt = p.tensor();
        let x = t[0].mul(&pt)?;
        let w = t[1].sigmoid();
        let y = apply_custom_op(TanhMulRecompute, &[&x, &w])?.remove(0);
        y.add(&pt)?.softmax(-1)
    };
    gradcheck(f, &[randn(&[3, 4], 11), randn(&[3, 4], 12)], opts).unwrap();
    // two levels of nested backward
    let f = |t: &[Tensor]| -> Result<Tensor> {
        Ok(apply_custom_op(ExpOfRecompute, &[&t[0], &t[1]])?.remove(0))
    };
    gradcheck(f, &[randn(&[2, 3], 13), randn(&[2, 3], 14)], opts).unwrap();
}

#[test]
fn nested_backward_leaves_the_outer_parameters_gradient_whole() {
    // the parameter is used inside the op's inputs and outside it; its gradient must add up
    let p = Param::new(randn(&[5], 15));
    let x = Tensor::new(randn(&[5], 16));
    let pt = p.tensor();
    let y = apply_custom_op(TanhMulRecompute, &[&x, &pt])
        .unwrap()
        .remove(0);
    let loss = y.add(&pt).unwrap().sum_all();
    let g = loss.backward().unwrap();
    let got = g.get_param(&p).unwrap();
    for i in 0..5 {
        let (xv, pv) = (x.view()[[i]], p.value()[[i]]);
        let want = (1.0 - (xv * pv).tanh().powi(2)) * xv + 1.0;
        assert!((got[[i]] - want).abs() < 1e-6, "{} vs {want}", got[[i]]);
    }
}

/// Two outputs, `2x` and `3x`; records which output gradients reached its backward.
struct TwoOutputs {
    seen: std::sync::Arc<std::sync::Mutex<Vec<bool>>>,
}

impl CustomOp for TwoOutputs {
    type Saved = ();

    fn name(&self) -> &'static str {
        "two_outputs"
    }

    fn forward(&self, inputs: &[&Data], _save: bool) -> Result<(Vec<ArrayD<f32>>, ())> {
        Ok((
            vec![inputs[0].mapv(|v| 2.0 * v), inputs[0].mapv(|v| 3.0 * v)],
            (),
        ))
    }

    fn backward(
        &self,
        inputs: &[Data],
        _saved: &(),
        grad_outputs: &[Option<ArrayD<f32>>],
        _needs: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        *self.seen.lock().unwrap() = grad_outputs.iter().map(Option::is_some).collect();
        let mut gx = ArrayD::<f32>::zeros(inputs[0].raw_dim());
        for (g, k) in grad_outputs.iter().zip([2.0f32, 3.0]) {
            if let Some(g) = g {
                gx.zip_mut_with(g, |a, &b| *a += k * b);
            }
        }
        Ok(vec![Some(gx)])
    }
}

#[test]
fn multi_output_custom_op_with_one_output_used() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let x = Tensor::var(arr1(&[1.0f32, -2.0]).into_dyn());
    let outs = apply_custom_op(TwoOutputs { seen: seen.clone() }, &[&x]).unwrap();
    assert_eq!(outs.len(), 2);
    let g = outs[1].sum_all().backward().unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![false, true]);
    assert_eq!(g.get(&x).unwrap().as_slice().unwrap(), &[3.0, 3.0]);
    let g = outs[0].sum_all().backward().unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![true, false]);
    assert_eq!(g.get(&x).unwrap().as_slice().unwrap(), &[2.0, 2.0]);
    let both = outs[0].add(&outs[1]).unwrap().sum_all();
    let g = both.backward().unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![true, true]);
    assert_eq!(g.get(&x).unwrap().as_slice().unwrap(), &[5.0, 5.0]);
    // untracked inputs: no graph, outputs untracked
    let c = Tensor::new(arr1(&[1.0f32]).into_dyn());
    let outs = apply_custom_op(TwoOutputs { seen }, &[&c]).unwrap();
    assert!(outs.iter().all(|t| !t.is_tracked()));
}

// ---------------------------------------------------------------------------------------
// Gradients handed over as they become final (data-parallel overlap)

#[test]
fn backward_with_hook_hands_over_each_final_gradient_once_in_backward_order() {
    // loss = sum(tanh(tanh(x w1) w2) w3) + sum(x w1): w1 is used twice (its two leaves become
    // final at different ops, the first use is the last to run), w3 is the first to be final.
    let (w1, w2, w3) = (
        Param::new(randn(&[3, 4], 40)),
        Param::new(randn(&[4, 4], 41)),
        Param::new(randn(&[4, 2], 42)),
    );
    let x = Tensor::new(randn(&[5, 3], 43));
    let loss = || -> Result<Tensor> {
        let h1 = x.matmul(&w1.tensor())?.tanh();
        let h2 = h1.matmul(&w2.tensor())?.tanh();
        let out = h2.matmul(&w3.tensor())?.sum_all();
        out.add(&x.matmul(&w1.tensor())?.sum_all())
    };
    let plain = loss().unwrap().backward().unwrap();
    let mut seen: Vec<(performer_tensor::TensorId, ArrayD<f32>)> = Vec::new();
    let hooked = loss()
        .unwrap()
        .backward_with_hook(&mut |id, g| {
            seen.push((id, g.clone()));
            Ok(())
        })
        .unwrap();
    let ids: Vec<_> = seen.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        ids,
        vec![w3.id(), w2.id(), w1.id()],
        "order of final gradients"
    );
    for (id, g) in &seen {
        // What the hook saw is the whole gradient: both uses of w1 included.
        assert_eq!(Some(g), plain.get_id(*id));
        assert_eq!(Some(g), hooked.get_id(*id));
    }
    assert_eq!(hooked.len(), plain.len());
    // An error from the hook stops the backward and comes back.
    let err = loss()
        .unwrap()
        .backward_with_hook(&mut |_, _| Err(performer_tensor::Error::Other("stop".into())))
        .unwrap_err();
    assert!(err.to_string().contains("stop"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Gradient stores and clipping

#[test]
fn gradients_merge_and_scale() {
    let (a, b) = (Param::new(randn(&[2], 17)), Param::new(randn(&[3], 18)));
    let mut g1 = Gradients::new();
    g1.accumulate(a.id(), arr1(&[1.0f32, 2.0]).into_dyn())
        .unwrap();
    let mut g2 = Gradients::new();
    g2.accumulate(a.id(), arr1(&[10.0f32, 20.0]).into_dyn())
        .unwrap();
    g2.accumulate(b.id(), arr1(&[1.0f32, 1.0, 1.0]).into_dyn())
        .unwrap();
    g1.merge(g2).unwrap();
    assert_eq!(g1.len(), 2);
    assert_eq!(g1.get_param(&a).unwrap().as_slice().unwrap(), &[11.0, 22.0]);
    g1.scale(0.5);
    assert_eq!(g1.get_param(&a).unwrap().as_slice().unwrap(), &[5.5, 11.0]);
    assert_eq!(
        g1.get_param(&b).unwrap().as_slice().unwrap(),
        &[0.5, 0.5, 0.5]
    );
    assert!(g1.all_finite());
    g1.get_mut(b.id()).unwrap()[[0]] = f32::NAN;
    assert!(!g1.all_finite());
    assert!(g1.remove(b.id()).is_some());
    assert_eq!(g1.len(), 1);
    // micro-batch accumulation: the merged gradients of two halves equal the full batch's
    let w = Param::new(randn(&[4, 2], 19));
    let x = randn(&[6, 4], 20);
    let loss = |rows: std::ops::Range<usize>| {
        let xs = Tensor::new(x.slice_axis(ndarray::Axis(0), rows.into()).to_owned());
        xs.matmul(&w.tensor())
            .unwrap()
            .tanh()
            .sum_all()
            .backward()
            .unwrap()
    };
    let mut acc = loss(0..3);
    acc.merge(loss(3..6)).unwrap();
    let full = loss(0..6);
    let (a, f) = (acc.get_param(&w).unwrap(), full.get_param(&w).unwrap());
    performer_tensor::testing::assert_abs_close("accumulated gradient", a, f, 1e-5);
}

#[test]
fn clip_grad_norm_matches_a_hand_computation() {
    let (a, b, unused) = (
        Param::new(randn(&[2], 21)),
        Param::new(randn(&[1], 22)),
        Param::new(randn(&[1], 23)),
    );
    let fresh = || {
        let mut g = Gradients::new();
        g.accumulate(a.id(), arr1(&[3.0f32, 4.0]).into_dyn())
            .unwrap();
        g.accumulate(b.id(), arr1(&[12.0f32]).into_dyn()).unwrap();
        g
    };
    let params = [a.clone(), b.clone(), unused.clone()];
    // norm sqrt(9 + 16 + 144) = 13
    let mut g = fresh();
    let norm = clip_grad_norm(&mut g, &params, 6.5);
    assert_eq!(norm, 13.0);
    let coef = 6.5f32 / (13.0 + 1e-6);
    assert_eq!(
        g.get_param(&a).unwrap().as_slice().unwrap(),
        &[3.0 * coef, 4.0 * coef]
    );
    assert_eq!(g.get_param(&b).unwrap().as_slice().unwrap(), &[12.0 * coef]);
    let clipped: f32 = g
        .iter()
        .flat_map(|(_, v)| v.iter().map(|x| x * x))
        .sum::<f32>()
        .sqrt();
    assert!((clipped - 6.5).abs() < 1e-5);
    // below the limit nothing changes
    let mut g = fresh();
    assert_eq!(clip_grad_norm(&mut g, &params, 20.0), 13.0);
    assert_eq!(g.get_param(&a).unwrap().as_slice().unwrap(), &[3.0, 4.0]);
    // only the listed parameters count and are scaled
    let mut g = fresh();
    assert_eq!(clip_grad_norm(&mut g, std::slice::from_ref(&a), 1.0), 5.0);
    assert_eq!(g.get_param(&b).unwrap().as_slice().unwrap(), &[12.0]);
}

// ---------------------------------------------------------------------------------------
// Modules

/// An embedding and an output projection tied to it, plus a private bias and a buffer.
struct Tied {
    embed: Leaf,
    to_logits: Leaf,
    bias: Param,
    steps: Buffer,
}

struct Leaf {
    weight: Param,
    training: performer_tensor::TrainingFlag,
}

impl Module for Leaf {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.param("weight", &self.weight);
        v.training(&self.training);
    }
}

impl Module for Tied {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.child("embed", &self.embed);
        v.child("to_logits", &self.to_logits);
        v.param("bias", &self.bias);
        v.buffer("steps", &self.steps);
    }
}

fn tied() -> Tied {
    let shared = Param::new(randn(&[5, 3], 24));
    Tied {
        embed: Leaf {
            weight: shared.clone(),
            training: Default::default(),
        },
        to_logits: Leaf {
            weight: shared,
            training: Default::default(),
        },
        bias: Param::new(randn(&[5], 25)),
        steps: Buffer::new_i64(ArrayD::zeros(IxDyn(&[]))),
    }
}

#[test]
fn shared_parameters_are_listed_once_and_saved_under_every_name() {
    let m = tied();
    let names: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["embed.weight", "bias"]);
    assert_eq!(m.num_parameters(), 5 * 3 + 5);
    let sd = m.state_dict();
    let keys: Vec<&str> = sd.keys().map(String::as_str).collect();
    assert_eq!(keys, ["bias", "embed.weight", "steps", "to_logits.weight"]);
    assert_eq!(m.named_buffers().len(), 1);

    // a tied weight's gradient adds both uses under one id
    let ids = ArrayD::from_shape_vec(IxDyn(&[2]), vec![1i64, 4]).unwrap();
    let h = m.embed.weight.tensor().embedding(&ids.view()).unwrap();
    let logits = h
        .matmul(&m.to_logits.weight.tensor().transpose(0, 1).unwrap())
        .unwrap();
    let g = logits
        .add(&m.bias.tensor())
        .unwrap()
        .sum_all()
        .backward()
        .unwrap();
    assert_eq!(g.len(), 2);
    assert_eq!(g.get_param(&m.embed.weight).unwrap().shape(), &[5, 3]);

    // state_dict -> load_state_dict round trip into a fresh module
    let other = tied();
    other.load_state_dict(&sd).unwrap();
    assert_eq!(other.state_dict(), sd);
    assert!(
        other.embed.weight.same_as(&other.to_logits.weight),
        "loading must not untie"
    );

    // train/eval reaches every flag
    m.set_training(false);
    assert!(!m.embed.training.get() && !m.to_logits.training.get());
    m.set_training(true);
    assert!(m.embed.training.get());
}

#[test]
fn state_dict_values_are_snapshots() {
    let m = tied();
    let before: BTreeMap<String, StateValue> = m.state_dict();
    m.bias.update(|w| w.mapv_inplace(|x| x + 1.0));
    let after = m.state_dict();
    assert_ne!(before["bias"], after["bias"]);
    let (StateValue::F32(b), StateValue::F32(a)) = (&before["bias"], &after["bias"]) else {
        panic!()
    };
    performer_tensor::testing::assert_abs_close("bias after +1", a, &b.mapv(|v| v + 1.0), 1e-6);
}

// ---------------------------------------------------------------------------------------
// Threads and depth

#[test]
fn handles_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Tensor>();
    send_sync::<Param>();
    send_sync::<Buffer>();
    send_sync::<Gradients>();
    send_sync::<performer_tensor::Error>();
    send_sync::<Box<dyn Module>>();
}

const DEPTH: usize = 100_000;

#[test]
fn a_chain_of_100k_ops_differentiates_and_drops_without_overflowing_the_stack() {
    // Run on a thread with a small stack so that any recursion over the depth shows.
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(|| {
            let x = Tensor::var(arr1(&[1.0f32, 2.0]).into_dyn());
            let mut y = x.clone();
            for i in 0..DEPTH {
                y = if i % 2 == 0 {
                    y.mul_scalar(1.0001)
                } else {
                    y.add_scalar(0.0)
                };
            }
            let loss = y.sum_all();
            let g = loss.backward().unwrap();
            let want = 1.0001f32.powi((DEPTH / 2) as i32);
            for &v in g.get(&x).unwrap() {
                assert!((v - want).abs() < 1e-3 * want, "{v} vs {want}");
            }
            drop(g);
            drop(y);
            drop(loss); // the last handle on the graph: dropping it frees 100k nodes
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn a_wide_and_deep_graph_drops_without_overflowing_the_stack() {
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(|| {
            // nodes with several inputs each, sharing subgraphs
            let a = Tensor::var(arr1(&[0.5f32]).into_dyn());
            let mut y = a.clone();
            for _ in 0..DEPTH / 4 {
                let z = y.mul_scalar(0.5);
                y = Tensor::cat(&[z.clone(), y.clone()], 0)
                    .unwrap()
                    .sum_all()
                    .reshape(&[1])
                    .unwrap();
            }
            drop(a);
            drop(y);
        })
        .unwrap()
        .join()
        .unwrap();
}
