//! CPU reference of the exact math the kernels implement, in plain Rust with f64 arithmetic,
//! for the GPU tests to compare against (and checked itself by finite differences).
//!
//! It follows performer-pytorch 1.1.4 (`softmax_kernel`, `linear_attention`,
//! `causal_linear_attention`) written out per (batch*head), with the backward formulas derived
//! by hand. Layout as everywhere in the crate: row-major, batch and heads flattened (`bh`).
//! Independent of the kernels' chunking: the causal pass is a plain running sum.

/// Sizes of one reference problem: `bh` problems, `n` positions, `d` query/key width,
/// `m` features, `e` value width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// batch * heads.
    pub bh: usize,
    /// Positions.
    pub n: usize,
    /// Query/key width.
    pub d: usize,
    /// Features.
    pub m: usize,
    /// Value width.
    pub e: usize,
}

/// Epsilon added to every feature.
pub const FEATURE_EPS: f64 = 1e-4;
/// Epsilon added to each element of the key cumsum (causal normalizer).
pub const CAUSAL_EPS: f64 = 1e-6;

/// Softmax feature map of `x` `(bh, n, d)` under `proj` `(m, d)`; `is_query` picks the
/// per-position stabiliser, else the per-(batch, head) one. Returns `(bh, n, m)`.
pub fn softmax_features(x: &[f64], proj: &[f64], dims: Dims, is_query: bool) -> Vec<f64> {
    let stab = feature_stabilizers(x, proj, dims, is_query);
    softmax_features_stabilized(x, proj, dims, is_query, &stab)
}

/// `dn * x . P` for every position and feature, `(bh, n, m)`.
fn projections(x: &[f64], proj: &[f64], dims: Dims) -> Vec<f64> {
    let Dims { bh, n, d, m, .. } = dims;
    let dn = (d as f64).powf(-0.25);
    let mut dd = vec![0.0; bh * n * m];
    for r in 0..bh * n {
        let xr = &x[r * d..(r + 1) * d];
        for j in 0..m {
            let pj = &proj[j * d..(j + 1) * d];
            dd[r * m + j] = dn * xr.iter().zip(pj).map(|(a, p)| a * p).sum::<f64>();
        }
    }
    dd
}

/// The stabilisers the reference subtracts (and detaches): per position for queries
/// (`(bh, n)`: max over features), per (batch, head) for keys (`(bh)`: max over all).
pub fn feature_stabilizers(x: &[f64], proj: &[f64], dims: Dims, is_query: bool) -> Vec<f64> {
    let Dims { bh, n, m, .. } = dims;
    let dd = projections(x, proj, dims);
    let rows = if is_query { bh * n } else { bh };
    let per = if is_query { m } else { n * m };
    (0..rows)
        .map(|r| {
            dd[r * per..(r + 1) * per]
                .iter()
                .cloned()
                .fold(f64::NEG_INFINITY, f64::max)
        })
        .collect()
}

/// The feature map with given stabilisers (as from [`feature_stabilizers`]): the function whose
/// derivative [`softmax_features_backward`] is, since the reference detaches the max.
pub fn softmax_features_stabilized(
    x: &[f64],
    proj: &[f64],
    dims: Dims,
    is_query: bool,
    stab: &[f64],
) -> Vec<f64> {
    let Dims { n, d, m, .. } = dims;
    let dn = (d as f64).powf(-0.25);
    let ratio = (m as f64).powf(-0.5);
    let dd = projections(x, proj, dims);
    let mut out = vec![0.0; dd.len()];
    for (r, (orow, drow)) in out.chunks_mut(m).zip(dd.chunks(m)).enumerate() {
        let diag = x[r * d..(r + 1) * d].iter().map(|v| v * v).sum::<f64>() * 0.5 * dn * dn;
        let s = if is_query { stab[r] } else { stab[r / n] };
        for (o, v) in orow.iter_mut().zip(drow) {
            *o = ratio * ((v - diag - s).exp() + FEATURE_EPS);
        }
    }
    out
}

/// Backward of [`softmax_features`] (stabiliser constant): `dx` `(bh, n, d)` from the
/// features `feat` and their gradient `gfeat` `(bh, n, m)`:
/// `G = gfeat * (feat - r*eps)`, `dx = dn * G P - dn^2 * rowsum(G) * x`.
pub fn softmax_features_backward(
    x: &[f64],
    proj: &[f64],
    feat: &[f64],
    gfeat: &[f64],
    dims: Dims,
) -> Vec<f64> {
    let Dims { bh, n, d, m, .. } = dims;
    let dn = (d as f64).powf(-0.25);
    let ratio = (m as f64).powf(-0.5);
    let mut dx = vec![0.0; bh * n * d];
    for r in 0..bh * n {
        let mut rowsum = 0.0;
        let out = &mut dx[r * d..(r + 1) * d];
        for j in 0..m {
            let g = gfeat[r * m + j] * (feat[r * m + j] - ratio * FEATURE_EPS);
            rowsum += g;
            for (o, p) in out.iter_mut().zip(&proj[j * d..(j + 1) * d]) {
                *o += dn * g * p;
            }
        }
        for (o, xv) in out.iter_mut().zip(&x[r * d..(r + 1) * d]) {
            *o -= dn * dn * rowsum * xv;
        }
    }
    dx
}

