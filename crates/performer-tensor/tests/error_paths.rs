//! Every way a caller can hand the public API bad input ends in a typed error that names the
//! operation, never in a panic.

use std::collections::{BTreeMap, HashMap};

use ndarray::{ArrayD, IxDyn, arr1, arr2};
use performer_tensor::io::{
    TensorData, from_safetensors_bytes, load_safetensors, save_safetensors, write_atomic,
};
use performer_tensor::optim::{Adam, Optimizer, Sgd};
use performer_tensor::{
    Buffer, CustomOp, Data, Error, Gradients, Module, Param, Result, StateValue, Tensor, Visitor,
    apply_custom_op, gemm, no_grad,
};

/// Asserts that `$expr` fails with an error matching `$pat` whose message contains `$op`.
macro_rules! assert_err {
    ($expr:expr, $pat:pat, $op:expr) => {{
        match $expr {
            Err(e) => {
                assert!(
                    matches!(e, $pat),
                    "{}: wrong variant {e:?}",
                    stringify!($expr)
                );
                let msg = e.to_string();
                assert!(
                    msg.contains($op),
                    "{}: message `{msg}` does not name `{}`",
                    stringify!($expr),
                    $op
                );
            }
            Ok(_) => panic!("{} succeeded", stringify!($expr)),
        }
    }};
}

fn t(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec((0..n).map(|i| i as f32 * 0.1).collect(), shape).unwrap()
}

fn v(shape: &[usize]) -> Tensor {
    Tensor::var(t(shape).to_array())
}

// ---------------------------------------------------------------------------------------
// Shape mismatches

#[test]
fn binary_ops_reject_shapes_that_do_not_broadcast() {
    let (a, b) = (t(&[2, 3]), t(&[4]));
    assert_err!(a.add(&b), Error::Shape { .. }, "add");
    assert_err!(a.sub(&b), Error::Shape { .. }, "sub");
    assert_err!(a.mul(&b), Error::Shape { .. }, "mul");
    assert_err!(a.div(&b), Error::Shape { .. }, "div");
    assert_err!(a.maximum(&b), Error::Shape { .. }, "maximum");
    assert_err!(a.minimum(&b), Error::Shape { .. }, "minimum");
    assert_err!(a.pow(&b), Error::Shape { .. }, "pow");
    assert_err!(
        t(&[2, 3, 1]).add(&t(&[2, 2])),
        Error::Shape { .. },
        "[2, 3, 1]"
    );
}

#[test]
fn matmul_rejects_bad_shapes() {
    assert_err!(
        t(&[2, 3]).matmul(&t(&[4, 5])),
        Error::Shape { .. },
        "matmul"
    );
    assert_err!(t(&[3]).matmul(&t(&[4])), Error::Shape { .. }, "matmul");
    assert_err!(
        Tensor::scalar(1.0).matmul(&t(&[1, 1])),
        Error::Shape { .. },
        "matmul"
    );
    assert_err!(
        t(&[2, 3]).matmul(&Tensor::scalar(1.0)),
        Error::Shape { .. },
        "matmul"
    );
    // batch dims that do not broadcast
    assert_err!(
        t(&[2, 3, 4]).matmul(&t(&[3, 4, 5])),
        Error::Shape { .. },
        "matmul"
    );
    let (a, b) = (
        ArrayD::<f32>::zeros(IxDyn(&[3])),
        ArrayD::<f32>::zeros(IxDyn(&[3, 2])),
    );
    assert_err!(
        performer_tensor::ops::batched_matmul(&a.view(), &b.view()),
        Error::Shape { .. },
        "matmul"
    );
}

#[test]
fn linear_rejects_bad_shapes_naming_itself() {
    let (x, w, b) = (t(&[5, 4]), t(&[3, 4]), t(&[3]));
    // The input's last axis against the weight's `in`; a 1-D or 3-D weight; a bias of
    // another width or rank; a scalar input.
    assert_err!(
        t(&[5, 3]).linear(&w, Some(&b)),
        Error::Shape { .. },
        "linear"
    );
    assert_err!(x.linear(&t(&[4]), None), Error::Shape { .. }, "linear");
    assert_err!(
        x.linear(&t(&[2, 3, 4]), None),
        Error::Shape { .. },
        "linear"
    );
    assert_err!(x.linear(&w, Some(&t(&[4]))), Error::Shape { .. }, "linear");
    assert_err!(
        x.linear(&w, Some(&t(&[1, 3]))),
        Error::Shape { .. },
        "linear"
    );
    assert_err!(
        Tensor::scalar(1.0).linear(&w, None),
        Error::Shape { .. },
        "linear"
    );
    // What fits: a 2-D and a 3-D input.
    assert_eq!(x.linear(&w, Some(&b)).unwrap().shape(), &[5, 3]);
    assert_eq!(t(&[2, 5, 4]).linear(&w, None).unwrap().shape(), &[2, 5, 3]);
}

