//! Windowed softmax attention with the semantics of local-attention 1.11.2 as performer-pytorch
//! configures it (`autopad`, `look_backward = 1`, `look_forward = 1` unless causal, rotary
//! positions inside each window, scale `dim_head^-1/2`).
//!
//! Each window of `w` queries attends to the `L` keys of its look-around (the previous window,
//! its own, and when not causal the next). The reference's quirks are reproduced exactly:
//! - the sequence is padded with zeros to a multiple of `w`; padded keys are real keys of value
//!   0 (masked only by an input mask or, for causal attention, as future positions);
//! - windows outside the sequence contribute "filler" keys and values equal to -1, masked;
//! - masked scores are set to `-f32::MAX`, not `-inf`, so a query whose keys are all masked
//!   attends uniformly to all `L` slots (fillers and padding included);
//! - rotary embeddings use the half-split layout with positions `0..L` for the keys of the
//!   look-around and the last `w` of those for the queries.
//!
//! The op works window by window and never builds anything `n x n`: its memory is
//! O(n * L) for the backward's per-window key/value gradients. The backward recomputes the
//! scores (nothing but a dropout seed is saved).

use std::ops::Range;

use ndarray::{Array1, Array2, ArrayD, ArrayView2, ArrayViewMut2, Zip, s};
use performer_favor::heads::{HeadsOut, head, lead_shape};
use performer_tensor::fast_math::{dot, softmax_inplace};
use performer_tensor::gemm::{Threads, gemm_into};
use performer_tensor::rng::Generator;
use performer_tensor::{
    Buffer, CustomOp, Data, Error, Module, Result, StateValue, Tensor, TrainingFlag, Visitor,
    apply_custom_op,
};
use rayon::prelude::*;

const MASKED: f32 = -f32::MAX;

/// Local (windowed) attention over `(b, h, n, d)` queries, keys and values.
pub struct LocalAttention {
    /// Queries per window.
    pub window_size: usize,
    /// Queries see no later keys.
    pub causal: bool,
    /// Windows looked at before each window (1 in performer-pytorch).
    pub look_backward: usize,
    /// Windows looked at after each window (1 when not causal).
    pub look_forward: usize,
    /// Dropout on the attention weights.
    pub dropout: f32,
    /// Rotary frequencies `rel_pos.inv_freq` `(dim_head / 2)`.
    pub inv_freq: Buffer,
    training: TrainingFlag,
}

impl LocalAttention {
    /// performer-pytorch's configuration: `LocalAttention(window_size, causal, autopad=True,
    /// dropout, look_forward=int(not causal), rel_pos_emb_config=(dim_head, heads))`.
    pub fn new(window_size: usize, causal: bool, dropout: f32, dim_head: usize) -> Result<Self> {
        if window_size == 0 {
            return Err(Error::invalid(
                "LocalAttention",
                "local_window_size",
                0,
                "must be positive",
            ));
        }
        if dim_head == 0 || !dim_head.is_multiple_of(2) {
            return Err(Error::invalid(
                "LocalAttention",
                "dim_head",
                dim_head,
                "rotary embeddings need an even, positive head size",
            ));
        }
        if !(0.0..1.0).contains(&dropout) {
            return Err(Error::invalid(
                "LocalAttention",
                "dropout",
                dropout,
                "must lie in [0, 1)",
            ));
        }
        let inv_freq = Array1::from_iter(
            (0..dim_head)
                .step_by(2)
                .map(|i| 1.0 / 10000f32.powf(i as f32 / dim_head as f32)),
        );
        Ok(LocalAttention {
            window_size,
            causal,
            look_backward: 1,
            look_forward: usize::from(!causal),
            dropout,
            inv_freq: Buffer::new(inv_freq.into_dyn()),
            training: TrainingFlag::default(),
        })
    }