/// Causal linear attention on features: `(out, den)`, `out` `(bh, n, e)`, `den` `(bh, n)`.
pub fn causal_linear_attention(
    qf: &[f64],
    kf: &[f64],
    v: &[f64],
    dims: Dims,
) -> (Vec<f64>, Vec<f64>) {
    let Dims { bh, n, m, e, .. } = dims;
    let mut out = vec![0.0; bh * n * e];
    let mut den = vec![0.0; bh * n];
    for b in 0..bh {
        let mut state = vec![0.0; m * e];
        let mut ksum = vec![0.0; m];
        for i in 0..n {
            let r = b * n + i;
            let k = &kf[r * m..(r + 1) * m];
            let vv = &v[r * e..(r + 1) * e];
            for f in 0..m {
                ksum[f] += k[f];
                for c in 0..e {
                    state[f * e + c] += k[f] * vv[c];
                }
            }
            let q = &qf[r * m..(r + 1) * m];
            let dsum: f64 = q.iter().zip(&ksum).map(|(a, s)| a * (s + CAUSAL_EPS)).sum();
            den[r] = dsum;
            for c in 0..e {
                let num: f64 = (0..m).map(|f| q[f] * state[f * e + c]).sum();
                out[r * e + c] = num / dsum;
            }
        }
    }
    (out, den)
}

/// Backward of [`causal_linear_attention`]: `(dqf, dkf, dv)` from the output gradient `g`.
pub fn causal_linear_attention_backward(
    qf: &[f64],
    kf: &[f64],
    v: &[f64],
    g: &[f64],
    dims: Dims,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let Dims { bh, n, m, e, .. } = dims;
    let (out, den) = causal_linear_attention(qf, kf, v, dims);
    let mut dqf = vec![0.0; bh * n * m];
    let mut dkf = vec![0.0; bh * n * m];
    let mut dv = vec![0.0; bh * n * e];
    for b in 0..bh {
        // dnum_i = g_i / den_i, dden_i = -(g_i . out_i) / den_i
        let mut dnum = vec![0.0; n * e];
        let mut dden = vec![0.0; n];
        for i in 0..n {
            let r = b * n + i;
            let mut dot = 0.0;
            for c in 0..e {
                dnum[i * e + c] = g[r * e + c] / den[r];
                dot += g[r * e + c] * out[r * e + c];
            }
            dden[i] = -dot / den[r];
        }
        // Forward pass of running sums: dqf_i = S_i dnum_i + dden_i (ksum_i + eps).
        let mut state = vec![0.0; m * e];
        let mut ksum = vec![0.0; m];
        for i in 0..n {
            let r = b * n + i;
            for f in 0..m {
                ksum[f] += kf[r * m + f];
                for c in 0..e {
                    state[f * e + c] += kf[r * m + f] * v[r * e + c];
                }
            }
            for f in 0..m {
                let s: f64 = (0..e).map(|c| state[f * e + c] * dnum[i * e + c]).sum();
                dqf[r * m + f] = s + dden[i] * (ksum[f] + CAUSAL_EPS);
            }
        }
        // Reverse running sums over i >= j: U = sum qf_i dnum_i^T, u = sum qf_i dden_i.
        let mut ustate = vec![0.0; m * e];
        let mut usum = vec![0.0; m];
        for j in (0..n).rev() {
            let r = b * n + j;
            for f in 0..m {
                usum[f] += qf[r * m + f] * dden[j];
                for c in 0..e {
                    ustate[f * e + c] += qf[r * m + f] * dnum[j * e + c];
                }
            }
            for f in 0..m {
                let s: f64 = (0..e).map(|c| ustate[f * e + c] * v[r * e + c]).sum();
                dkf[r * m + f] = s + usum[f];
            }
            for c in 0..e {
                dv[r * e + c] = (0..m).map(|f| kf[r * m + f] * ustate[f * e + c]).sum();
            }
        }
    }
    (dqf, dkf, dv)
}

/// Non-causal linear attention on features: `out = D^-1 qf (kf^T v)`, `D_i = qf_i . sum_j kf_j`.
pub fn linear_attention(qf: &[f64], kf: &[f64], v: &[f64], dims: Dims) -> Vec<f64> {
    let Dims { bh, n, m, e, .. } = dims;
    let mut out = vec![0.0; bh * n * e];
    for b in 0..bh {
        let (ctx, ksum) = context(kf, v, b, dims);
        for i in 0..n {
            let r = b * n + i;
            let q = &qf[r * m..(r + 1) * m];
            let dsum: f64 = q.iter().zip(&ksum).map(|(a, s)| a * s).sum();
            for c in 0..e {
                let num: f64 = (0..m).map(|f| q[f] * ctx[f * e + c]).sum();
                out[r * e + c] = num / dsum;
            }
        }
    }
    out
}