#[test]
fn gemm_entry_points_reject_bad_shapes() {
    let a = ndarray::Array2::<f32>::zeros((3, 4));
    let b = ndarray::Array2::<f32>::zeros((5, 2));
    let mut c = ndarray::Array2::<f32>::zeros((3, 2));
    assert_err!(
        gemm::gemm_into(
            &mut c.view_mut(),
            &a.view(),
            &b.view(),
            1.0,
            0.0,
            gemm::Threads::Single
        ),
        Error::Shape { .. },
        "gemm"
    );
    let b = ndarray::Array2::<f32>::zeros((4, 2));
    let mut wrong_c = ndarray::Array2::<f32>::zeros((2, 2));
    assert_err!(
        gemm::gemm_into(
            &mut wrong_c.view_mut(),
            &a.view(),
            &b.view(),
            1.0,
            0.0,
            gemm::Threads::All
        ),
        Error::Shape { .. },
        "gemm"
    );
    assert_err!(
        gemm::matmul2(&a.view(), &a.view(), gemm::Threads::All),
        Error::Shape { .. },
        "gemm"
    );
    let a3 = ndarray::Array3::<f32>::zeros((2, 3, 4));
    let b3 = ndarray::Array3::<f32>::zeros((3, 4, 5));
    assert_err!(
        gemm::matmul3(&a3.view(), &b3.view()),
        Error::Shape { .. },
        "matmul3"
    );
}

#[test]
fn cat_and_stack_reject_mismatched_operands() {
    assert_err!(
        Tensor::cat(&[t(&[2, 3]), t(&[2, 4])], 0),
        Error::Shape { .. },
        "cat"
    );
    assert_err!(
        Tensor::cat(&[t(&[2, 3]), t(&[2, 3, 1])], 0),
        Error::Shape { .. },
        "cat"
    );
    assert_err!(Tensor::cat(&[], 0), Error::InvalidArgument { .. }, "cat");
    assert_err!(
        Tensor::stack(&[t(&[2, 3]), t(&[3, 2])], 0),
        Error::Shape { .. },
        "stack"
    );
    assert_err!(
        Tensor::stack(&[], 0),
        Error::InvalidArgument { .. },
        "stack"
    );
}

#[test]
fn reshape_rejects_wrong_element_counts() {
    let a = t(&[2, 3]);
    assert_err!(a.reshape(&[4, 2]), Error::Shape { .. }, "reshape");
    assert_err!(a.reshape(&[-1, -1]), Error::Shape { .. }, "reshape");
    assert_err!(a.reshape(&[-2, 3]), Error::Shape { .. }, "reshape");
    assert_err!(a.reshape(&[4, -1]), Error::Shape { .. }, "reshape");
    assert_err!(a.reshape(&[0, -1]), Error::Shape { .. }, "reshape");
    assert_err!(
        a.reshape(&[isize::MAX, isize::MAX, 2]),
        Error::Shape { .. },
        "reshape"
    );
    assert_err!(
        Tensor::from_vec(vec![1.0; 5], &[2, 3]),
        Error::Shape { .. },
        "from_vec"
    );
    assert_err!(
        Tensor::from_vec(vec![1.0; 4], &[usize::MAX, 2, 2]),
        Error::Shape { .. },
        "from_vec"
    );
    assert_err!(a.broadcast_to(&[3, 3]), Error::Shape { .. }, "broadcast_to");
    assert_err!(a.broadcast_to(&[3]), Error::Shape { .. }, "broadcast_to");
    assert_err!(a.squeeze(0), Error::Shape { .. }, "squeeze");
    assert_err!(a.item(), Error::Shape { .. }, "item");
}

#[test]
fn layer_norm_rejects_bad_affine_shapes() {
    let x = t(&[2, 4]);
    assert_err!(
        x.layer_norm(Some(&t(&[3])), None, 1e-5),
        Error::Shape { .. },
        "layer_norm"
    );
    assert_err!(
        x.layer_norm(None, Some(&t(&[4, 1])), 1e-5),
        Error::Shape { .. },
        "layer_norm"
    );
    assert_err!(
        x.layer_norm(Some(&t(&[4])), Some(&t(&[2])), 1e-5),
        Error::Shape { .. },
        "bias"
    );
    assert_err!(
        Tensor::scalar(1.0).layer_norm(None, None, 1e-5),
        Error::Shape { .. },
        "layer_norm"
    );
}

