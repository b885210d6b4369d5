//! `AutoregressiveWrapper`: the next-token loss of a causal PerformerLM and generation.

use ndarray::{Array2, ArrayView2, Axis, s};
use performer_tensor::rng::Generator;
use performer_tensor::{Error, Module, Result, Tensor, Visitor};

use crate::lm::{LmInputs, PerformerLM};
use crate::sampling::{GenerateOptions, apply_repetition_penalty, sample};

/// Wraps a language model with performer-pytorch's loss (targets are the inputs shifted by
/// one) and generation.
pub struct AutoregressiveWrapper {
    /// The model (`net.*` in state dicts).
    pub net: PerformerLM,
    /// Targets equal to this are ignored by the loss.
    pub ignore_index: i64,
    /// Fills sequences after their end token.
    pub pad_value: i64,
}

/// Optional inputs of [`AutoregressiveWrapper::loss`] and generation.
#[derive(Clone, Copy, Default)]
pub struct SeqInputs<'a> {
    /// Padding mask of the tokens, `(b, n)` or `(b, n - 1)`.
    pub mask: Option<ArrayView2<'a, bool>>,
    /// Encoder output for a decoder.
    pub context: Option<&'a Tensor>,
    /// Its mask.
    pub context_mask: Option<ArrayView2<'a, bool>>,
}

impl AutoregressiveWrapper {
    /// Wraps `net` (ignore_index 0, pad_value 0, as the reference's defaults).
    pub fn new(net: PerformerLM) -> Self {
        AutoregressiveWrapper {
            net,
            ignore_index: 0,
            pad_value: 0,
        }
    }

    /// Mean cross-entropy of predicting `x[:, 1:]` from `x[:, :-1]`. A mask of the full length
    /// is trimmed to `n - 1` as the reference does.
    pub fn loss(&self, x: &ArrayView2<i64>, inputs: &SeqInputs<'_>) -> Result<Tensor> {
        let (b, n) = x.dim();
        if n < 2 {
            return Err(Error::invalid(
                "AutoregressiveWrapper::loss",
                "sequence length",
                n,
                "needs at least 2 tokens (input and target)",
            ));
        }
        let xi = x.slice(s![.., ..n - 1]);
        let xo = x.slice(s![.., 1..]).to_owned();
        let mask = inputs.mask.map(|m| {
            if m.ncols() == n {
                m.slice_move(s![.., ..n - 1])
            } else {
                m
            }
        });
        let logits = self.net.forward(
            &xi,
            &LmInputs {
                mask,
                context: inputs.context,
                context_mask: inputs.context_mask,
                return_encodings: false,
            },
        )?;
        let _ = b;
        logits
            .permute(&[0, 2, 1])?
            .cross_entropy(&xo.into_dyn().view(), Some(self.ignore_index))
    }

    /// Generates up to `seq_len` tokens after `start` `(b, t)`; see
    /// [`AutoregressiveWrapper::generate_recompute`] for the semantics.
    pub fn generate(
        &self,
        start: &ArrayView2<i64>,
        seq_len: usize,
        opts: &GenerateOptions,
        inputs: &SeqInputs<'_>,
    ) -> Result<Array2<i64>> {
        self.generate_recompute(start, seq_len, opts, inputs)
    }

    /// Generates `seq_len` tokens after `start` `(b, t)` by re-running the model over the last
    /// `max_seq_len` tokens for each new token (performer-pytorch's way). Returns `(b, <=
    /// seq_len)`: generation stops early once every sequence has produced `eos_token`; a
    /// sequence that has ended is filled with `pad_value` (the reference stops only when all
    /// sequences produce the end token at the same step).
    pub fn generate_recompute(
        &self,
        start: &ArrayView2<i64>,
        seq_len: usize,
        opts: &GenerateOptions,
        inputs: &SeqInputs<'_>,
    ) -> Result<Array2<i64>> {
        opts.validate()?;
        let (b, t) = start.dim();
        if t == 0 {
            return Err(Error::invalid(
                "generate",
                "start_tokens",
                "empty",
                "needs at least one token per sequence",
            ));
        }
        let mut out = start.to_owned();
        let mut mask = match inputs.mask {
            Some(m) if m.dim() != (b, t) => {
                return Err(Error::shape(
                    "generate",
                    format!(
                        "mask {:?} must match the start tokens ({b}, {t})",
                        m.shape()
                    ),
                ));
            }
            Some(m) => m.to_owned(),
            None => Array2::from_elem((b, t), true),
        };
        let context_mask = match (inputs.context, inputs.context_mask) {
            (Some(c), None) => Some(Array2::from_elem((b, c.shape()[1]), true)),
            (_, m) => m.map(|m| m.to_owned()),
        };
        let was_training = crate::is_training(&self.net);
        self.net.set_training(false);
        let mut rng = Generator::seeded(opts.seed);
        let mut done = vec![false; b];
        let result = (|| -> Result<()> {
            for _ in 0..seq_len {
                let len = out.ncols();
                let from = len.saturating_sub(self.net.config().max_seq_len);
                let x = out.slice(s![.., from..]);
                let m = mask.slice(s![.., from..]);
                let mut logits = self.net.last_logits(
                    &x,
                    &LmInputs {
                        mask: Some(m),
                        context: inputs.context,
                        context_mask: context_mask.as_ref().map(|m| m.view()),
                        return_encodings: false,
                    },
                )?;
                let mut next = Vec::with_capacity(b);
                for (i, mut row) in logits.axis_iter_mut(Axis(0)).enumerate() {
                    if done[i] {
                        next.push(self.pad_value);
                        continue;
                    }
                    if opts.repetition_penalty != 1.0 {
                        let seq = out.row(i);
                        let recent: Vec<i64> = seq
                            .iter()
                            .skip(len.saturating_sub(opts.repetition_penalty_ctx))
                            .copied()
                            .collect();
                        apply_repetition_penalty(&mut row, &recent, opts.repetition_penalty);
                    }
                    let tok = sample(&row.view(), opts, &mut rng)?;
                    if opts.eos_token == Some(tok) {
                        done[i] = true;
                    }
                    next.push(tok);
                }
                let col = Array2::from_shape_vec((b, 1), next).expect("b tokens");
                out = ndarray::concatenate(Axis(1), &[out.view(), col.view()])
                    .map_err(|e| Error::shape("generate", e.to_string()))?;
                mask = ndarray::concatenate(
                    Axis(1),
                    &[mask.view(), Array2::from_elem((b, 1), true).view()],
                )
                .map_err(|e| Error::shape("generate", e.to_string()))?;
                if done.iter().all(|&d| d) {
                    break;
                }
            }
            Ok(())
        })();
        self.net.set_training(was_training);
        result?;
        Ok(out.slice(s![.., t..]).to_owned())
    }
}

impl Module for AutoregressiveWrapper {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.child("net", &self.net);
    }
}