    /// Attention of `q` over `k`, `v`, all `(..., n, d)` with the same leading axes; `mask`
    /// `(b, n)` marks real tokens, `b` being the first axis.
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<ndarray::ArrayView2<'_, bool>>,
    ) -> Result<Tensor> {
        let lead = lead_shape("LocalAttention", "q", q.shape())?.to_vec();
        if k.shape() != q.shape() || v.shape() != q.shape() {
            return Err(Error::shape(
                "LocalAttention",
                format!(
                    "q {:?}, k {:?}, v {:?} must have one shape",
                    q.shape(),
                    k.shape(),
                    v.shape()
                ),
            ));
        }
        let (n, d) = (q.shape()[q.rank() - 2], q.shape()[q.rank() - 1]);
        if n == 0 || lead.contains(&0) {
            return Err(Error::invalid(
                "LocalAttention",
                "q",
                format!("shape {:?}", q.shape()),
                "needs at least one head of one position",
            ));
        }
        let freqs = match self.inv_freq.get() {
            StateValue::F32(a) => a.iter().copied().collect::<Vec<f32>>(),
            StateValue::I64(_) => {
                return Err(Error::Other(
                    "LocalAttention: inv_freq must be float".into(),
                ));
            }
        };
        if 2 * freqs.len() != d {
            return Err(Error::shape(
                "LocalAttention",
                format!(
                    "head size {d} does not match rotary frequencies of size {}",
                    2 * freqs.len()
                ),
            ));
        }
        let heads: usize = lead.iter().product();
        let mask = match mask {
            Some(m) => {
                let b = lead.first().copied().unwrap_or(1);
                if m.shape() != [b, n] {
                    return Err(Error::shape(
                        "LocalAttention",
                        format!("mask {:?} must be (b, n) = ({b}, {n})", m.shape()),
                    ));
                }
                Some(m.to_owned())
            }
            None => None,
        };
        let training = self.training.get() && self.dropout > 0.0;
        // Device tensors: the same attention in the device's tensor ops.
        #[cfg(feature = "cuda")]
        if !q.device().is_cpu() {
            let geometry = crate::local_attention_device::LocalGeometry {
                window: self.window_size,
                causal: self.causal,
                back: self.look_backward,
                fwd: self.look_forward,
                freqs: &freqs,
                dropout: if training { self.dropout } else { 0.0 },
            };
            return crate::local_attention_device::forward(
                &geometry,
                q,
                k,
                v,
                mask.as_ref().map(|m| m.view()),
            );
        }
        let seed = if training {
            performer_tensor::rng::with_rng(|g| g.next_u64())
        } else {
            0
        };
        let op = LocalAttentionOp {
            window: self.window_size,
            causal: self.causal,
            back: self.look_backward,
            fwd: self.look_forward,
            dropout: if training { self.dropout } else { 0.0 },
            seed,
            freqs,
            mask,
            heads_per_mask_row: heads / lead.first().copied().unwrap_or(1).max(1),
        };
        Ok(apply_custom_op(op, &[q, k, v])?.remove(0))
    }
}

impl Module for LocalAttention {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.buffer("rel_pos.inv_freq", &self.inv_freq);
        v.training(&self.training);
    }
}

struct LocalAttentionOp {
    window: usize,
    causal: bool,
    back: usize,
    fwd: usize,
    dropout: f32,
    seed: u64,
    freqs: Vec<f32>,
    mask: Option<ndarray::Array2<bool>>,
    heads_per_mask_row: usize,
}

/// One window's look-around: the key slots' absolute positions (-1 for fillers), rotated keys
/// and values, and the slots of windows inside the sequence (`live`; the others are fillers).
struct WindowKeys {
    positions: Vec<i64>,
    /// Rotated keys; filler rows are left unrotated at -1 (every score against them is masked,
    /// so they are never read).
    k_rot: Array2<f32>,
    v: Array2<f32>,
    live: Range<usize>,
}