#[test]
fn cross_entropy_rejects_bad_targets() {
    let logits = t(&[2, 5, 3]);
    let wrong = ArrayD::<i64>::zeros(IxDyn(&[2, 5]));
    assert_err!(
        logits.cross_entropy(&wrong.view(), None),
        Error::Shape { .. },
        "cross_entropy"
    );
    let flat = ArrayD::<i64>::zeros(IxDyn(&[5]));
    assert_err!(
        t(&[5]).cross_entropy(&flat.view(), None),
        Error::Shape { .. },
        "cross_entropy"
    );
    let too_big = arr2(&[[0i64, 5, 1], [0, 0, 0]]).into_dyn();
    assert_err!(
        logits.cross_entropy(&too_big.view(), None),
        Error::Index {
            index: 5,
            size: 5,
            ..
        },
        "cross_entropy"
    );
    let negative = arr2(&[[0i64, -1, 1], [0, 0, 0]]).into_dyn();
    assert_err!(
        logits.cross_entropy(&negative.view(), Some(-100)),
        Error::Index { index: -1, .. },
        "cross_entropy"
    );
    // the ignored value may lie outside 0..C
    let ignored = arr2(&[[0i64, -100, 1], [0, 0, 0]]).into_dyn();
    assert!(logits.cross_entropy(&ignored.view(), Some(-100)).is_ok());
}

#[test]
fn index_ops_reject_bad_shapes() {
    let x = t(&[3, 4]);
    let idx = ArrayD::<i64>::zeros(IxDyn(&[3]));
    assert_err!(x.gather(1, &idx.view()), Error::Shape { .. }, "gather");
    let idx = ArrayD::<i64>::zeros(IxDyn(&[4, 2]));
    assert_err!(x.gather(1, &idx.view()), Error::Shape { .. }, "gather");
    let mask = ArrayD::<bool>::from_elem(IxDyn(&[3]), true);
    assert_err!(
        x.masked_fill(&mask.view(), 0.0),
        Error::Shape { .. },
        "masked_fill"
    );
    let cond = ArrayD::<bool>::from_elem(IxDyn(&[2, 1]), true);
    assert_err!(
        Tensor::where_cond(&cond.view(), &x, &x),
        Error::Shape { .. },
        "where"
    );
    let cond = ArrayD::<bool>::from_elem(IxDyn(&[1]), true);
    assert_err!(
        Tensor::where_cond(&cond.view(), &x, &t(&[3])),
        Error::Shape { .. },
        "where"
    );
    let ids = ArrayD::<i64>::zeros(IxDyn(&[2]));
    assert_err!(
        t(&[5]).embedding(&ids.view()),
        Error::Shape { .. },
        "embedding"
    );
}

#[test]
fn reductions_reject_empty_max() {
    assert_err!(t(&[2, 0]).amax(&[1], false), Error::Shape { .. }, "amax");
}

// ---------------------------------------------------------------------------------------
// Bad axes

#[test]
fn every_op_taking_an_axis_rejects_a_bad_one() {
    let x = t(&[2, 3]);
    let idx = ArrayD::<i64>::zeros(IxDyn(&[2, 3]));
    for bad in [2isize, -3, isize::MAX, isize::MIN] {
        assert_err!(x.dim(bad), Error::Axis { .. }, "dim");
        assert_err!(x.sum(&[bad], false), Error::Axis { .. }, "sum");
        assert_err!(x.mean(&[bad], true), Error::Axis { .. }, "mean");
        assert_err!(x.amax(&[bad], false), Error::Axis { .. }, "amax");
        assert_err!(x.norm(&[bad], false), Error::Axis { .. }, "norm");
        assert_err!(x.softmax(bad), Error::Axis { .. }, "softmax");
        assert_err!(x.log_softmax(bad), Error::Axis { .. }, "log_softmax");
        assert_err!(x.flatten(bad, 1), Error::Axis { .. }, "flatten");
        assert_err!(x.flatten(0, bad), Error::Axis { .. }, "flatten");
        assert_err!(x.permute(&[0, bad]), Error::Axis { .. }, "permute");
        assert_err!(x.transpose(bad, 0), Error::Axis { .. }, "transpose");
        assert_err!(x.transpose(0, bad), Error::Axis { .. }, "transpose");
        assert_err!(x.narrow(bad, 0, 1), Error::Axis { .. }, "narrow");
        assert_err!(x.select(bad, 0), Error::Axis { .. }, "select");
        assert_err!(x.squeeze(bad), Error::Axis { .. }, "squeeze");
        assert_err!(x.pad(bad, 1, 1, 0.0), Error::Axis { .. }, "pad");
        assert_err!(x.split(1, bad), Error::Axis { .. }, "split");
        assert_err!(
            x.split_sizes(&[1, 1], bad),
            Error::Axis { .. },
            "split_sizes"
        );
        assert_err!(x.chunk(2, bad), Error::Axis { .. }, "chunk");
        assert_err!(
            Tensor::cat(&[x.clone(), x.clone()], bad),
            Error::Axis { .. },
            "cat"
        );
        assert_err!(
            x.index_select(bad, &[0]),
            Error::Axis { .. },
            "index_select"
        );
        assert_err!(x.gather(bad, &idx.view()), Error::Axis { .. }, "gather");
    }
    // unsqueeze and stack accept rank + 1 positions
    assert!(x.unsqueeze(2).is_ok() && x.unsqueeze(-3).is_ok());
    assert_err!(x.unsqueeze(3), Error::Axis { .. }, "unsqueeze");
    assert_err!(x.unsqueeze(-4), Error::Axis { .. }, "unsqueeze");
    assert!(Tensor::stack(&[x.clone(), x.clone()], 2).is_ok());
    assert_err!(
        Tensor::stack(&[x.clone(), x.clone()], 3),
        Error::Axis { .. },
        "stack"
    );
    assert_err!(
        Tensor::stack(&[x.clone(), x.clone()], -4),
        Error::Axis { .. },
        "stack"
    );
    // rank 0 has no axis at all
    let s = Tensor::scalar(1.0);
    assert_err!(s.softmax(0), Error::Axis { .. }, "softmax");
    assert_err!(s.sum(&[0], false), Error::Axis { .. }, "sum");
    assert_err!(
        Tensor::cat(&[s.clone(), s.clone()], 0),
        Error::Axis { .. },
        "cat"
    );
}

