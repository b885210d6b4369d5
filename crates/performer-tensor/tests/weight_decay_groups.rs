//! `Adam::exclude_from_weight_decay`: an excluded parameter steps exactly as under AdamW with
//! no decay, the others exactly as under plain AdamW (PyTorch's two parameter groups).

use performer_tensor::optim::{Adam, Optimizer};
use performer_tensor::{Param, Tensor};

fn steps(opt: &mut Adam, params: &[Param], n: usize) {
    for _ in 0..n {
        let mut loss = None::<Tensor>;
        for p in params {
            let term = p.tensor().mul(&p.tensor()).unwrap().sum_all();
            loss = Some(match loss {
                Some(l) => l.add(&term).unwrap(),
                None => term,
            });
        }
        let grads = loss.unwrap().backward().unwrap();
        opt.step(&grads).unwrap();
    }
}

fn values(p: &Param) -> Vec<f32> {
    p.tensor().to_vec()
}

#[test]
fn excluded_parameters_step_without_decay_and_the_rest_with_it() {
    let init_w = Tensor::randn(&[3, 4]).to_array();
    let init_b = Tensor::randn(&[4]).to_array();
    let run = |wd: f32, exclude_vectors: bool| {
        let (w, b) = (Param::new(init_w.clone()), Param::new(init_b.clone()));
        let mut opt = Adam::adamw(vec![("w".into(), w.clone()), ("b".into(), b.clone())], 0.1);
        opt.weight_decay = wd;
        if exclude_vectors {
            opt.exclude_from_weight_decay(|_, p| p.shape().len() < 2);
        }
        steps(&mut opt, &[w.clone(), b.clone()], 5);
        (values(&w), values(&b))
    };
    let (w_grouped, b_grouped) = run(0.5, true);
    let (w_all, b_all) = run(0.5, false);
    let (w_none, b_none) = run(0.0, false);
    assert_eq!(w_grouped, w_all, "the matrix keeps its decay");
    assert_eq!(b_grouped, b_none, "the vector steps as with no decay");
    assert_ne!(b_all, b_none, "decay changes the vector when it applies");
    assert_ne!(w_all, w_none);
}
