//! Decoding steps of whole blocks as one parallel phase each: FAVOR+ self-attention and the
//! feed-forward.
//!
//! Taken op by op, a step of attention is three phases of the team (the query, key and value
//! products; the heads; the output product), each ending when its slowest chunk does. Here each
//! chunk takes a group of heads through all of it: the group's columns of the query, key and
//! value products, their rotation, the heads' steps of the FAVOR+ state, and the group's share
//! of the output product (the rows of the transposed output weight that multiply those heads'
//! outputs). The feed-forward likewise: a chunk takes a strip of hidden units through the first
//! product, the activation (and gate) and its share of the second product. The shares are added
//! at the end, in chunk order, so the result does not depend on which thread took which chunk.

use std::sync::Mutex;

use ndarray::{Array2, ArrayView2, ArrayViewMut2};
use performer_favor::{CausalState, FastAttention};
use performer_tensor::fast_math::GEMV_T_COLS;
use performer_tensor::ops::Activation;
use performer_tensor::team::Team;
use performer_tensor::{Error, Result};

use crate::linear::{Linear, RowWeights};
use crate::position::rotate_rows;

const OP: &str = "Attention::decode_rows";
const FF_OP: &str = "FeedForward::decode_rows";

/// The modules of a self-attention whose heads are all FAVOR+.
pub(crate) struct FavorAttention<'a> {
    pub to_q: &'a Linear,
    pub to_k: &'a Linear,
    pub to_v: &'a Linear,
    pub to_out: &'a Linear,
    pub fast_attention: &'a FastAttention,
    pub heads: usize,
    pub dim_head: usize,
}

/// One zeroed share of the last product per chunk: `b` rows of `dim_out` each.
fn shares(chunks: usize, b: usize, dim_out: usize) -> Vec<Mutex<Vec<f32>>> {
    (0..chunks)
        .map(|_| Mutex::new(vec![0f32; b * dim_out]))
        .collect()
}

impl FavorAttention<'_> {
    /// One new position per sequence: `x` `(b, dim)`, `favor` the heads' state (`b * heads`
    /// heads, batch-major), `rotary` the position's row of the rotary table (`[sin | cos]`,
    /// `dim_head` values). Returns the attention block's output `(b, dim)`.
    pub(crate) fn step(
        &self,
        x: &ArrayView2<f32>,
        rotary: Option<&[f32]>,
        favor: &mut CausalState,
        team: &Team,
    ) -> Result<Array2<f32>> {
        let (b, dim) = x.dim();
        let (heads, dh) = (self.heads, self.dim_head);
        let inner = heads * dh;
        let [wq, wk, wv] =
            [self.to_q, self.to_k, self.to_v].map(|l| RowWeights::of(OP, l, dim, inner));
        let (wq, wk, wv) = (wq?, wk?, wv?);
        let dim_out = self.to_out.out_features();
        let wo = RowWeights::of(OP, self.to_out, inner, dim_out)?;
        if let Some(row) = rotary
            && (row.len() != dh || !dh.is_multiple_of(2))
        {
            return Err(Error::shape(
                OP,
                format!(
                    "a rotary table row of {} values for heads of {dh}",
                    row.len()
                ),
            ));
        }
        if favor.heads() != b * heads {
            return Err(Error::shape(
                OP,
                format!(
                    "a state of {} heads for {b} sequences of {heads}",
                    favor.heads()
                ),
            ));
        }
        let x = x.as_standard_layout();
        let x = x.as_slice().expect("standard layout");
        // Nothing below fails once the state counts the new position (the widths, the table
        // and the state's heads were checked), so no head is left behind.
        let step = self.fast_attention.begin_step(favor)?;
        // Heads per chunk: enough for a full strip of the products' kernel.
        let group = (GEMV_T_COLS / dh.max(1)).clamp(1, heads.max(1));
        let groups = heads.div_ceil(group);
        let shares = shares(groups, b, dim_out);
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        team.for_each_chunk(groups, &|g| {
            let (h0, h1) = (g * group, ((g + 1) * group).min(heads));
            let (c0, width) = (h0 * dh, (h1 - h0) * dh);
            let mut share = shares[g].lock().unwrap_or_else(|e| e.into_inner());
            let [mut q, mut k, mut v, mut o] = [(); 4].map(|_| vec![0f32; width]);
            let result = (|| -> Result<()> {
                for (bi, xb) in (0..b).map(|bi| (bi, &x[bi * dim..(bi + 1) * dim])) {
                    wq.columns(c0, xb, &mut q);
                    wk.columns(c0, xb, &mut k);
                    wv.columns(c0, xb, &mut v);
                    if let Some(row) = rotary {
                        for t in [&mut q, &mut k] {
                            let mut rows = ArrayViewMut2::from_shape((h1 - h0, dh), &mut t[..])
                                .map_err(|e| Error::shape(OP, e.to_string()))?;
                            rotate_rows(&mut rows, row)?;
                        }
                    }
                    for h in h0..h1 {
                        let r = (h - h0) * dh..(h - h0 + 1) * dh;
                        step.step_head(
                            bi * heads + h,
                            &q[r.clone()],
                            &k[r.clone()],
                            &v[r.clone()],
                            &mut o[r],
                        )?;
                    }
                    // This group's share of the output product: its heads' outputs times
                    // their rows of the transposed output weight.
                    wo.rows_share(c0, &o, &mut share[bi * dim_out..(bi + 1) * dim_out]);
                }
                Ok(())
            })();
            if let Err(err) = result {
                failure
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(err);
            }
        });
        if let Some(err) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(err);
        }
        Ok(add_shares(&shares, wo.bias(), b, dim_out))
    }
}

