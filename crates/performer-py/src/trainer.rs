//! `Trainer(model, lr=..., clip=..., weight_decay=...)`: one training step (forward, backward,
//! gradient clipping, Adam or AdamW) in Rust per `step(batch)` call, the GIL released, and
//! the optimizer's state saved and loaded for resuming.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use performer_models::{AutoregressiveWrapper, PerformerEncDec, SeqInputs};
use performer_tensor::io::{load_safetensors, save_safetensors};
use performer_tensor::optim::{Adam, Optimizer, clip_grad_norm};
use performer_tensor::{Module, Tensor};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::arrays::{opt_mask, tokens};
use crate::errors::{OrRaise, type_error, value_error};
use crate::models::{PyPerformerEncDec, PyPerformerLM};
use crate::wrapper::PyAutoregressiveWrapper;

/// What a trainer trains.
enum Objective {
    /// A language model's next-token loss.
    Lm(Arc<AutoregressiveWrapper>),
    /// An encoder-decoder's loss on `(source, target)` batches.
    EncDec(Arc<PerformerEncDec>),
}

impl Objective {
    fn module(&self) -> &dyn Module {
        match self {
            Objective::Lm(ar) => ar.net.as_ref(),
            Objective::EncDec(ed) => ed.as_ref(),
        }
    }
}

/// A batch as the objective reads it.
enum Batch {
    Lm(ndarray::Array2<i64>, Option<ndarray::Array2<bool>>),
    EncDec(ndarray::Array2<i64>, ndarray::Array2<i64>),
}

/// Trains a `PerformerLM` (with `AutoregressiveWrapper`'s loss; pass a wrapper for its
/// `ignore_index`), an `AutoregressiveWrapper` or a `PerformerEncDec` (batches are
/// `(source, target)` tuples).
#[pyclass(name = "Trainer", module = "performer_rs")]
pub struct PyTrainer {
    objective: Objective,
    optimizer: Adam,
    clip: Option<f32>,
}

