//! [`Dropout`] that follows its module's train/eval mode.

use performer_tensor::{Module, Result, Tensor, TrainingFlag, Visitor};

/// Dropout that follows its module's train/eval mode.
pub struct Dropout {
    /// Probability of zeroing an element.
    pub p: f32,
    training: TrainingFlag,
}

impl Dropout {
    /// Dropout with probability `p` (checked when applied).
    pub fn new(p: f32) -> Self {
        Dropout {
            p,
            training: TrainingFlag::default(),
        }
    }

    /// Applies dropout in training mode, the identity in eval mode.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.dropout(self.p, self.training.get())
    }

    /// Whether it is in training mode.
    pub fn is_training(&self) -> bool {
        self.training.get()
    }
}

impl Module for Dropout {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.training(&self.training);
    }
}