#[test]
fn repeated_or_missing_axes_are_invalid_arguments() {
    let x = t(&[2, 3]);
    assert_err!(x.sum(&[1, -1], false), Error::InvalidArgument { .. }, "sum");
    assert_err!(
        x.amax(&[0, 0], false),
        Error::InvalidArgument { .. },
        "amax"
    );
    assert_err!(
        x.norm(&[0, -2], false),
        Error::InvalidArgument { .. },
        "norm"
    );
    assert_err!(x.permute(&[0, 0]), Error::InvalidArgument { .. }, "permute");
    assert_err!(x.permute(&[0]), Error::InvalidArgument { .. }, "permute");
    assert_err!(x.flatten(1, 0), Error::InvalidArgument { .. }, "flatten");
}

// ---------------------------------------------------------------------------------------
// Bad indices

#[test]
fn out_of_range_indices_are_index_errors() {
    let x = t(&[3, 4]);
    assert_err!(
        x.index_select(0, &[0, 3]),
        Error::Index {
            index: 3,
            size: 3,
            ..
        },
        "index_select"
    );
    assert_err!(
        x.index_select(1, &[-1]),
        Error::Index { index: -1, .. },
        "index_select"
    );
    let ids = arr2(&[[0i64, 1], [3, 0]]).into_dyn();
    assert_err!(
        x.embedding(&ids.view()),
        Error::Index {
            index: 3,
            size: 3,
            ..
        },
        "embedding"
    );
    let ids = arr1(&[i64::MIN]).into_dyn();
    assert_err!(x.embedding(&ids.view()), Error::Index { .. }, "embedding");
    let idx = arr2(&[[0i64, 4], [1, 1], [2, 0]]).into_dyn();
    assert_err!(
        x.gather(1, &idx.view()),
        Error::Index {
            index: 4,
            size: 4,
            ..
        },
        "gather"
    );
    let idx = arr2(&[[0i64], [-1], [2]]).into_dyn();
    assert_err!(
        x.gather(1, &idx.view()),
        Error::Index { index: -1, .. },
        "gather"
    );
    assert_err!(x.narrow(1, 2, 3), Error::Index { .. }, "narrow");
    assert_err!(x.narrow(1, usize::MAX, 2), Error::Index { .. }, "narrow");
    assert_err!(x.narrow(0, 4, 0), Error::Index { .. }, "narrow");
    assert_err!(
        x.select(0, 3),
        Error::Index {
            index: 3,
            size: 3,
            ..
        },
        "select"
    );
    assert_err!(x.select(1, usize::MAX), Error::Index { .. }, "select");
    // an empty selection is fine
    assert_eq!(x.index_select(0, &[]).unwrap().shape(), &[0, 4]);
    assert_eq!(x.narrow(1, 4, 0).unwrap().shape(), &[3, 0]);
}

// ---------------------------------------------------------------------------------------
// Invalid arguments

#[test]
fn invalid_arguments_are_rejected() {
    let x = t(&[4, 6]);
    for p in [-0.1f32, 1.5, f32::NAN, f32::INFINITY] {
        assert_err!(x.dropout(p, true), Error::InvalidArgument { .. }, "dropout");
        assert_err!(
            x.dropout(p, false),
            Error::InvalidArgument { .. },
            "dropout"
        );
    }
    assert_err!(x.chunk(0, 1), Error::InvalidArgument { .. }, "chunk");
    assert_err!(x.split(0, 1), Error::InvalidArgument { .. }, "split");
    assert_err!(
        x.split_sizes(&[2, 3], 1),
        Error::InvalidArgument { .. },
        "split_sizes"
    );
    assert_err!(
        x.split_sizes(&[usize::MAX, 7], 1),
        Error::InvalidArgument { .. },
        "split_sizes"
    );
    assert_err!(
        x.pad(0, usize::MAX, 1, 0.0),
        Error::InvalidArgument { .. },
        "pad"
    );
}