/// cos and sin of `p f` for every look-around position `p` in `0..L` and rotary frequency `f`
/// (`L x d/2` each). Rotating a window's keys and queries reads them instead of evaluating
/// `sin_cos` per element, which cost as much as the window's products; the values are the bits
/// [`rotate_half_split`] computes.
struct RotaryTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RotaryTable {
    fn new(freqs: &[f32], positions: usize) -> Self {
        let half = freqs.len();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for &f in freqs {
                let (sn, cs) = (p as f32 * f).sin_cos();
                cos.push(cs);
                sin.push(sn);
            }
        }
        RotaryTable { half, cos, sin }
    }

    /// [`rotate_half_split`] of `row` at position `p` (`inverse`: the transpose), same bits.
    fn rotate(&self, row: &mut [f32], p: usize, inverse: bool) {
        let h = self.half;
        let cos = &self.cos[p * h..(p + 1) * h];
        let sin = &self.sin[p * h..(p + 1) * h];
        let (x1s, x2s) = row.split_at_mut(h);
        let lanes = x1s.iter_mut().zip(x2s.iter_mut()).zip(cos.iter().zip(sin));
        // Two loops with the direction fixed, so each vectorizes.
        if inverse {
            for ((x1, x2), (&cs, &sn)) in lanes {
                rotate_pair(x1, x2, cs, sn, true);
            }
        } else {
            for ((x1, x2), (&cs, &sn)) in lanes {
                rotate_pair(x1, x2, cs, sn, false);
            }
        }
    }
}

impl LocalAttentionOp {
    fn slots(&self) -> usize {
        self.window * (self.back + self.fwd + 1)
    }

    /// Gathers window `w_idx`'s key slots for one head (fillers -1, padding 0) and rotates
    /// those inside the sequence's windows.
    fn window_keys(
        &self,
        table: &RotaryTable,
        k: &ArrayView2<f32>,
        v: &ArrayView2<f32>,
        w_idx: usize,
        windows: usize,
    ) -> WindowKeys {
        let (n, d) = k.dim();
        let (w, l) = (self.window, self.slots());
        // Window index of the look-around's first block; blocks outside 0..windows are fillers.
        let first = w_idx as i64 - self.back as i64;
        let blocks = (self.back + self.fwd + 1) as i64;
        let live = ((-first).clamp(0, blocks) as usize * w)
            ..((windows as i64 - first).clamp(0, blocks) as usize * w);
        let mut positions = vec![-1i64; l];
        let mut k_rot = Array2::<f32>::from_elem((l, d), -1.0);
        let mut vs = Array2::<f32>::from_elem((l, d), -1.0);
        for slot in live.clone() {
            let p = (first * w as i64 + slot as i64) as usize;
            positions[slot] = p as i64;
            let mut kr = k_rot.row_mut(slot);
            let mut vr = vs.row_mut(slot);
            if p < n {
                kr.assign(&k.row(p));
                vr.assign(&v.row(p));
            } else {
                kr.fill(0.0);
                vr.fill(0.0);
            }
            table.rotate(
                kr.as_slice_mut().expect("owned rows are contiguous"),
                slot,
                false,
            );
        }
        WindowKeys {
            positions,
            k_rot,
            v: vs,
            live,
        }
    }

    /// Scaled, rotated queries of window `w_idx` (rows past the sequence are zeros).
    fn window_queries(
        &self,
        table: &RotaryTable,
        q: &ArrayView2<f32>,
        w_idx: usize,
    ) -> Array2<f32> {
        let (n, d) = q.dim();
        let l = self.slots();
        let scale = (d as f32).powf(-0.5);
        let mut out = Array2::<f32>::zeros((self.window, d));
        for r in 0..self.window {
            let p = w_idx * self.window + r;
            if p < n {
                Zip::from(out.row_mut(r))
                    .and(q.row(p))
                    .for_each(|o, &x| *o = x * scale);
            }
            table.rotate(
                out.row_mut(r).as_slice_mut().expect("contiguous"),
                l - self.window + r,
                false,
            );
        }
        out
    }

    /// Whether each key slot may be seen at all: inside the sequence's windows and kept by the
    /// input mask (padding positions past the mask are masked).
    fn keys_kept(
        &self,
        keys: &WindowKeys,
        mask_row: Option<ndarray::ArrayView1<bool>>,
    ) -> Vec<bool> {
        keys.positions
            .iter()
            .enumerate()
            .map(|(slot, &kp)| {
                keys.live.contains(&slot)
                    && match mask_row {
                        Some(m) => (kp as usize) < m.len() && m[kp as usize],
                        None => true,
                    }
            })
            .collect()
    }

    /// The slots row `r` of a window may see before causality cuts it off: a causal query at
    /// slot `back w + r` of the look-around sees no later slot.
    fn row_end(&self, r: usize) -> usize {
        if self.causal {
            self.back * self.window + r + 1
        } else {
            self.slots()
        }
    }