/// `bias + sum of the chunks' shares` per sequence, `(b, dim_out)`, the shares in chunk order.
fn add_shares(
    shares: &[Mutex<Vec<f32>>],
    bias: Option<&[f32]>,
    b: usize,
    dim_out: usize,
) -> Array2<f32> {
    let mut y = Array2::<f32>::zeros((b, dim_out));
    for (bi, mut row) in y.rows_mut().into_iter().enumerate() {
        let row = row.as_slice_mut().expect("rows of a fresh array");
        if let Some(bias) = bias {
            row.copy_from_slice(bias);
        }
        for share in shares {
            let share = share.lock().unwrap_or_else(|e| e.into_inner());
            row.iter_mut()
                .zip(&share[bi * dim_out..(bi + 1) * dim_out])
                .for_each(|(y, s)| *y += s);
        }
    }
    y
}

/// The modules of a feed-forward block: `w2(act(w1 x))`, or with GLU `w2(act(a) * gate)` where
/// `[a | gate] = w1 x`.
pub(crate) struct FeedForwardParts<'a> {
    pub w1: &'a Linear,
    pub w2: &'a Linear,
    pub activation: Activation,
    pub glu: bool,
}

impl FeedForwardParts<'_> {
    /// The block on one position per sequence, `x` `(b, dim)`: `(b, dim_out)`.
    pub(crate) fn step(&self, x: &ArrayView2<f32>, team: &Team) -> Result<Array2<f32>> {
        let (b, dim) = x.dim();
        let first = self.w1.out_features();
        if self.glu && !first.is_multiple_of(2) {
            return Err(Error::shape(
                FF_OP,
                format!("a GLU's first layer needs an even width, got {first}"),
            ));
        }
        let hidden = if self.glu { first / 2 } else { first };
        let dim_out = self.w2.out_features();
        let w1 = RowWeights::of(FF_OP, self.w1, dim, first)?;
        let w2 = RowWeights::of(FF_OP, self.w2, hidden, dim_out)?;
        let x = x.as_standard_layout();
        let x = x.as_slice().expect("standard layout");
        let chunks = hidden.div_ceil(GEMV_T_COLS);
        let shares = shares(chunks, b, dim_out);
        team.for_each_chunk(chunks, &|c| {
            let c0 = c * GEMV_T_COLS;
            let width = GEMV_T_COLS.min(hidden - c0);
            let mut share = shares[c].lock().unwrap_or_else(|e| e.into_inner());
            let (mut a, mut gate) = (vec![0f32; width], vec![0f32; width]);
            for bi in 0..b {
                let xb = &x[bi * dim..(bi + 1) * dim];
                w1.columns(c0, xb, &mut a);
                self.activation.apply_inplace(&mut a);
                if self.glu {
                    w1.columns(hidden + c0, xb, &mut gate);
                    a.iter_mut().zip(&gate).for_each(|(a, g)| *a *= g);
                }
                // This strip's share of the second product: its hidden units times their rows
                // of the transposed second weight.
                w2.rows_share(c0, &a, &mut share[bi * dim_out..(bi + 1) * dim_out]);
            }
        });
        Ok(add_shares(&shares, w2.bias(), b, dim_out))
    }
}