// ---------------------------------------------------------------------------------------
// Backward

#[test]
fn backward_needs_a_tracked_scalar() {
    let x = v(&[2, 3]);
    let y = x.mul_scalar(2.0);
    assert_err!(y.backward(), Error::Backward(_), "one-element");
    assert_err!(t(&[1]).backward(), Error::Backward(_), "tracked");
    assert_err!(
        no_grad(|| x.sum_all()).backward(),
        Error::Backward(_),
        "no_grad"
    );
    assert_err!(
        y.backward_with_grad(ArrayD::zeros(IxDyn(&[3, 2]))),
        Error::Backward(_),
        "seed gradient"
    );
    assert!(y.backward_with_grad(ArrayD::ones(IxDyn(&[2, 3]))).is_ok());
}

/// A custom op that misbehaves in its backward, in the way `mode` says.
struct Faulty {
    mode: u8,
}

impl CustomOp for Faulty {
    type Saved = ();
    fn name(&self) -> &'static str {
        "faulty_op"
    }
    fn forward(&self, inputs: &[&Data], _: bool) -> Result<(Vec<ArrayD<f32>>, ())> {
        if self.mode == 9 {
            return Err(Error::invalid("faulty_op", "mode", 9, "refuses to run"));
        }
        Ok((vec![inputs[0].to_owned()], ()))
    }
    fn backward(
        &self,
        inputs: &[Data],
        _: &(),
        g: &[Option<ArrayD<f32>>],
        _: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        match self.mode {
            0 => Ok(vec![]),
            1 => Ok(vec![Some(ArrayD::zeros(IxDyn(&[7])))]),
            2 => Err(Error::Other("faulty_op: backward refuses".into())),
            _ => Ok(vec![g[0].clone().or_else(|| Some(inputs[0].to_owned()))]),
        }
    }
}

#[test]
fn custom_op_errors_surface_from_backward() {
    let x = v(&[2, 3]);
    let y = &apply_custom_op(Faulty { mode: 0 }, &[&x]).unwrap()[0];
    assert_err!(y.sum_all().backward(), Error::Backward(_), "faulty_op");
    let y = &apply_custom_op(Faulty { mode: 1 }, &[&x]).unwrap()[0];
    assert_err!(y.sum_all().backward(), Error::Backward(_), "faulty_op");
    let y = &apply_custom_op(Faulty { mode: 2 }, &[&x]).unwrap()[0];
    assert_err!(y.sum_all().backward(), Error::Other(_), "faulty_op");
    assert_err!(
        apply_custom_op(Faulty { mode: 9 }, &[&x]),
        Error::InvalidArgument { .. },
        "faulty_op"
    );
    let y = &apply_custom_op(Faulty { mode: 3 }, &[&x]).unwrap()[0];
    assert!(y.sum_all().backward().is_ok());
}

#[test]
fn gradients_reject_mismatched_accumulation() {
    let x = v(&[2]);
    let mut g = Gradients::new();
    g.accumulate(x.id(), ArrayD::ones(IxDyn(&[2]))).unwrap();
    assert_err!(
        g.accumulate(x.id(), ArrayD::ones(IxDyn(&[3]))),
        Error::Shape { .. },
        "Gradients::accumulate"
    );
    let mut other = Gradients::new();
    other
        .accumulate(x.id(), ArrayD::ones(IxDyn(&[1, 2])))
        .unwrap();
    assert_err!(g.merge(other), Error::Shape { .. }, "Gradients::accumulate");
}

// ---------------------------------------------------------------------------------------
// Parameters, buffers, modules, optimizers

#[test]
fn param_and_buffer_setters_check_shapes() {
    let p = Param::new(ArrayD::<f32>::zeros(IxDyn(&[2, 3])));
    assert_err!(
        p.set(ArrayD::<f32>::zeros(IxDyn(&[3, 2]))),
        Error::Shape { .. },
        "Param::set"
    );
    assert_eq!(p.shape(), vec![2, 3]);
    let b = Buffer::new(ArrayD::<f32>::zeros(IxDyn(&[4])));
    assert_err!(
        b.set(StateValue::F32(ArrayD::zeros(IxDyn(&[5])).into_shared())),
        Error::Shape { .. },
        "Buffer::set"
    );
    assert_err!(
        b.set(StateValue::I64(ArrayD::zeros(IxDyn(&[4])))),
        Error::Shape { .. },
        "Buffer::set"
    );
    let counter = Buffer::new_i64(ArrayD::zeros(IxDyn(&[])));
    assert_err!(counter.tensor(), Error::Other(_), "integer buffer");
}

