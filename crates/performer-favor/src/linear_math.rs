//! Linear attention on one head, given its features: the non-causal product and the causal
//! prefix sums, each forward and backward; no (n, m, d) tensor ever exists.
//!
//! Features are held transposed, `q'^T` (m, n) and `k'^T` (m, nk), in column blocks
//! ([`Blocks`]), next to values `v` (nk, e): in that layout every product below reads its
//! right-hand operand with unit column stride, which the GEMM packs fastest.
//! - non-causal: `out = q' (k'^T v) / q' (k'^T 1)` (no epsilon, as the reference);
//! - causal: `out_i = q'_i S_i / q'_i z_i` with `S_i = sum_{j<=i} k'_j v_j^T` and
//!   `z_i = eps + sum_{j<=i} k'_j` (the reference adds eps to every element of the key prefix
//!   sum).
//!
//! Causal attention runs over chunks of `C` positions (the feature blocks): with `S`, `z` the
//! state of all earlier chunks, a chunk's numerator is `q'_c S + mask(q'_c k'_c^T) v_c` and its
//! normalizer `q'_c z + rowsum(mask(q'_c k'_c^T))`; then `S += k'_c^T v_c`, `z += k'_c^T 1`.
//! The normalizer is kept apart from the numerator (no `[v | 1]` column) so that every product
//! has widths the GEMM tiles evenly. The backward is one reverse sweep ([`CausalBackward`]) with
//! the state of later rows `R = sum q'_i dnum_i^T`, `rz = sum q'_i dden_i`; it needs each
//! chunk's `S`, `z`, which the forward saves for every chunk or every few chunks
//! ([`CausalStates`]; the caller recomputes the rest with [`advance_state`]).

use ndarray::{Array2, Array3, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis, s};
use performer_tensor::Result;
use performer_tensor::gemm::{Threads, gemm_into};

use crate::column_blocks::{Blocks, transpose_into};
use crate::feature::{row_slice, row_slice_mut};
use crate::heads::for_overwrite;
use crate::simd;

/// `c = beta * c + alpha * a @ b`, single-threaded (callers are parallel over heads).
#[inline]
fn mm(
    c: &mut ArrayViewMut2<f32>,
    a: &ArrayView2<f32>,
    b: &ArrayView2<f32>,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    gemm_into(c, a, b, alpha, beta, Threads::Single)
}

/// Gradients of a block's numerator and normalizer from its output's gradient `g`:
/// `dnum = g / den` (also transposed, into `dnum_t`) and `dden = -(g . out) / den`.
fn output_grad(
    g: &ArrayView2<f32>,
    out: &ArrayView2<f32>,
    den: &ArrayView1<f32>,
    dnum: &mut ArrayViewMut2<f32>,
    dnum_t: &mut ArrayViewMut2<f32>,
    dden: &mut [f32],
) {
    for (i, ((gr, or), &dv)) in g.rows().into_iter().zip(out.rows()).zip(den).enumerate() {
        let inv = 1.0 / dv;
        let dst = row_slice_mut(dnum, i);
        // `g` may be broadcast (the gradient of a sum has zero strides).
        match gr.as_slice() {
            Some(gs) => dst.iter_mut().zip(gs).for_each(|(d, &gv)| *d = gv * inv),
            None => dst.iter_mut().zip(&gr).for_each(|(d, &gv)| *d = gv * inv),
        }
        // dden = -(g . out) / den = -(dnum . out)
        dden[i] = -match or.as_slice() {
            Some(os) => simd::dot(dst, os),
            None => dst.iter().zip(&or).map(|(a, b)| a * b).sum(),
        };
    }
    transpose_into(&dnum.view(), dnum_t);
}

// ---------------------------------------------------------------------------------------------
// Non-causal

/// What the non-causal forward keeps: `k'^T v` (m, e) and the key sums `k'^T 1` (m).
pub(crate) struct NonCausalContext {
    pub kv: Array2<f32>,
    pub ksum: Vec<f32>,
}

impl NonCausalContext {
    pub fn new(m: usize, e: usize) -> Self {
        NonCausalContext {
            kv: Array2::zeros((m, e)),
            ksum: vec![0.0; m],
        }
    }

    /// Adds a block of keys `kt` (m, l) and their values `v` (l, e).
    pub fn add(&mut self, kt: &ArrayView2<f32>, v: &ArrayView2<f32>) -> Result<()> {
        mm(&mut self.kv.view_mut(), kt, v, 1.0, 1.0)?;
        for (f, ks) in self.ksum.iter_mut().enumerate() {
            *ks += simd::sum(row_slice(kt, f));
        }
        Ok(())
    }

