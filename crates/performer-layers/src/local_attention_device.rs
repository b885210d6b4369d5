//! [`LocalAttention`](crate::LocalAttention) on device tensors (feature `cuda`): the same
//! windows, fillers, padding, rotary layout and masking as the host op (see
//! `local_attention.rs`), written in the device's tensor ops so that autograd gives the
//! backward.
//!
//! The look-around of every window is gathered without an index: the keys are padded with
//! zeros to whole windows and with `look_backward` (`look_forward`) windows of -1 fillers in
//! front (behind), and block `o` of every window's look-around is then the contiguous run of
//! windows starting at window `o` of that padded sequence. Masked scores are set to `-f32::MAX`
//! (not `-inf`) by `sim * keep + fill`, with `keep` in {0, 1} and `fill` in {0, -f32::MAX}: the
//! kept scores pass unchanged, a fully masked query attends uniformly, as in the reference.

use ndarray::{Array2, ArrayD, ArrayView2, IxDyn};
use performer_tensor::{Result, Tensor};

/// The settings of one call (from the layer).
pub(crate) struct LocalGeometry<'a> {
    pub(crate) window: usize,
    pub(crate) causal: bool,
    pub(crate) back: usize,
    pub(crate) fwd: usize,
    /// Rotary frequencies, `d / 2`.
    pub(crate) freqs: &'a [f32],
    /// Dropout on the attention weights (0 outside training).
    pub(crate) dropout: f32,
}

/// `x cos + rotate_half(x) sin` for rows at positions `first..first + rows` (half-split
/// layout): the `(rows, d)` tables of cos and sin, each frequency on both halves.
fn rotary_tables(freqs: &[f32], first: usize, rows: usize) -> (ArrayD<f32>, ArrayD<f32>) {
    let half = freqs.len();
    let d = 2 * half;
    let (mut cos, mut sin) = (Array2::zeros((rows, d)), Array2::zeros((rows, d)));
    for r in 0..rows {
        for (j, &f) in freqs.iter().enumerate() {
            let (s, c) = (((first + r) as f32) * f).sin_cos();
            cos[[r, j]] = c;
            cos[[r, j + half]] = c;
            sin[[r, j]] = s;
            sin[[r, j + half]] = s;
        }
    }
    (cos.into_dyn(), sin.into_dyn())
}

/// `rotate_half` as a product: `x R = [-x2 | x1]`.
fn rotate_half_matrix(d: usize) -> ArrayD<f32> {
    let half = d / 2;
    let mut r = Array2::zeros((d, d));
    for j in 0..half {
        r[[j + half, j]] = -1.0;
        r[[j, j + half]] = 1.0;
    }
    r.into_dyn()
}

/// Attention of `q` over `k`, `v` `(lead..., n, d)` on their device; `mask` `(lead[0], n)`
/// (checked by the caller).
pub(crate) fn forward(
    g: &LocalGeometry<'_>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<ArrayView2<'_, bool>>,
) -> Result<Tensor> {
    let device = q.device();
    let up = |a: ArrayD<f32>| Tensor::new(a).to_device(device);
    let shape = q.shape().to_vec();
    let r = shape.len();
    let lead = &shape[..r - 2];
    let (n, d) = (shape[r - 2], shape[r - 1]);
    let w = g.window;
    let windows = n.div_ceil(w);
    let pad = windows * w - n;
    let blocks = g.back + g.fwd + 1;
    let slots = w * blocks;
    let with_windows = |t: &Tensor, rows: usize| -> Result<Tensor> {
        let mut s: Vec<isize> = lead.iter().map(|&x| x as isize).collect();
        s.extend([windows as isize, rows as isize, d as isize]);
        t.reshape(&s)
    };
    // The look-around of every window, (lead..., windows, slots, d).
    let look_around = |t: &Tensor| -> Result<Tensor> {
        let padded = t
            .pad(-2, 0, pad, 0.0)?
            .pad(-2, g.back * w, g.fwd * w, -1.0)?;
        let parts = (0..blocks)
            .map(|o| with_windows(&padded.narrow(-2, o * w, windows * w)?, w))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, -2)
    };
    let rot = up(rotate_half_matrix(d))?;
    let rotate = |t: &Tensor, first: usize, rows: usize| -> Result<Tensor> {
        let (cos, sin) = rotary_tables(g.freqs, first, rows);
        t.mul(&up(cos)?)?.add(&t.matmul(&rot)?.mul(&up(sin)?)?)
    };
    let keys = rotate(&look_around(k)?, 0, slots)?;
    let values = look_around(v)?;
    let queries = with_windows(
        &q.mul_scalar((d as f32).powf(-0.5)).pad(-2, 0, pad, 0.0)?,
        w,
    )?;
    let queries = rotate(&queries, slots - w, w)?;
    let sim = queries.matmul(&keys.transpose(-1, -2)?)?;

    // keep[b?, window, query, slot]: 1 where the query may see the slot.
    let batch = mask.map_or(1, |m| m.nrows());
    let mut keep = ndarray::Array4::<f32>::zeros((batch, windows, w, slots));
    for ((bi, j, rq, s), x) in keep.indexed_iter_mut() {
        let block = s / w;
        let jj = j as i64 + block as i64 - g.back as i64;
        if jj < 0 || jj >= windows as i64 {
            continue; // a filler
        }
        let kp = jj as usize * w + s % w;
        let qp = j * w + rq;
        if g.causal && qp < kp {
            continue;
        }
        if let Some(m) = mask
            && (kp >= m.ncols() || !m[[bi, kp]])
        {
            continue;
        }
        *x = 1.0;
    }
    // Broadcast over the heads: (batch, 1.., windows, w, slots).
    let mut keep_shape = vec![batch];
    keep_shape.extend(std::iter::repeat_n(1, lead.len().saturating_sub(1)));
    keep_shape.extend([windows, w, slots]);
    let keep = keep
        .into_shape_with_order(IxDyn(&keep_shape))
        .expect("as many values");
    let fill = keep.mapv(|x| if x == 0.0 { -f32::MAX } else { 0.0 });
    let sim = sim.mul(&up(keep)?)?.add(&up(fill)?)?;
    let mut attn = sim.softmax(-1)?;
    if g.dropout > 0.0 {
        attn = attn.dropout(g.dropout, true)?;
    }
    let out = attn.matmul(&values)?;
    let mut flat: Vec<isize> = lead.iter().map(|&x| x as isize).collect();
    flat.extend([(windows * w) as isize, d as isize]);
    out.reshape(&flat)?.narrow(-2, 0, n)
}
