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
use performer_tensor::{Error, Result, Tensor};

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
    let rotate_rows = |t: &Tensor, first: usize, rows: usize| -> Result<Tensor> {
        let (cos, sin) = rotary_tables(g.freqs, first, rows);
        rotate(t, &up(cos)?, &up(sin)?, &rot)
    };
    let keys = rotate_rows(&look_around(k)?, 0, slots)?;
    let values = look_around(v)?;
    let queries = with_windows(
        &q.mul_scalar((d as f32).powf(-0.5)).pad(-2, 0, pad, 0.0)?,
        w,
    )?;
    let queries = rotate_rows(&queries, slots - w, w)?;
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

/// The decoding cache of causal local heads on a device: what [`crate::LocalCache`] keeps on
/// the host, laid out as the newest position's look-around so that a step is a few device
/// ops and copies nothing to or from the host.
///
/// With window `w`, the query at position `p` (window `i = p / w`) sees `2 w` slots: the
/// positions `(i - 1) w .. (i + 1) w`. The cache holds exactly those slots, as the reference's
/// parallel forward over the prefix fills them: -1 (keys and values) for positions before the
/// sequence, 0 for positions after `p` (autopad), the unrotated keys and values of the others.
/// `keep` is 1 where a slot holds a real token at or before `p`. A new position writes its
/// slot `w + p % w`; a position that opens a window first moves the second half of the slots
/// to the first and empties the second (the window before the previous one falls out of
/// reach).
pub(crate) struct DeviceLocalCache {
    /// Keys of the slots, unrotated: (b, h, 2w, d).
    k: Tensor,
    /// Values of the slots: (b, h, 2w, d).
    v: Tensor,
    /// 1 where a slot holds a real token the query may see, 0 elsewhere: (b, 1, 1, 2w).
    keep: Tensor,
    /// The rotary tables of the slots (the keys' rotation by slot index), (2w, d).
    cos: Tensor,
    sin: Tensor,
    /// `rotate_half` as a product, (d, d).
    rot: Tensor,
    /// Empty slots of a fresh window: zeros (b, h, w, d) and (b, 1, 1, w).
    empty_rows: Tensor,
    empty_keep: Tensor,
    /// `keep` of an unmasked new position: ones (b, 1, 1, 1).
    kept: Tensor,
    /// The position the next step decodes.
    next: usize,
    window: usize,
}

/// `t` with the slot `at` (axis -2 of `t`, or -1 for `keep`) replaced by `row`.
fn write_slot(t: &Tensor, row: &Tensor, at: usize, axis: isize) -> Result<Tensor> {
    let rank = t.rank() as isize;
    let len = t.shape()[(rank + axis) as usize];
    let mut parts = Vec::with_capacity(3);
    if at > 0 {
        parts.push(t.narrow(axis, 0, at)?);
    }
    parts.push(row.clone());
    if at + 1 < len {
        parts.push(t.narrow(axis, at + 1, len - at - 1)?);
    }
    Tensor::cat(&parts, axis)
}

/// `x cos + rotate_half(x) sin` with tables that broadcast over `x`.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, rot: &Tensor) -> Result<Tensor> {
    x.mul(cos)?.add(&x.matmul(rot)?.mul(sin)?)
}

