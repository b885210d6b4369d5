//! What the attention ops share about their arguments: the chunk, the causal epsilon and the
//! check that q, k and v fit together.

use performer_tensor::{Error, Result};

use crate::heads::lead_shape;

/// Rows per chunk of the causal kernels unless set otherwise. 64 measured fastest on AVX-512
/// (the GEMM tiles 64 columns; 32 leaves half a tile empty, 128 doubles the intra-chunk work).
pub const DEFAULT_CHUNK: usize = 64;

/// Epsilon added to the causal key prefix sums (the reference's value).
pub const CAUSAL_EPS: f32 = 1e-6;

pub(super) fn check_chunk(op: &str, chunk: usize) -> Result<()> {
    if chunk == 0 {
        return Err(Error::invalid(op, "chunk", 0, "must be positive"));
    }
    Ok(())
}

/// Shapes of an attention call: lead, n (queries), nk (keys), m (features or head dim), e (value dim).
pub(super) struct AttnShapes {
    pub(super) lead: Vec<usize>,
    pub(super) n: usize,
    pub(super) nk: usize,
    pub(super) m: usize,
    pub(super) e: usize,
}

pub(super) fn attention_shapes(
    op: &str,
    q: &[usize],
    k: &[usize],
    v: &[usize],
    causal: bool,
) -> Result<AttnShapes> {
    let lead = lead_shape(op, "q", q)?.to_vec();
    let lk = lead_shape(op, "k", k)?;
    let lv = lead_shape(op, "v", v)?;
    let r = q.len();
    let (n, m) = (q[r - 2], q[r - 1]);
    let (nk, mk) = (k[k.len() - 2], k[k.len() - 1]);
    let (nv, e) = (v[v.len() - 2], v[v.len() - 1]);
    if lk != lead.as_slice() || lv != lead.as_slice() || mk != m || nv != nk || (causal && nk != n)
    {
        return Err(Error::shape(
            op,
            format!(
                "q {q:?}, k {k:?}, v {v:?}: need equal leading axes, q and k of one feature size, \
                 k and v of one length{}",
                if causal {
                    ", and (causal) q and k of one length"
                } else {
                    ""
                }
            ),
        ));
    }
    Ok(AttnShapes { lead, n, nk, m, e })
}
