//! `AutoregressiveWrapper`: the next-token loss of a causal PerformerLM and generation.

use std::sync::Arc;

use ndarray::{Array2, ArrayView2, Axis, s};
use performer_tensor::rng::Generator;
use performer_tensor::{Error, Module, Result, Tensor, Visitor};

use crate::lm::{LmInputs, PerformerLM};
use crate::sampling::{GenerateOptions, apply_repetition_penalty, sample};

/// Wraps a language model with performer-pytorch's loss (targets are the inputs shifted by
/// one) and generation.
pub struct AutoregressiveWrapper {
    /// The model (`net.*` in state dicts), shared: several wrappers (with their own
    /// `ignore_index` and `pad_value`) may train or sample the same weights, as a PyTorch
    /// wrapper holds a reference to its net.
    pub net: Arc<PerformerLM>,
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
    /// Wraps `net` (ignore_index 0, pad_value 0, as the reference's defaults); an
    /// `Arc<PerformerLM>` is shared with the caller.
    pub fn new(net: impl Into<Arc<PerformerLM>>) -> Self {
        AutoregressiveWrapper {
            net: net.into(),
            ignore_index: 0,
            pad_value: 0,
        }
    }

    /// Mean cross-entropy of predicting `x[:, 1:]` from `x[:, :-1]`. A mask of the full length
    /// is trimmed to `n - 1` as the reference does.
    pub fn loss(&self, x: &ArrayView2<i64>, inputs: &SeqInputs<'_>) -> Result<Tensor> {
        let n = x.ncols();
        if n < 2 {
            return Err(Error::invalid(
                "AutoregressiveWrapper::loss",
                "sequence length",
                n,
                "needs at least 2 tokens (input and target)",
            ));
        }
        // The last column is only a target: check it here, as the model checks the inputs.
        let num_tokens = self.net.config().num_tokens;
        if let Some(&bad) = x
            .column(n - 1)
            .iter()
            .find(|&&t| (t < 0 || t as usize >= num_tokens) && t != self.ignore_index)
        {
            return Err(Error::Index {
                op: "AutoregressiveWrapper::loss target token ids".into(),
                index: bad,
                size: num_tokens,
            });
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
        if !logits.device().is_cpu() {
            // The device's cross-entropy takes (N, C) rows: the same mean over the same tokens.
            let c = logits.shape()[2] as isize;
            let targets = xo
                .into_shape_with_order(xi.len())
                .map_err(|e| Error::shape("AutoregressiveWrapper::loss", e.to_string()))?;
            return logits
                .reshape(&[-1, c])?
                .cross_entropy(&targets.into_dyn().view(), Some(self.ignore_index));
        }
        logits
            .permute(&[0, 2, 1])?
            .cross_entropy(&xo.into_dyn().view(), Some(self.ignore_index))
    }

    /// Generates up to `seq_len` tokens after `start` `(b, t)` and returns them `(b, <=
    /// seq_len)`.
    ///
    /// A causal model generates in constant time per token: the prompt primes a
    /// [`crate::DecodingState`] in one parallel pass, then each token is one step of the state, with
    /// the logits of a full forward over the prefix. Once the sequence reaches `max_seq_len` it
    /// falls back to the reference's sliding window (re-running the model over the last
    /// `max_seq_len` tokens for each new token), which a state cannot do since it cannot forget
    /// tokens. Non-causal models always re-run.
    ///
    /// Generation stops early once every sequence has produced `eos_token`; a sequence that has
    /// ended is filled with `pad_value` (the reference stops only when all sequences produce the
    /// end token at the same step).
    pub fn generate(
        &self,
        start: &ArrayView2<i64>,
        seq_len: usize,
        opts: &GenerateOptions,
        inputs: &SeqInputs<'_>,
    ) -> Result<Array2<i64>> {
        self.generate_impl(start, seq_len, opts, inputs, self.net.config().causal)
    }

    /// [`AutoregressiveWrapper::generate`] re-running the model over the last `max_seq_len`
    /// tokens for every new token, as performer-pytorch does (for comparison and tests).
    pub fn generate_recompute(
        &self,
        start: &ArrayView2<i64>,
        seq_len: usize,
        opts: &GenerateOptions,
        inputs: &SeqInputs<'_>,
    ) -> Result<Array2<i64>> {
        self.generate_impl(start, seq_len, opts, inputs, false)
    }

    fn generate_impl(
        &self,
        start: &ArrayView2<i64>,
        seq_len: usize,
        opts: &GenerateOptions,
        inputs: &SeqInputs<'_>,
        use_state: bool,
    ) -> Result<Array2<i64>> {
        opts.validate()?;
        let (b, t) = start.dim();
        if t == 0 || b == 0 {
            return Err(Error::invalid(
                "generate",
                "start_tokens",
                format!("shape {:?}", start.shape()),
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
            (Some(c), None) => Some(Array2::from_elem(
                (b, c.shape().get(1).copied().unwrap_or(0)),
                true,
            )),
            (_, m) => m.map(|m| m.to_owned()),
        };
        let max = self.net.config().max_seq_len;
        // A model in eval mode is only read, so threads sharing it (`Arc`) may generate at
        // once; one in training mode is switched to eval for the call and back, which is a
        // write: put a shared model in eval mode first.
        let was_training = crate::mode::is_training(self.net.as_ref());
        if was_training {
            self.net.set_training(false);
        }
        // On a rayon worker (when called from another thread): the prompt's pass and the
        // steps' team then use the pool's threads only, one per core (see `on_pool`). The other
        // workers are kept awake meanwhile (`keep_pool_warm`): the prompt's pass is hundreds
        // of parallel ops, each of which waited for a sleeping worker to wake (generate-512:
        // 2-8% faster in eight alternating pairs, f32 and bf16 weights).
        let result = performer_tensor::team::on_warm_pool(|| -> Result<()> {
            let mut state = match use_state && t <= max {
                true => Some(self.net.decoding_state(
                    b,
                    inputs.context,
                    context_mask.as_ref().map(|m| m.view()),
                )?),
                false => None,
            };
            let mut next_logits = match state.as_mut() {
                Some(st) => Some(self.net.decode(st, &out.view(), Some(mask.view()))?),
                None => None,
            };
            let mut rng = Generator::seeded(opts.seed);
            let mut done = vec![false; b];
            // One parallel region for all the steps (after the prompt's pass, which uses
            // rayon's threads itself): its helper threads stay between tokens.
            performer_tensor::team::with_team(|_| -> Result<()> {
                for step in 0..seq_len {
                    let len = out.ncols();
                    let mut logits = match next_logits.take() {
                        Some(l) => l,
                        None => {
                            let from = len.saturating_sub(max);
                            let window = LmInputs {
                                mask: Some(mask.slice(s![.., from..])),
                                context: inputs.context,
                                context_mask: context_mask.as_ref().map(|m| m.view()),
                                return_encodings: false,
                            };
                            self.net.last_logits(&out.slice(s![.., from..]), &window)?
                        }
                    };
                    let mut next = Vec::with_capacity(b);
                    for (i, mut row) in logits.axis_iter_mut(Axis(0)).enumerate() {
                        if done[i] {
                            next.push(self.pad_value);
                            continue;
                        }
                        if opts.repetition_penalty != 1.0 {
                            let recent: Vec<i64> = out
                                .row(i)
                                .iter()
                                .skip(len.saturating_sub(opts.repetition_penalty_ctx))
                                .copied()
                                .collect();
                            apply_repetition_penalty(&mut row, &recent, opts.repetition_penalty);
                        }
                        let tok = sample(&row.view(), opts, &mut rng)?;
                        done[i] |= opts.eos_token == Some(tok);
                        next.push(tok);
                    }
                    let col = Array2::from_shape_vec((b, 1), next)
                        .map_err(|e| Error::shape("generate", e.to_string()))?;
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
                    // Within max_seq_len the state takes the new token; past it, the sliding window.
                    if out.ncols() > max {
                        state = None;
                    }
                    // The last token needs no logits after it.
                    if let Some(st) = state.as_mut().filter(|_| step + 1 < seq_len) {
                        next_logits = Some(self.net.decode(st, &col.view(), None)?);
                    }
                }
                Ok(())
            })
        });
        if was_training {
            self.net.set_training(true);
        }
        result?;
        Ok(out.slice(s![.., t..]).to_owned())
    }
}

impl Module for AutoregressiveWrapper {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.child("net", self.net.as_ref());
    }
}