    /// Output of a block of queries `qt` (m, l) into `out` (l, e) and `den` (l).
    pub fn readout(
        &self,
        qt: &ArrayView2<f32>,
        out: &mut ArrayViewMut2<f32>,
        den: &mut ArrayViewMut1<f32>,
    ) -> Result<()> {
        mm(out, &qt.t(), &self.kv.view(), 1.0, 0.0)?;
        let mut dsum = vec![0f32; qt.ncols()];
        for (f, &ks) in self.ksum.iter().enumerate() {
            simd::axpy(&mut dsum, ks, row_slice(qt, f));
        }
        for ((mut or, dv), &total) in out.rows_mut().into_iter().zip(den.iter_mut()).zip(&dsum) {
            *dv = total;
            let inv = 1.0 / total;
            or.mapv_inplace(|x| x * inv);
        }
        Ok(())
    }
}

/// The non-causal backward of one head, in two passes over blocks: all query blocks first
/// ([`NonCausalBackward::queries`], which also sum `T = q'^T dnum` and `tz = q'^T dden`), then
/// the key blocks ([`NonCausalBackward::keys`]).
pub(crate) struct NonCausalBackward {
    t: Array2<f32>,
    tz: Vec<f32>,
    dnum: Array2<f32>,
    dnum_t: Array2<f32>,
    dden: Vec<f32>,
}

impl NonCausalBackward {
    pub fn new(m: usize, e: usize, block: usize) -> Self {
        NonCausalBackward {
            t: Array2::zeros((m, e)),
            tz: vec![0.0; m],
            dnum: Array2::zeros((block, e)),
            dnum_t: Array2::zeros((e, block)),
            dden: vec![0.0; block],
        }
    }

    /// A block of queries: `dq'^T` (m, l) `= (k'^T v) dnum^T + (k'^T 1) dden^T`.
    pub fn queries(
        &mut self,
        qt: &ArrayView2<f32>,
        g: &ArrayView2<f32>,
        out: &ArrayView2<f32>,
        den: &ArrayView1<f32>,
        ctx: &NonCausalContext,
        dqt: &mut ArrayViewMut2<f32>,
    ) -> Result<()> {
        let l = qt.ncols();
        let mut dnum = self.dnum.slice_mut(s![..l, ..]);
        let mut dnum_t = self.dnum_t.slice_mut(s![.., ..l]);
        let dden = &mut self.dden[..l];
        output_grad(g, out, den, &mut dnum, &mut dnum_t, dden);
        mm(dqt, &ctx.kv.view(), &dnum_t.view(), 1.0, 0.0)?;
        for (f, &ks) in ctx.ksum.iter().enumerate() {
            simd::axpy(row_slice_mut(dqt, f), ks, dden);
        }
        mm(&mut self.t.view_mut(), qt, &dnum.view(), 1.0, 1.0)?;
        for (f, tz) in self.tz.iter_mut().enumerate() {
            *tz += simd::dot(row_slice(qt, f), dden);
        }
        Ok(())
    }

    /// A block of keys `kt` (m, l) with values transposed `vt` (e, l), after every query
    /// block: `dk'^T = T v^T + tz 1^T`, `dv = k' T`.
    pub fn keys(
        &self,
        kt: &ArrayView2<f32>,
        vt: &ArrayView2<f32>,
        dkt: &mut ArrayViewMut2<f32>,
        dv: &mut ArrayViewMut2<f32>,
    ) -> Result<()> {
        mm(dkt, &self.t.view(), vt, 1.0, 0.0)?;
        for (f, &tz) in self.tz.iter().enumerate() {
            simd::add_scalar(row_slice_mut(dkt, f), tz);
        }
        mm(dv, &kt.t(), &self.t.view(), 1.0, 0.0)
    }
}

// ---------------------------------------------------------------------------------------------
// Causal

/// Causal states `S` (count, m, e) and `z` (count, m) saved by the forward at the start of
/// every `every`-th chunk, and optionally each chunk's masked scores `mask(q'_c k'_c^T)`
/// (chunks, C, C), which the backward would otherwise recompute.
pub(crate) struct CausalStates {
    pub s: Array3<f32>,
    pub z: Array2<f32>,
    pub scores: Option<Array3<f32>>,
    pub every: usize,
}

impl CausalStates {
    pub fn new(
        chunks: usize,
        m: usize,
        e: usize,
        chunk: usize,
        every: usize,
        scores: bool,
    ) -> Self {
        let count = chunks.div_ceil(every).max(1);
        CausalStates {
            // The forward writes every saved state (and score block) it keeps.
            s: for_overwrite((count, m, e)),
            z: Array2::zeros((count, m)),
            scores: scores.then(|| for_overwrite((chunks, chunk, chunk))),
            every,
        }
    }

    /// Bytes of the states of one head.
    pub fn state_bytes(chunks: usize, m: usize, e: usize, every: usize) -> usize {
        chunks.div_ceil(every).max(1) * m * (e + 1) * 4
    }