    /// Attention weights of one window after softmax (before dropout): `(w, L)`. A row whose
    /// keys are all masked attends uniformly to all `L` slots, fillers too.
    fn weights(&self, qr: &Array2<f32>, keys: &WindowKeys, kept: &[bool]) -> Result<Array2<f32>> {
        let live = keys.live.clone();
        let mut sim = Array2::<f32>::from_elem((self.window, self.slots()), MASKED);
        gemm_into(
            &mut sim.slice_mut(s![.., live.clone()]),
            &qr.view(),
            &keys.k_rot.slice(s![live, ..]).t(),
            1.0,
            0.0,
            Threads::Single,
        )?;
        for (r, mut row) in sim.rows_mut().into_iter().enumerate() {
            let row = row.as_slice_mut().expect("contiguous");
            let end = self.row_end(r);
            for (x, &keep) in row[..end].iter_mut().zip(kept) {
                if !keep {
                    *x = MASKED;
                }
            }
            row[end..].fill(MASKED);
            softmax_inplace(row);
        }
        Ok(sim)
    }

    /// The dropout mask (already scaled by 1/(1-p)) of one window of one head.
    fn dropout_mask(&self, head_idx: usize, w_idx: usize) -> Option<Array2<f32>> {
        if self.dropout == 0.0 {
            return None;
        }
        let mut g = Generator::seeded(
            self.seed ^ ((head_idx as u64) << 32) ^ (w_idx as u64).wrapping_mul(0x9E37_79B9),
        );
        let keep = 1.0 / (1.0 - self.dropout);
        Some(Array2::from_shape_simple_fn(
            (self.window, self.slots()),
            || {
                if g.next_f32() < self.dropout {
                    0.0
                } else {
                    keep
                }
            },
        ))
    }

    fn mask_row(&self, head_idx: usize) -> Option<ndarray::ArrayView1<'_, bool>> {
        self.mask
            .as_ref()
            .map(|m| m.row(head_idx / self.heads_per_mask_row.max(1)))
    }
}

impl CustomOp for LocalAttentionOp {
    type Saved = ();