/// A two-level module: `proj.weight`, `proj.bias`, `scale`, `counter` (an i64 buffer).
struct Proj {
    weight: Param,
    bias: Param,
}

impl Module for Proj {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.param("weight", &self.weight);
        v.param("bias", &self.bias);
    }
}

struct Net {
    proj: Proj,
    scale: Param,
    counter: Buffer,
}

impl Module for Net {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.child("proj", &self.proj);
        v.param("scale", &self.scale);
        v.buffer("counter", &self.counter);
    }
}

fn net() -> Net {
    Net {
        proj: Proj {
            weight: Param::new(ArrayD::<f32>::ones(IxDyn(&[2, 3]))),
            bias: Param::new(ArrayD::<f32>::ones(IxDyn(&[3]))),
        },
        scale: Param::new(ArrayD::<f32>::ones(IxDyn(&[]))),
        counter: Buffer::new_i64(ArrayD::zeros(IxDyn(&[]))),
    }
}

#[test]
fn load_state_dict_rejects_missing_unexpected_and_misshaped_keys() {
    let m = net();
    let good = m.state_dict();
    let keys: Vec<&str> = good.keys().map(String::as_str).collect();
    assert_eq!(keys, ["counter", "proj.bias", "proj.weight", "scale"]);

    let mut missing = good.clone();
    missing.remove("proj.bias");
    assert_err!(
        m.load_state_dict(&missing),
        Error::StateDict(_),
        "missing keys: proj.bias"
    );

    let mut unexpected = good.clone();
    unexpected.insert(
        "proj.gamma".into(),
        StateValue::F32(ArrayD::zeros(IxDyn(&[3])).into_shared()),
    );
    assert_err!(
        m.load_state_dict(&unexpected),
        Error::StateDict(_),
        "unexpected keys: proj.gamma"
    );

    // a mis-shaped key after a good one: nothing may be changed
    let mut misshaped = good.clone();
    misshaped.insert(
        "proj.bias".into(),
        StateValue::F32(ArrayD::from_elem(IxDyn(&[3]), 7.0).into_shared()),
    );
    misshaped.insert(
        "scale".into(),
        StateValue::F32(ArrayD::zeros(IxDyn(&[1])).into_shared()),
    );
    assert_err!(m.load_state_dict(&misshaped), Error::StateDict(_), "scale");
    assert!(
        m.proj.bias.value().iter().all(|&x| x == 1.0),
        "a failed load changed a parameter"
    );

    let mut wrong_kind = good.clone();
    wrong_kind.insert(
        "counter".into(),
        StateValue::F32(ArrayD::zeros(IxDyn(&[])).into_shared()),
    );
    assert_err!(
        m.load_state_dict(&wrong_kind),
        Error::StateDict(_),
        "counter"
    );
    let mut wrong_kind = good.clone();
    wrong_kind.insert("scale".into(), StateValue::I64(ArrayD::zeros(IxDyn(&[]))));
    assert_err!(m.load_state_dict(&wrong_kind), Error::StateDict(_), "scale");

    // and the good dict loads, values and all
    let mut changed = good.clone();
    changed.insert(
        "proj.weight".into(),
        StateValue::F32(ArrayD::from_elem(IxDyn(&[2, 3]), 0.5).into_shared()),
    );
    changed.insert(
        "counter".into(),
        StateValue::I64(ArrayD::from_elem(IxDyn(&[]), 41)),
    );
    m.load_state_dict(&changed).unwrap();
    assert!(m.proj.weight.value().iter().all(|&x| x == 0.5));
    assert_eq!(
        m.counter.get(),
        StateValue::I64(ArrayD::from_elem(IxDyn(&[]), 41))
    );
}