    /// Bytes of the score blocks of one head.
    pub fn score_bytes(chunks: usize, chunk: usize) -> usize {
        chunks * chunk * chunk * 4
    }
}

/// Zeroes the strictly upper triangle (j > i) of a square block: position i sees positions <= i.
fn mask_future(a: &mut ArrayViewMut2<f32>) {
    for i in 0..a.nrows() {
        row_slice_mut(a, i)[i + 1..].fill(0.0);
    }
}

/// `S += k'_c^T v_c`, `z += k'_c^T 1` for a chunk's keys `kt` (m, l) and values `v` (l, e).
pub(crate) fn advance_state(
    state: &mut ArrayViewMut2<f32>,
    z: &mut ArrayViewMut1<f32>,
    kt: &ArrayView2<f32>,
    v: &ArrayView2<f32>,
) -> Result<()> {
    mm(state, kt, v, 1.0, 1.0)?;
    for (f, zf) in z.iter_mut().enumerate() {
        *zf += simd::sum(row_slice(kt, f));
    }
    Ok(())
}

/// The sums a causal forward ends with, over every position: `S = sum_j k'_j v_j^T` (m, e)
/// and `z = eps + sum_j k'_j` (m).
pub(crate) struct FinalSums {
    pub s: Array2<f32>,
    pub z: ndarray::Array1<f32>,
}

/// Causal forward of one head on transposed features `qf`, `kf` (m, n; blocks = chunks) and
/// values `v` (n, e), into `out` (n, e) and `den` (n); saves the state into `states` at its
/// interval, and returns the sums after the last chunk (what decoding continues from).
pub(crate) fn causal_forward(
    qf: &Blocks,
    kf: &Blocks,
    v: &ArrayView2<f32>,
    eps: f32,
    out: &mut ArrayViewMut2<f32>,
    den: &mut ArrayViewMut1<f32>,
    mut states: Option<&mut CausalStates>,
) -> Result<FinalSums> {
    let m = qf.rows();
    let chunk = qf.width();
    let e = v.ncols();
    let mut state = Array2::<f32>::zeros((m, e));
    let mut z = ndarray::Array1::from_elem(m, eps);
    let mut a = Array2::<f32>::zeros((chunk, chunk));
    let mut dsum = vec![0f32; chunk];
    for b in 0..qf.count() {
        let (start, end) = qf.range(b);
        let l = end - start;
        if let Some(st) = states.as_deref_mut()
            && b % st.every == 0
        {
            let idx = b / st.every;
            st.s.index_axis_mut(Axis(0), idx).assign(&state);
            st.z.row_mut(idx).assign(&z);
        }
        let (qc, kc) = (qf.block(b), kf.block(b));
        let vc = v.slice(s![start..end, ..]);
        let mut oc = out.slice_mut(s![start..end, ..]);
        mm(&mut oc, &qc.t(), &state.view(), 1.0, 0.0)?;
        // The masked scores go straight into the saved score block when there is one.
        let mut saved = states.as_deref_mut().and_then(|st| st.scores.as_mut());
        let mut ac = match saved.as_mut() {
            Some(sc) => sc.index_axis_mut(Axis(0), b).slice_move(s![..l, ..l]),
            None => a.slice_mut(s![..l, ..l]),
        };
        mm(&mut ac, &qc.t(), &kc, 1.0, 0.0)?;
        mask_future(&mut ac);
        let ds = &mut dsum[..l];
        ds.fill(0.0);
        for (f, &zf) in z.iter().enumerate() {
            simd::axpy(ds, zf, row_slice(&qc, f));
        }
        for (i, d) in ds.iter_mut().enumerate() {
            *d += simd::sum(&row_slice(&ac.view(), i)[..=i]);
        }
        mm(&mut oc, &ac.view(), &vc, 1.0, 1.0)?;
        for ((mut or, dv), &total) in oc
            .rows_mut()
            .into_iter()
            .zip(den.slice_mut(s![start..end]).iter_mut())
            .zip(ds.iter())
        {
            *dv = total;
            let inv = 1.0 / total;
            or.mapv_inplace(|x| x * inv);
        }
        advance_state(&mut state.view_mut(), &mut z.view_mut(), &kc, &vc)?;
    }
    Ok(FinalSums { s: state, z })
}

/// The inputs of one chunk of the causal backward: transposed features `qt`, `kt` (m, l),
/// values `v` (l, e) and `vt` (e, l), the output side `g`, `out` (l, e), `den` (l), the
/// state `s` (m, e), `z` (m) of all earlier chunks, and the chunk's masked scores if saved.
pub(crate) struct CausalChunk<'a> {
    pub qt: ArrayView2<'a, f32>,
    pub kt: ArrayView2<'a, f32>,
    pub v: ArrayView2<'a, f32>,
    pub vt: ArrayView2<'a, f32>,
    pub g: ArrayView2<'a, f32>,
    pub out: ArrayView2<'a, f32>,
    pub den: ArrayView1<'a, f32>,
    pub s: ArrayView2<'a, f32>,
    pub z: ArrayView1<'a, f32>,
    pub scores: Option<ArrayView2<'a, f32>>,
}