    fn name(&self) -> &'static str {
        "local_attention"
    }

    fn forward(&self, inputs: &[&Data], _save: bool) -> Result<(Vec<ArrayD<f32>>, ())> {
        let shape = inputs[0].shape().to_vec();
        let lead = &shape[..shape.len() - 2];
        let (n, d) = (shape[shape.len() - 2], shape[shape.len() - 1]);
        let (q, k, v) = (inputs[0].view(), inputs[1].view(), inputs[2].view());
        let windows = n.div_ceil(self.window);
        let table = RotaryTable::new(&self.freqs, self.slots());
        let mut out = HeadsOut::zeros(lead, n, d);
        out.views()
            .into_par_iter()
            .enumerate()
            .try_for_each(|(h, mut o)| -> Result<()> {
                let (qh, kh, vh) = (head(&q, h)?, head(&k, h)?, head(&v, h)?);
                for w_idx in 0..windows {
                    let keys = self.window_keys(&table, &kh, &vh, w_idx, windows);
                    let qr = self.window_queries(&table, &qh, w_idx);
                    let kept = self.keys_kept(&keys, self.mask_row(h));
                    let mut attn = self.weights(&qr, &keys, &kept)?;
                    if let Some(dm) = self.dropout_mask(h, w_idx) {
                        attn *= &dm;
                    }
                    // Over all L slots even where fillers have weight 0: a shorter sum would
                    // be blocked differently by the GEMM and round differently.
                    let mut ow = Array2::<f32>::zeros((self.window, d));
                    gemm_into(
                        &mut ow.view_mut(),
                        &attn.view(),
                        &keys.v.view(),
                        1.0,
                        0.0,
                        Threads::Single,
                    )?;
                    let start = w_idx * self.window;
                    let rows = self.window.min(n - start);
                    o.slice_mut(s![start..start + rows, ..])
                        .assign(&ow.slice(s![..rows, ..]));
                }
                Ok(())
            })?;
        Ok((vec![out.into_array()], ()))
    }

    fn backward(
        &self,
        inputs: &[Data],
        _: &(),
        grads: &[Option<ArrayD<f32>>],
        needs: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        let Some(g) = &grads[0] else {
            return Ok(vec![None; 3]);
        };
        let shape = inputs[0].shape().to_vec();
        let lead = &shape[..shape.len() - 2];
        let (n, d) = (shape[shape.len() - 2], shape[shape.len() - 1]);
        let (q, k, v, gv) = (
            inputs[0].view(),
            inputs[1].view(),
            inputs[2].view(),
            g.view(),
        );
        let windows = n.div_ceil(self.window);
        let scale = (d as f32).powf(-0.5);
        let l = self.slots();
        let table = RotaryTable::new(&self.freqs, l);
        let mut dq = HeadsOut::zeros(lead, n, d);
        let mut dk = HeadsOut::zeros(lead, n, d);
        let mut dv = HeadsOut::zeros(lead, n, d);
        dq.views()
            .into_par_iter()
            .zip(dk.views())
            .zip(dv.views())
            .enumerate()
            .try_for_each(|(h, ((mut dqh, mut dkh), mut dvh))| -> Result<()> {
                let (qh, kh, vh, gh) = (head(&q, h)?, head(&k, h)?, head(&v, h)?, head(&gv, h)?);
                for w_idx in 0..windows {
                    let keys = self.window_keys(&table, &kh, &vh, w_idx, windows);
                    let qr = self.window_queries(&table, &qh, w_idx);
                    let kept = self.keys_kept(&keys, self.mask_row(h));
                    let attn = self.weights(&qr, &keys, &kept)?;
                    let dmask = self.dropout_mask(h, w_idx);
                    let start = w_idx * self.window;
                    let rows = self.window.min(n - start);
                    let mut go = Array2::<f32>::zeros((self.window, d));
                    go.slice_mut(s![..rows, ..])
                        .assign(&gh.slice(s![start..start + rows, ..]));
                    // Only the live slots' gradients are kept (fillers' are dropped), and the
                    // score gradients of filler slots are masked to zero, so every product
                    // below runs over the live slots alone.
                    let live = keys.live.clone();
                    // dv_slots = attn_d^T dO; d_attn = (dO v_slots^T) * dropout
                    let attn_d = dmask.as_ref().map(|m| &attn * m);
                    let attn_d = attn_d.as_ref().unwrap_or(&attn);
                    let mut dv_slots = Array2::<f32>::zeros((l, d));
                    gemm_into(
                        &mut dv_slots.slice_mut(s![live.clone(), ..]),
                        &attn_d.slice(s![.., live.clone()]).t(),
                        &go.view(),
                        1.0,
                        0.0,
                        Threads::Single,
                    )?;
                    let mut da = Array2::<f32>::zeros((self.window, l));
                    gemm_into(
                        &mut da.slice_mut(s![.., live.clone()]),
                        &go.view(),
                        &keys.v.slice(s![live.clone(), ..]).t(),
                        1.0,
                        0.0,
                        Threads::Single,
                    )?;
                    if let Some(m) = &dmask {
                        da *= m;
                    }
                    // softmax backward, zero where masked (masked_fill blocks the gradient)
                    for (r, (mut dr, ar)) in da.rows_mut().into_iter().zip(attn.rows()).enumerate()
                    {
                        let dr = dr.as_slice_mut().expect("contiguous");
                        let ar = ar.as_slice().expect("contiguous");
                        // In lanes (`fast_math::dot`): a running sum was a chain of dependent
                        // scalar adds. `dot` reads the shorter slice's length; both are rows of
                        // (window, slots) arrays.
                        debug_assert_eq!(dr.len(), ar.len(), "softmax backward rows");
                        let row_dot = dot(dr, ar);
                        let end = self.row_end(r);
                        for ((x, &a), &keep) in dr[..end].iter_mut().zip(ar).zip(&kept) {
                            *x = if keep { a * (*x - row_dot) } else { 0.0 };
                        }
                        dr[end..].fill(0.0);
                    }
                    // Over all L slots (da is 0 on fillers), for the same rounding as ever.
                    let mut dqr = Array2::<f32>::zeros((self.window, d));
                    gemm_into(
                        &mut dqr.view_mut(),
                        &da.view(),
                        &keys.k_rot.view(),
                        1.0,
                        0.0,
                        Threads::Single,
                    )?;
                    let mut dkr = Array2::<f32>::zeros((l, d));
                    gemm_into(
                        &mut dkr.slice_mut(s![live.clone(), ..]),
                        &da.slice(s![.., live]).t(),
                        &qr.view(),
                        1.0,
                        0.0,
                        Threads::Single,
                    )?;
                    for r in 0..rows {
                        let mut row = dqr.row_mut(r);
                        table.rotate(
                            row.as_slice_mut().expect("contiguous"),
                            l - self.window + r,
                            true,
                        );
                        Zip::from(dqh.row_mut(start + r))
                            .and(&row)
                            .for_each(|o, &x| *o = x * scale);
                    }
                    scatter_slots(
                        &mut dkr,
                        &dv_slots,
                        &keys.positions,
                        n,
                        |slot, row| table.rotate(row, slot, true),
                        &mut dkh,
                        &mut dvh,
                    );
                }
                Ok(())
            })?;
        Ok(vec![
            needs[0].then(|| dq.into_array()),
            needs[1].then(|| dk.into_array()),
            needs[2].then(|| dv.into_array()),
        ])
    }
}