#[pymethods]
impl PyTrainer {
    /// `optimizer` is `"adamw"` (decoupled weight decay, as `torch.optim.AdamW`) or `"adam"`
    /// (weight decay added to the gradient, as `torch.optim.Adam`); `clip` is the maximum
    /// gradient norm (`torch.nn.utils.clip_grad_norm_`), None for no clipping.
    #[new]
    #[pyo3(signature = (model, lr = 1e-3, clip = None, weight_decay = 0.0, betas = (0.9, 0.999),
        eps = 1e-8, optimizer = "adamw"))]
    fn new(
        model: &Bound<'_, PyAny>,
        lr: f64,
        clip: Option<f64>,
        weight_decay: f64,
        betas: (f64, f64),
        eps: f64,
        optimizer: &str,
    ) -> PyResult<Self> {
        let op = "Trainer";
        let objective = if let Ok(lm) = model.cast::<PyPerformerLM>() {
            Objective::Lm(Arc::new(AutoregressiveWrapper::new(lm.get().lm.clone())))
        } else if let Ok(ar) = model.cast::<PyAutoregressiveWrapper>() {
            Objective::Lm(ar.get().inner.clone())
        } else if let Ok(ed) = model.cast::<PyPerformerEncDec>() {
            Objective::EncDec(ed.get().model.clone())
        } else {
            return Err(type_error(
                op,
                "model",
                format!(
                    "must be a PerformerLM, AutoregressiveWrapper or PerformerEncDec, not {}",
                    model.get_type().name()?
                ),
            ));
        };
        for (name, v, ok) in [
            ("lr", lr, lr > 0.0 && lr.is_finite()),
            (
                "weight_decay",
                weight_decay,
                weight_decay >= 0.0 && weight_decay.is_finite(),
            ),
            ("eps", eps, eps > 0.0),
            ("betas[0]", betas.0, (0.0..1.0).contains(&betas.0)),
            ("betas[1]", betas.1, (0.0..1.0).contains(&betas.1)),
        ] {
            if !ok {
                return Err(value_error(op, name, format!("= {v} is out of range")));
            }
        }
        if let Some(c) = clip
            && !(c > 0.0 && c.is_finite())
        {
            return Err(value_error(op, "clip", format!("= {c} must be positive")));
        }
        let params = objective.module().named_parameters();
        let mut adam = match optimizer {
            "adamw" => Adam::adamw(params, lr as f32),
            "adam" => Adam::new(params, lr as f32),
            other => {
                return Err(value_error(
                    op,
                    "optimizer",
                    format!("= {other:?}: expected \"adam\" or \"adamw\""),
                ));
            }
        };
        adam.weight_decay = weight_decay as f32;
        adam.betas = (betas.0 as f32, betas.1 as f32);
        adam.eps = eps as f32;
        Ok(PyTrainer {
            objective,
            optimizer: adam,
            clip: clip.map(|c| c as f32),
        })
    }

    /// One step on `batch` (token ids `(b, n)`; `(source, target)` for an encoder-decoder):
    /// the model in training mode, forward, backward, clipping and the optimizer update, in
    /// Rust. Returns the loss before the update.
    #[pyo3(signature = (batch, mask = None))]
    fn step(
        &mut self,
        py: Python<'_>,
        batch: &Bound<'_, PyAny>,
        mask: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<f64> {
        let op = "Trainer.step";
        let batch = match &self.objective {
            Objective::Lm(_) => Batch::Lm(tokens(op, "batch", batch)?, opt_mask(op, "mask", mask)?),
            Objective::EncDec(_) => {
                let pair = batch
                    .cast::<PyTuple>()
                    .ok()
                    .filter(|t| t.len() == 2)
                    .ok_or_else(|| {
                        type_error(
                            op,
                            "batch",
                            "must be a (source, target) tuple for a PerformerEncDec",
                        )
                    })?;
                Batch::EncDec(
                    tokens(op, "batch[0]", &pair.get_item(0)?)?,
                    tokens(op, "batch[1]", &pair.get_item(1)?)?,
                )
            }
        };
        let (objective, optimizer, clip) = (&self.objective, &mut self.optimizer, self.clip);
        // Without the GIL, and on a rayon worker: a step of small ops runs 10-20% faster there
        // than from the calling thread (`performer_tensor::team::on_pool` says why), and faster
        // again with the other workers kept awake (`keep_pool_warm`).
        py.detach(move || {
            performer_tensor::team::on_warm_pool(move || -> performer_tensor::Result<f64> {
                let module = objective.module();
                module.set_training(true);
                let loss: Tensor = match (objective, &batch) {
                    (Objective::Lm(ar), Batch::Lm(x, mask)) => ar.loss(
                        &x.view(),
                        &SeqInputs {
                            mask: mask.as_ref().map(|m| m.view()),
                            ..Default::default()
                        },
                    )?,
                    (Objective::EncDec(ed), Batch::EncDec(src, tgt)) => {
                        ed.loss(&src.view(), &tgt.view(), None, None)?
                    }
                    _ => unreachable!("the batch was read for this objective"),
                };
                let value = loss.item()?;
                let mut grads = loss.backward()?;
                if let Some(max_norm) = clip {
                    clip_grad_norm(&mut grads, &module.parameters(), max_norm);
                }
                optimizer.step(&grads)?;
                Ok(f64::from(value))
            })
        })
        .or_raise()
    }

    /// The learning rate (settable, for schedules).
    #[getter]
    fn lr(&self) -> f64 {
        f64::from(self.optimizer.lr())
    }

    #[setter]
    fn set_lr(&mut self, lr: f64) -> PyResult<()> {
        if !(lr > 0.0 && lr.is_finite()) {
            return Err(value_error(
                "Trainer",
                "lr",
                format!("= {lr} must be positive"),
            ));
        }
        self.optimizer.set_lr(lr as f32);
        Ok(())
    }

    /// Steps taken.
    #[getter]
    fn steps(&self) -> u64 {
        self.optimizer.steps()
    }

    /// Writes the optimizer's state (moments by parameter name, the step count) to `path` as
    /// safetensors, atomically; with the model's `save_pretrained`, a run resumes exactly.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let state = self.optimizer.state_dict();
        py.detach(|| save_safetensors(&path, &state, None))
            .or_raise()
    }

    /// Restores the state `save` wrote.
    fn load(&mut self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let state: BTreeMap<_, _> = py.detach(|| load_safetensors(&path)).or_raise()?;
        self.optimizer.load_state_dict(&state).or_raise()
    }
}