/// The causal backward of one head: the reverse state and scratch, fed chunks from the last to
/// the first.
pub(crate) struct CausalBackward {
    r: Array2<f32>,
    rz: Vec<f32>,
    a: Array2<f32>,
    b: Array2<f32>,
    bt: Array2<f32>,
    dnum: Array2<f32>,
    dnum_t: Array2<f32>,
    dden: Vec<f32>,
}

impl CausalBackward {
    /// For heads of `m` features and value width `e`, chunks of at most `chunk` positions.
    pub fn new(m: usize, e: usize, chunk: usize) -> Self {
        CausalBackward {
            r: Array2::zeros((m, e)),
            rz: vec![0.0; m],
            a: Array2::zeros((chunk, chunk)),
            b: Array2::zeros((chunk, chunk)),
            bt: Array2::zeros((chunk, chunk)),
            dnum: Array2::zeros((chunk, e)),
            dnum_t: Array2::zeros((e, chunk)),
            dden: vec![0.0; chunk],
        }
    }

    /// `(m, e, chunk)` as made by [`CausalBackward::new`].
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.r.nrows(), self.r.ncols(), self.a.nrows())
    }

    /// Ready for a new head: the reverse state back to zero (the other buffers are written
    /// before they are read in every chunk).
    pub fn reset(&mut self) {
        self.r.fill(0.0);
        self.rz.fill(0.0);
    }

    /// One chunk (chunks fed from the last to the first): writes the gradients of the
    /// transposed features `dqt`, `dkt` (m, l) and of the values `dv` (l, e).
    pub fn chunk(
        &mut self,
        c: &CausalChunk<'_>,
        dqt: &mut ArrayViewMut2<f32>,
        dkt: &mut ArrayViewMut2<f32>,
        dv: &mut ArrayViewMut2<f32>,
    ) -> Result<()> {
        let l = c.qt.ncols();
        let mut dnum = self.dnum.slice_mut(s![..l, ..]);
        let mut dnum_t = self.dnum_t.slice_mut(s![.., ..l]);
        let dden = &mut self.dden[..l];
        output_grad(&c.g, &c.out, &c.den, &mut dnum, &mut dnum_t, dden);
        // B^T with B_ij = dnum_i . v_j + dden_i for j <= i, else 0.
        let mut bt = self.bt.slice_mut(s![..l, ..l]);
        mm(&mut bt, &c.v, &dnum_t.view(), 1.0, 0.0)?;
        for j in 0..l {
            let row = row_slice_mut(&mut bt, j);
            row[..j].fill(0.0);
            for (x, &dd) in row[j..].iter_mut().zip(&dden[j..]) {
                *x += dd;
            }
        }
        let mut b = self.b.slice_mut(s![..l, ..l]);
        transpose_into(&bt.view(), &mut b);
        // dq'^T = S dnum^T + k'^T B^T + z dden^T
        mm(dqt, &c.s, &dnum_t.view(), 1.0, 0.0)?;
        mm(dqt, &c.kt, &bt.view(), 1.0, 1.0)?;
        for (f, &zf) in c.z.iter().enumerate() {
            simd::axpy(row_slice_mut(dqt, f), zf, dden);
        }
        // dk'^T = R v^T + q'^T B + rz 1^T
        mm(dkt, &self.r.view(), &c.vt, 1.0, 0.0)?;
        mm(dkt, &c.qt, &b.view(), 1.0, 1.0)?;
        for (f, &rz) in self.rz.iter().enumerate() {
            simd::add_scalar(row_slice_mut(dkt, f), rz);
        }
        // dv = k' R + mask(q' k'^T)^T dnum
        let scores = match &c.scores {
            Some(a) => a.view(),
            None => {
                let mut ac = self.a.slice_mut(s![..l, ..l]);
                mm(&mut ac, &c.qt.t(), &c.kt, 1.0, 0.0)?;
                mask_future(&mut ac);
                self.a.slice(s![..l, ..l])
            }
        };
        mm(dv, &c.kt.t(), &self.r.view(), 1.0, 0.0)?;
        mm(dv, &scores.t(), &dnum.view(), 1.0, 1.0)?;
        // R += q'^T dnum, rz += q'^T dden
        mm(&mut self.r.view_mut(), &c.qt, &dnum.view(), 1.0, 1.0)?;
        for (f, rz) in self.rz.iter_mut().enumerate() {
            *rz += simd::dot(row_slice(&c.qt, f), dden);
        }
        Ok(())
    }
}