/// Adds per-slot key (after un-rotating) and value gradients into the rows they came from;
/// fillers and padding rows are dropped.
fn scatter_slots(
    dkr: &mut Array2<f32>,
    dv_slots: &Array2<f32>,
    positions: &[i64],
    n: usize,
    unrotate: impl Fn(usize, &mut [f32]),
    dk: &mut ArrayViewMut2<f32>,
    dv: &mut ArrayViewMut2<f32>,
) {
    for (slot, &p) in positions.iter().enumerate() {
        if p < 0 || p as usize >= n {
            continue;
        }
        let mut row = dkr.row_mut(slot);
        unrotate(slot, row.as_slice_mut().expect("contiguous"));
        let mut dst = dk.row_mut(p as usize);
        dst += &row;
        let mut dst = dv.row_mut(p as usize);
        dst += &dv_slots.row(slot);
    }
}

/// `x cos(p f) + rotate_half(x) sin(p f)` for one row at position `p`, in place (`inverse`:
/// the transpose, for gradients). The half-split layout of local-attention's rotary embedding.
fn rotate_half_split(freqs: &[f32], row: &mut [f32], p: usize, inverse: bool) {
    let (x1s, x2s) = row.split_at_mut(freqs.len());
    for ((x1, x2), &f) in x1s.iter_mut().zip(x2s.iter_mut()).zip(freqs) {
        let (sn, cs) = (p as f32 * f).sin_cos();
        rotate_pair(x1, x2, cs, sn, inverse);
    }
}

/// One pair `(x1, x2)` rotated by the angle whose cosine and sine are `cs`, `sn`
/// (`inverse`: by its negative; `x2 (-sn)` is `-(x2 sn)` exactly, so both forms round alike).
#[inline(always)]
fn rotate_pair(x1: &mut f32, x2: &mut f32, cs: f32, sn: f32, inverse: bool) {
    let (a, b) = (*x1, *x2);
    if inverse {
        *x1 = a * cs + b * sn;
        *x2 = b * cs - a * sn;
    } else {
        *x1 = a * cs - b * sn;
        *x2 = b * cs + a * sn;
    }
}

/// A key slot of a decoding query's look-around, as the reference's parallel forward over the
/// prefix would see it.
#[derive(Clone, Copy)]
enum Slot {
    /// Before the sequence: key and value -1, masked.
    Filler,
    /// After the newest position (autopad): key and value 0, masked as future.
    Padding,
    /// A cached position (row index).
    Cached(usize),
}

/// The recent keys, values and mask a causal local head needs while decoding: the positions of
/// the current window and the one before it (at most `2 w` rows), unrotated.
#[derive(Clone, Debug)]
pub struct LocalCache {
    /// Absolute position of row 0.
    start: usize,
    /// Rows in use.
    len: usize,
    /// (heads, 2w, d).
    k: ndarray::Array3<f32>,
    v: ndarray::Array3<f32>,
    /// (b, 2w): whether each cached position is a real token.
    keep: ndarray::Array2<bool>,
    heads_per_row: usize,
}