/// The device cache after a prompt's keys and values `(b, h, n, d)` on their device; `mask`
/// `(b, n)` (checked by the caller) marks the real tokens. The only copies are the tables and
/// the prompt's `keep`, uploaded once.
pub(crate) fn cache_from(
    g: &LocalGeometry<'_>,
    k: &Tensor,
    v: &Tensor,
    mask: Option<ArrayView2<'_, bool>>,
) -> Result<DeviceLocalCache> {
    const OP: &str = "LocalAttention::cache_from (device)";
    if !g.causal || g.back != 1 || g.fwd != 0 {
        return Err(Error::invalid(
            OP,
            "causal",
            g.causal,
            "only causal local attention looking one window back decodes incrementally",
        ));
    }
    let s = k.shape().to_vec();
    if s.len() != 4 || v.shape() != s || s.contains(&0) {
        return Err(Error::shape(
            OP,
            format!(
                "k {s:?} and v {:?} must be one (b, h, n, d) shape",
                v.shape()
            ),
        ));
    }
    if let Some(m) = mask
        && m.shape() != [s[0], s[2]]
    {
        return Err(Error::shape(
            OP,
            format!("mask {:?} must be (b, n) = ({}, {})", m.shape(), s[0], s[2]),
        ));
    }
    let device = k.device();
    let up = |a: ArrayD<f32>| Tensor::new(a).to_device(device);
    let (b, h, n, d) = (s[0], s[1], s[2], s[3]);
    let w = g.window;
    let p = n - 1;
    let i = p / w;
    // Padded so that position P sits at row P + w: slot j (position (i - 1) w + j) is row
    // i w + j.
    let slots = |t: &Tensor| -> Result<Tensor> {
        t.pad(-2, 0, (i + 1) * w - n, 0.0)?
            .pad(-2, w, 0, -1.0)?
            .narrow(-2, i * w, 2 * w)
    };
    let keep = ndarray::Array4::from_shape_fn((b, 1, 1, 2 * w), |(bi, _, _, j)| {
        let pos = (i * w + j) as i64 - w as i64;
        let real = pos >= 0 && pos as usize <= p && mask.is_none_or(|m| m[[bi, pos as usize]]);
        f32::from(u8::from(real))
    });
    let (cos, sin) = rotary_tables(g.freqs, 0, 2 * w);
    Ok(DeviceLocalCache {
        k: slots(k)?,
        v: slots(v)?,
        keep: up(keep.into_dyn())?,
        cos: up(cos)?,
        sin: up(sin)?,
        rot: up(rotate_half_matrix(d))?,
        empty_rows: Tensor::full_on(&[b, h, w, d], 0.0, device)?,
        empty_keep: Tensor::full_on(&[b, 1, 1, w], 0.0, device)?,
        kept: Tensor::full_on(&[b, 1, 1, 1], 1.0, device)?,
        next: n,
        window: w,
    })
}

/// Attention of the next position's query `q` `(b, h, 1, d)` over the cache, after appending
/// its key `k` and value `v` (same shape) and whether it is a real token (`keep` `(b)`, None:
/// all are): `(b, h, 1, d)` on the cache's device, equal to the host step's (and so to the
/// parallel forward over the prefix at that position).
pub(crate) fn step(
    cache: &mut DeviceLocalCache,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    keep: Option<ndarray::ArrayView1<'_, bool>>,
) -> Result<Tensor> {
    let w = cache.window;
    let p = cache.next;
    let want = [
        cache.k.shape()[0],
        cache.k.shape()[1],
        1,
        cache.k.shape()[3],
    ];
    if q.shape() != want || k.shape() != want || v.shape() != want {
        return Err(Error::shape(
            "LocalAttention::step (device)",
            format!(
                "q {:?}, k {:?}, v {:?} must be one position of the cache's heads {want:?}",
                q.shape(),
                k.shape(),
                v.shape()
            ),
        ));
    }
    if let Some(m) = keep
        && m.len() != want[0]
    {
        return Err(Error::shape(
            "LocalAttention::step (device)",
            format!("keep has {} entries for {} sequences", m.len(), want[0]),
        ));
    }
    let d = want[3];
    if p.is_multiple_of(w) {
        // A new window: the newest window becomes the one before, the new one starts empty.
        cache.k = Tensor::cat(&[cache.k.narrow(-2, w, w)?, cache.empty_rows.clone()], -2)?;
        cache.v = Tensor::cat(&[cache.v.narrow(-2, w, w)?, cache.empty_rows.clone()], -2)?;
        cache.keep = Tensor::cat(
            &[cache.keep.narrow(-1, w, w)?, cache.empty_keep.clone()],
            -1,
        )?;
    }
    let slot = w + p % w;
    let kept = match keep {
        Some(m) => {
            let b = m.len();
            let m =
                ndarray::Array4::from_shape_fn((b, 1, 1, 1), |(bi, ..)| f32::from(u8::from(m[bi])));
            Tensor::new(m.into_dyn()).to_device(q.device())?
        }
        None => cache.kept.clone(),
    };
    cache.k = write_slot(&cache.k, k, slot, -2)?;
    cache.v = write_slot(&cache.v, v, slot, -2)?;
    cache.keep = write_slot(&cache.keep, &kept, slot, -1)?;
    cache.next += 1;
    let keys = rotate(&cache.k, &cache.cos, &cache.sin, &cache.rot)?;
    let query = rotate(
        &q.mul_scalar((d as f32).powf(-0.5)),
        &cache.cos.narrow(0, slot, 1)?,
        &cache.sin.narrow(0, slot, 1)?,
        &cache.rot,
    )?;
    // Masked slots score -f32::MAX (not -inf), as on the host: `sim keep + (keep - 1) MAX`.
    let fill = cache.keep.mul_scalar(f32::MAX).add_scalar(-f32::MAX);
    let sim = query
        .matmul(&keys.transpose(-1, -2)?)?
        .mul(&cache.keep)?
        .add(&fill)?;
    sim.softmax(-1)?.matmul(&cache.v)
}