#[test]
fn optimizers_reject_mismatched_gradients_and_state() {
    let p = Param::new(ArrayD::<f32>::zeros(IxDyn(&[2, 2])));
    let mut g = Gradients::new();
    g.accumulate(p.id(), ArrayD::ones(IxDyn(&[4]))).unwrap();
    let mut sgd = Sgd::new(vec![("w".into(), p.clone())], 0.1);
    assert_err!(sgd.step(&g), Error::Shape { .. }, "`w`");
    let mut adam = Adam::new(vec![("w".into(), p.clone())], 0.1);
    assert_err!(adam.step(&g), Error::Shape { .. }, "optimizer step");
    assert_eq!(adam.steps(), 0, "a rejected step must not count");
    assert!(p.value().iter().all(|&x| x == 0.0));

    let mut state = BTreeMap::new();
    assert_err!(adam.load_state_dict(&state), Error::StateDict(_), "step");
    state.insert(
        "step".to_string(),
        TensorData::F32(ArrayD::zeros(IxDyn(&[]))),
    );
    assert_err!(adam.load_state_dict(&state), Error::StateDict(_), "step");
    state.insert(
        "step".to_string(),
        TensorData::I64(ArrayD::from_elem(IxDyn(&[]), 3)),
    );
    state.insert(
        "w.exp_avg".to_string(),
        TensorData::F32(ArrayD::zeros(IxDyn(&[2, 2]))),
    );
    assert_err!(adam.load_state_dict(&state), Error::StateDict(_), "w");
    state.insert(
        "w.exp_avg_sq".to_string(),
        TensorData::F32(ArrayD::zeros(IxDyn(&[3]))),
    );
    assert_err!(
        adam.load_state_dict(&state),
        Error::StateDict(_),
        "w.exp_avg_sq"
    );
    state.insert(
        "w.momentum_buffer".to_string(),
        TensorData::I64(ArrayD::zeros(IxDyn(&[2, 2]))),
    );
    assert_err!(
        sgd.load_state_dict(&state),
        Error::StateDict(_),
        "w.momentum_buffer"
    );
}

// ---------------------------------------------------------------------------------------
// safetensors

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("performer-tensor-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn sample_tensors() -> BTreeMap<String, TensorData> {
    let mut m = BTreeMap::new();
    m.insert(
        "f".into(),
        TensorData::F32(arr2(&[[1.5f32, -2.0, f32::INFINITY], [0.0, -0.0, 1e-30]]).into_dyn()),
    );
    m.insert(
        "i".into(),
        TensorData::I64(arr1(&[i64::MIN, -1, 0, i64::MAX]).into_dyn()),
    );
    m.insert(
        "b".into(),
        TensorData::Bool(arr2(&[[true, false], [false, true]]).into_dyn()),
    );
    m.insert(
        "scalar".into(),
        TensorData::F32(ArrayD::from_elem(IxDyn(&[]), 3.25)),
    );
    m.insert(
        "empty".into(),
        TensorData::F32(ArrayD::zeros(IxDyn(&[0, 4]))),
    );
    m
}