impl LocalCache {
    /// Number of positions seen.
    pub fn position(&self) -> usize {
        self.start + self.len
    }
}

impl LocalAttention {
    pub(crate) fn freqs(&self) -> Result<Vec<f32>> {
        match self.inv_freq.get() {
            StateValue::F32(a) => Ok(a.iter().copied().collect()),
            StateValue::I64(_) => Err(Error::Other(
                "LocalAttention: inv_freq must be float".into(),
            )),
        }
    }

    /// First position the cache must keep once position `p` is the newest: the start of the
    /// window before `p`'s window.
    fn keep_from(&self, p: usize) -> usize {
        (p / self.window_size).saturating_sub(1) * self.window_size
    }

    /// A decoding cache from a prompt's keys and values `(heads, n, d)` (heads = b * local
    /// heads, batch-major) and its mask `(b, n)`.
    pub fn cache_from(
        &self,
        k: &ndarray::ArrayView3<f32>,
        v: &ndarray::ArrayView3<f32>,
        mask: Option<ndarray::ArrayView2<'_, bool>>,
        batch: usize,
    ) -> Result<LocalCache> {
        if !self.causal {
            return Err(Error::invalid(
                "LocalAttention::cache_from",
                "causal",
                false,
                "only causal local attention decodes incrementally",
            ));
        }
        let (heads, n, d) = k.dim();
        if v.dim() != (heads, n, d) || batch == 0 || heads % batch != 0 || n == 0 {
            return Err(Error::shape(
                "LocalAttention::cache_from",
                format!("k {:?}, v {:?} for batch {batch}", k.shape(), v.shape()),
            ));
        }
        let cap = 2 * self.window_size;
        let start = self.keep_from(n - 1);
        let len = n - start;
        let mut cache = LocalCache {
            start,
            len,
            k: ndarray::Array3::zeros((heads, cap, d)),
            v: ndarray::Array3::zeros((heads, cap, d)),
            keep: ndarray::Array2::from_elem((batch, cap), true),
            heads_per_row: heads / batch,
        };
        cache
            .k
            .slice_mut(s![.., ..len, ..])
            .assign(&k.slice(s![.., start.., ..]));
        cache
            .v
            .slice_mut(s![.., ..len, ..])
            .assign(&v.slice(s![.., start.., ..]));
        if let Some(m) = mask {
            if m.dim() != (batch, n) {
                return Err(Error::shape(
                    "LocalAttention::cache_from",
                    format!("mask {:?} must be ({batch}, {n})", m.shape()),
                ));
            }
            cache
                .keep
                .slice_mut(s![.., ..len])
                .assign(&m.slice(s![.., start..]));
        }
        Ok(cache)
    }