fn context(kf: &[f64], v: &[f64], b: usize, dims: Dims) -> (Vec<f64>, Vec<f64>) {
    let Dims { n, m, e, .. } = dims;
    let mut ctx = vec![0.0; m * e];
    let mut ksum = vec![0.0; m];
    for j in 0..n {
        let r = b * n + j;
        for f in 0..m {
            ksum[f] += kf[r * m + f];
            for c in 0..e {
                ctx[f * e + c] += kf[r * m + f] * v[r * e + c];
            }
        }
    }
    (ctx, ksum)
}

/// Backward of [`linear_attention`]: `(dqf, dkf, dv)`.
pub fn linear_attention_backward(
    qf: &[f64],
    kf: &[f64],
    v: &[f64],
    g: &[f64],
    dims: Dims,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let Dims { bh, n, m, e, .. } = dims;
    let out = linear_attention(qf, kf, v, dims);
    let mut dqf = vec![0.0; bh * n * m];
    let mut dkf = vec![0.0; bh * n * m];
    let mut dv = vec![0.0; bh * n * e];
    for b in 0..bh {
        let (ctx, ksum) = context(kf, v, b, dims);
        let mut dctx = vec![0.0; m * e];
        let mut dksum = vec![0.0; m];
        for i in 0..n {
            let r = b * n + i;
            let q = &qf[r * m..(r + 1) * m];
            let den: f64 = q.iter().zip(&ksum).map(|(a, s)| a * s).sum();
            let dot: f64 = (0..e).map(|c| g[r * e + c] * out[r * e + c]).sum();
            let dden = -dot / den;
            for f in 0..m {
                let mut s = dden * ksum[f];
                for c in 0..e {
                    let dnum = g[r * e + c] / den;
                    s += dnum * ctx[f * e + c];
                    dctx[f * e + c] += q[f] * dnum;
                }
                dksum[f] += q[f] * dden;
                dqf[r * m + f] = s;
            }
        }
        for j in 0..n {
            let r = b * n + j;
            for f in 0..m {
                dkf[r * m + f] =
                    dksum[f] + (0..e).map(|c| v[r * e + c] * dctx[f * e + c]).sum::<f64>();
            }
            for c in 0..e {
                dv[r * e + c] = (0..m).map(|f| kf[r * m + f] * dctx[f * e + c]).sum();
            }
        }
    }
    (dqf, dkf, dv)
}

/// Full FAVOR+ attention (softmax features, then causal or non-causal linear attention).
pub fn fast_attention(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    proj: &[f64],
    dims: Dims,
    causal: bool,
) -> Vec<f64> {
    let qf = softmax_features(q, proj, dims, true);
    let kf = softmax_features(k, proj, dims, false);
    if causal {
        causal_linear_attention(&qf, &kf, v, dims).0
    } else {
        linear_attention(&qf, &kf, v, dims)
    }
}

/// Gradients `(dq, dk, dv)` of full FAVOR+ attention for the output gradient `g`.
pub fn fast_attention_backward(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    proj: &[f64],
    g: &[f64],
    dims: Dims,
    causal: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let qf = softmax_features(q, proj, dims, true);
    let kf = softmax_features(k, proj, dims, false);
    let (dqf, dkf, dv) = if causal {
        causal_linear_attention_backward(&qf, &kf, v, g, dims)
    } else {
        linear_attention_backward(&qf, &kf, v, g, dims)
    };
    let dq = softmax_features_backward(q, proj, &qf, &dqf, dims);
    let dk = softmax_features_backward(k, proj, &kf, &dkf, dims);
    (dq, dk, dv)
}

/// A small deterministic generator (SplitMix64) so tests need no RNG dependency and every run
/// sees the same inputs.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
    /// `len` standard normal values scaled by `scale`, rounded to f32 precision so that the
    /// f32 kernels and the f64 reference see exactly the same inputs.
    pub fn normal_vec(&mut self, len: usize, scale: f64) -> Vec<f64> {
        (0..len)
            .map(|_| (self.normal() * scale) as f32 as f64)
            .collect()
    }
}

/// Largest absolute difference divided by the largest magnitude of `reference`
/// (the project's relative error measure for whole tensors).
pub fn max_rel_err(actual: &[f64], reference: &[f64]) -> f64 {
    let scale = reference
        .iter()
        .fold(0.0f64, |a, b| a.max(b.abs()))
        .max(f64::MIN_POSITIVE);
    let diff = actual.iter().zip(reference).fold(0.0f64, |a, (x, y)| {
        if x.is_finite() {
            a.max((x - y).abs())
        } else {
            f64::INFINITY
        }
    });
    if actual.len() != reference.len() {
        return f64::INFINITY;
    }
    diff / scale
}