#[test]
fn safetensors_round_trip_f32_i64_bool() {
    let dir = temp_dir("roundtrip");
    let path = dir.join("t.safetensors");
    let meta: HashMap<String, String> = [("k".to_string(), "v".to_string())].into();
    save_safetensors(&path, &sample_tensors(), Some(meta.clone())).unwrap();
    assert_eq!(load_safetensors(&path).unwrap(), sample_tensors());
    assert_eq!(
        performer_tensor::io::load_safetensors_metadata(&path).unwrap(),
        meta
    );
    // a non-contiguous array is written in logical (row-major) order
    let mut m = BTreeMap::new();
    let a = arr2(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]]);
    m.insert("t".into(), TensorData::F32(a.t().to_owned().into_dyn()));
    m.insert("v".into(), TensorData::F32(a.t().into_dyn().to_owned()));
    save_safetensors(&path, &m, None).unwrap();
    let back = load_safetensors(&path).unwrap();
    assert_eq!(
        back["t"],
        TensorData::F32(arr2(&[[1.0f32, 4.0], [2.0, 5.0], [3.0, 6.0]]).into_dyn())
    );
    assert_eq!(back["v"], back["t"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn wrong_dtype_access_names_the_tensor() {
    let m = sample_tensors();
    assert_err!(
        m["i"].clone().into_f32("i"),
        Error::Other(_),
        "`i` is int64"
    );
    assert_err!(
        m["f"].clone().into_i64("f"),
        Error::Other(_),
        "`f` is float32"
    );
    assert_err!(
        m["f"].clone().into_bool("f"),
        Error::Other(_),
        "`f` is float32"
    );
    assert_err!(
        StateValue::try_from(m["b"].clone()),
        Error::Other(_),
        "bool"
    );
}

/// A safetensors buffer from a raw JSON header and data bytes.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[test]
fn corrupt_safetensors_are_format_errors() {
    let dir = temp_dir("corrupt");
    let good = performer_tensor::io::to_safetensors_bytes(&sample_tensors(), None).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("truncated header length", good[..5].to_vec()),
        ("truncated header", good[..20].to_vec()),
        ("truncated data", good[..good.len() - 3].to_vec()),
        ("garbage header", raw_file("this is not json", &[])),
        ("header of the wrong type", raw_file("[1, 2, 3]", &[])),
        ("absurd header length", {
            let mut b = u64::MAX.to_le_bytes().to_vec();
            b.extend_from_slice(b"{}");
            b
        }),
        (
            "offsets past the end",
            raw_file(
                r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8000000000]}}"#,
                &[0; 8],
            ),
        ),
        (
            "absurd shape",
            raw_file(
                r#"{"x":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
        ),
        (
            "shape and bytes disagree",
            raw_file(
                r#"{"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
        ),
        (
            "unknown dtype",
            raw_file(
                r#"{"x":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}}"#,
                &[0; 1],
            ),
        ),
        (
            "bool byte out of range",
            raw_file(
                r#"{"x":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}}"#,
                &[1, 2],
            ),
        ),
        (
            "unsupported dtype",
            raw_file(
                r#"{"x":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
        ),
    ];
    for (what, bytes) in cases {
        assert!(from_safetensors_bytes(&bytes).is_err(), "{what}: parsed");
        let path = dir.join(format!("{}.safetensors", what.replace(' ', "_")));
        std::fs::write(&path, &bytes).unwrap();
        match load_safetensors(&path) {
            Err(e @ Error::Format { .. }) => {
                assert!(
                    e.to_string().contains(path.to_str().unwrap()),
                    "{what}: {e} does not name the file"
                )
            }
            other => panic!("{what}: expected a format error, got {other:?}"),
        }
    }
    assert_err!(
        load_safetensors(dir.join("absent.safetensors")),
        Error::Io { .. },
        "absent.safetensors"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn half_precision_files_are_widened() {
    // 1.0, -2.0, the smallest subnormal, +inf, 65504 (largest half)
    let halves: [u16; 5] = [0x3C00, 0xC000, 0x0001, 0x7C00, 0x7BFF];
    let bytes: Vec<u8> = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
    let f16 = raw_file(
        r#"{"x":{"dtype":"F16","shape":[5],"data_offsets":[0,10]}}"#,
        &bytes,
    );
    let got = from_safetensors_bytes(&f16)
        .unwrap()
        .remove("x")
        .unwrap()
        .into_f32("x")
        .unwrap();
    assert_eq!(
        got.as_slice().unwrap(),
        &[1.0, -2.0, 2f32.powi(-24), f32::INFINITY, 65504.0]
    );
    let bf: Vec<u8> = [0x3F80u16, 0xC040]
        .iter()
        .flat_map(|h| h.to_le_bytes())
        .collect();
    let bf16 = raw_file(
        r#"{"x":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#,
        &bf,
    );
    let got = from_safetensors_bytes(&bf16)
        .unwrap()
        .remove("x")
        .unwrap()
        .into_f32("x")
        .unwrap();
    assert_eq!(got.as_slice().unwrap(), &[1.0, -3.0]);
}

#[test]
fn atomic_write_replaces_the_file_and_leaves_no_temporaries() {
    let dir = temp_dir("atomic");
    let path = dir.join("ckpt.safetensors");
    write_atomic(&path, &[7u8; 4096]).unwrap();
    write_atomic(&path, b"short").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"short");
    save_safetensors(&path, &sample_tensors(), None).unwrap();
    assert_eq!(load_safetensors(&path).unwrap(), sample_tensors());
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["ckpt.safetensors"], "temporary files left behind");
    // a target whose directory does not exist fails cleanly
    assert_err!(
        write_atomic(dir.join("no/such/dir/x"), b"x"),
        Error::Io { .. },
        "x"
    );
    // a directory in the way of the rename fails and leaves the directory and no temp file
    let blocker = dir.join("blocker");
    std::fs::create_dir(&blocker).unwrap();
    std::fs::write(blocker.join("inside"), b"keep").unwrap();
    assert_err!(write_atomic(&blocker, b"x"), Error::Io { .. }, "blocker");
    assert_eq!(std::fs::read(blocker.join("inside")).unwrap(), b"keep");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["blocker", "ckpt.safetensors"],
        "temporary files left behind"
    );
    // a path without a file name
    assert_err!(
        write_atomic("", b"x"),
        Error::Format { .. },
        "not a file path"
    );
    assert_err!(
        write_atomic(dir.join(".."), b"x"),
        Error::Format { .. },
        "not a file path"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn rng_below_zero_does_not_panic() {
    let mut g = performer_tensor::rng::Generator::seeded(1);
    assert_eq!(g.below(0), 0);
    assert!(g.below(3) < 3);
}

#[test]
fn absurd_sizes_are_shape_errors_not_aborts() {
    assert_err!(
        Tensor::try_full(&[usize::MAX, 2], 0.0),
        Error::Shape { .. },
        "full"
    );
    assert_eq!(Tensor::try_full(&[2, 0], 1.0).unwrap().shape(), &[2, 0]);
    // shapes that broadcast, but to more elements than memory can address
    let huge = performer_tensor::shape::broadcast_shapes("add", &[1 << 40, 1], &[1 << 40]);
    assert_err!(huge, Error::Shape { .. }, "too large");
}