    /// Attention of the next position: appends its key, value and mask entry to `cache` and
    /// returns the output of its query `(heads, d)`, equal to the parallel forward over the
    /// whole prefix at that position (reference quirks included).
    pub fn step(
        &self,
        cache: &mut LocalCache,
        q: &ArrayView2<f32>,
        k: &ArrayView2<f32>,
        v: &ArrayView2<f32>,
        keep: Option<ndarray::ArrayView1<'_, bool>>,
    ) -> Result<Array2<f32>> {
        let (heads, d) = q.dim();
        if k.dim() != (heads, d)
            || v.dim() != (heads, d)
            || cache.k.shape()[0] != heads
            || cache.k.shape()[2] != d
        {
            return Err(Error::shape(
                "LocalAttention::step",
                format!(
                    "q {:?}, k {:?}, v {:?} vs cache {:?}",
                    q.shape(),
                    k.shape(),
                    v.shape(),
                    cache.k.shape()
                ),
            ));
        }
        let w = self.window_size;
        let p = cache.position();
        // drop the window that fell out of reach
        let from = self.keep_from(p);
        if from > cache.start {
            let drop = from - cache.start;
            let rest = cache.len - drop;
            for arr in [&mut cache.k, &mut cache.v] {
                let moved = arr.slice(s![.., drop..drop + rest, ..]).to_owned();
                arr.slice_mut(s![.., ..rest, ..]).assign(&moved);
            }
            let moved = cache.keep.slice(s![.., drop..drop + rest]).to_owned();
            cache.keep.slice_mut(s![.., ..rest]).assign(&moved);
            cache.start = from;
            cache.len = rest;
        }
        let row = cache.len;
        cache.k.slice_mut(s![.., row, ..]).assign(k);
        cache.v.slice_mut(s![.., row, ..]).assign(v);
        match keep {
            Some(m) => cache.keep.column_mut(row).assign(&m),
            None => cache.keep.column_mut(row).fill(true),
        }
        cache.len += 1;
        let freqs = self.freqs()?;
        let scale = (d as f32).powf(-0.5);
        let i = p / w;
        let base = i as i64 - 1;
        let mut out = Array2::<f32>::zeros((heads, d));
        let mut scores = vec![0f32; 2 * w];
        let mut key = vec![0f32; d];
        for h in 0..heads {
            let mut qr: Vec<f32> = q.row(h).iter().map(|x| x * scale).collect();
            rotate_half_split(&freqs, &mut qr, w + p % w, false);
            let b = h / cache.heads_per_row;
            let mut slots: Vec<Slot> = Vec::with_capacity(2 * w);
            for (index, score) in scores.iter_mut().enumerate() {
                let pos = base * w as i64 + index as i64;
                let slot = if pos < 0 {
                    Slot::Filler
                } else if pos as usize > p {
                    Slot::Padding
                } else {
                    Slot::Cached(pos as usize - cache.start)
                };
                let masked = match slot {
                    Slot::Filler | Slot::Padding => true,
                    Slot::Cached(r) => !cache.keep[[b, r]],
                };
                match slot {
                    Slot::Filler => key.fill(-1.0),
                    Slot::Padding => key.fill(0.0),
                    Slot::Cached(r) => key
                        .iter_mut()
                        .zip(cache.k.slice(s![h, r, ..]))
                        .for_each(|(x, &y)| *x = y),
                }
                rotate_half_split(&freqs, &mut key, index, false);
                *score = if masked {
                    MASKED
                } else {
                    qr.iter().zip(&key).map(|(a, b)| a * b).sum()
                };
                slots.push(slot);
            }
            softmax_inplace(&mut scores);
            let mut o = out.row_mut(h);
            for (wgt, slot) in scores.iter().zip(&slots) {
                match slot {
                    Slot::Filler => o.iter_mut().for_each(|x| *x -= wgt),
                    Slot::Padding => {}
                    Slot::Cached(r) => Zip::from(&mut o)
                        .and(cache.v.slice(s![h, *r, ..]))
                        .for_each(|x, &y| *x += wgt * y),
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::{RotaryTable, rotate_half_split};

    /// The forward's table gives the bits of the per-element `sin_cos` form the decoding step
    /// uses, at every look-around position and in both directions, and those are the bits of
    /// `x cos(p f) + rotate_half(x) sin(p f)` written out.
    #[test]
    fn the_rotary_table_rotates_as_the_per_element_form() {
        let freqs: Vec<f32> = (0..6).map(|i| 10000f32.powf(-(i as f32) / 6.0)).collect();
        let positions = 40;
        let table = RotaryTable::new(&freqs, positions);
        let row: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        for p in 0..positions {
            for inverse in [false, true] {
                let (mut a, mut b) = (row.clone(), row.clone());
                table.rotate(&mut a, p, inverse);
                rotate_half_split(&freqs, &mut b, p, inverse);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "position {p}, inverse {inverse}");
                // Written out: sign +1 forward, -1 inverse.
                let sign = if inverse { -1.0f32 } else { 1.0 };
                for j in 0..6 {
                    let (sn, cs) = (p as f32 * freqs[j]).sin_cos();
                    let sn = sign * sn;
                    assert_eq!(a[j].to_bits(), (row[j] * cs - row[j + 6] * sn).to_bits());
                    assert_eq!(
                        a[j + 6].to_bits(),
                        (row[j + 6] * cs + row[j] * sn).to_bits()
                    );
                }
            }
        }
    }
}
