//! [`Linear`] (`nn.Linear`, with PyTorch's parameter names and layout), and its row paths for
//! decoding: [`linear_rows`] and the checked transposes they share.

use std::sync::Mutex;

use ndarray::{Array2, ArrayView2};
use performer_tensor::bf16_gemm::{self, Bf16Pairs};
use performer_tensor::fast_math::{GEMV_T_COLS, gemv_t, gemv_t_bf16};
use performer_tensor::team::Team;
use performer_tensor::{DType, Error, Module, Param, Result, Tensor, Transposed, Visitor};

use crate::init;

/// `y = x W^T + b` over the last axis; `weight` is `(out, in)` as in PyTorch.
pub struct Linear {
    /// `(out_features, in_features)`.
    pub weight: Param,
    /// `(out_features)`, when present.
    pub bias: Option<Param>,
}

impl Linear {
    /// A layer with PyTorch's default initialization.
    pub fn new(in_features: usize, out_features: usize, bias: bool) -> Self {
        Linear {
            weight: Param::new(init::linear_uniform(
                &[out_features, in_features],
                in_features,
            )),
            bias: bias.then(|| Param::new(init::linear_uniform(&[out_features], in_features))),
        }
    }

    /// Input size.
    pub fn in_features(&self) -> usize {
        self.weight.shape()[1]
    }

    /// Output size.
    pub fn out_features(&self) -> usize {
        self.weight.shape()[0]
    }

    /// Applies the layer to `x` `(..., in)`. Leading axes are flattened into one GEMM (a view
    /// when `x` is contiguous), so the weight gradient is one product, not one per batch row.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let inf = self.in_features();
        if x.shape().last() != Some(&inf) {
            return Err(Error::shape(
                "Linear",
                format!("input {:?} must end in in_features {inf}", x.shape()),
            ));
        }
        let lead: Vec<isize> = x.shape()[..x.rank() - 1]
            .iter()
            .map(|&d| d as isize)
            .collect();
        let mut shape = lead;
        shape.push(self.out_features() as isize);
        // The host fast path reads plain arrays; a device input takes the tensor ops below.
        if !performer_tensor::is_grad_enabled() && x.device().is_cpu() {
            let y = self.forward_inference(x)?;
            // The op timer's row for this product (no graph node reports it).
            performer_tensor::profile::op_done("linear", || 4 * (x.numel() + y.len()) as u64);
            return Tensor::new(y).reshape(&shape);
        }
        let flat = x.reshape(&[-1, inf as isize])?;
        // One op with the bias (under bf16 autocast on a device its result is bf16); on the
        // CPU the product reads a contiguous transpose of the weight.
        let bias = self.bias.as_ref().map(|b| b.tensor());
        flat.linear(&self.weight.tensor(), bias.as_ref())?
            .reshape(&shape)
    }

    /// [`Linear::forward`] without a graph to record (inference, a prompt's pass) on plain
    /// arrays: `(rows, out)` for `x` `(..., in)`. The product runs against the weight's cached
    /// contiguous transpose ([`Param::transposed`]; the GEMM is up to 1.6 times faster on it
    /// than on the strided view of the `(out, in)` weight), and the bias is written first and
    /// accumulated into (no second pass over the result, no second array).
    fn forward_inference(&self, x: &Tensor) -> Result<ndarray::ArrayD<f32>> {
        let inf = self.in_features();
        let rows: usize = x.shape()[..x.rank() - 1].iter().product();
        let x = x.data().as_standard_layout();
        let x = x
            .view()
            .into_shape_with_order((rows, inf))
            .map_err(|e| Error::shape("Linear", e.to_string()))?;
        if self.weight.dtype() == DType::BF16 && bf16_gemm::use_native() {
            return self.forward_native_bf16(&x, rows);
        }
        let weight_t = self.weight.transposed()?;
        let weight_t = weight_t
            .view()
            .into_dimensionality::<ndarray::Ix2>()
            .map_err(|e| Error::shape("Linear", e.to_string()))?;
        let Some(mut y) = self.rows_of_bias(rows)? else {
            let y = performer_tensor::gemm::matmul2(
                &x,
                &weight_t,
                performer_tensor::gemm::Threads::All,
            )?;
            return Ok(y.into_dyn());
        };
        performer_tensor::gemm::gemm_into(
            &mut y.view_mut(),
            &x,
            &weight_t,
            1.0,
            1.0,
            performer_tensor::gemm::Threads::All,
        )?;
        Ok(y.into_dyn())
    }

    /// `rows` copies of the bias, `(rows, out)`, for a product to add to (copied, never zeroed
    /// first: no second pass over the result, no second array); `None` without a bias.
    fn rows_of_bias(&self, rows: usize) -> Result<Option<Array2<f32>>> {
        let Some(bias) = &self.bias else {
            return Ok(None);
        };
        let out = self.out_features();
        let bias = bias.value();
        let bias = bias.as_standard_layout();
        let bias = bias.as_slice().filter(|b| b.len() == out).ok_or_else(|| {
            Error::shape(
                "Linear",
                format!("bias {:?} for {out} outputs", bias.shape()),
            )
        })?;
        let mut filled = Vec::with_capacity(rows * out);
        for _ in 0..rows {
            filled.extend_from_slice(bias);
        }
        Ok(Some(
            Array2::from_shape_vec((rows, out), filled).expect("rows x out values"),
        ))
    }

    /// [`Linear::forward_inference`] for a bf16 weight with the CPU's bf16 dot products
    /// ([`bf16_gemm`]): the product reads the weight's packed transpose
    /// ([`Param::bf16_pairs`]), so no f32 copy of the weight is made.
    fn forward_native_bf16(
        &self,
        x: &ArrayView2<f32>,
        rows: usize,
    ) -> Result<ndarray::ArrayD<f32>> {
        let pairs = self.weight.bf16_pairs()?;
        let mut y = match self.rows_of_bias(rows)? {
            Some(y) => y,
            None => Array2::zeros((rows, self.out_features())),
        };
        bf16_gemm::matmul_pairs_into(&mut y.view_mut(), x, &pairs)?;
        Ok(y.into_dyn())
    }

    /// `x W^T + b` for the rows of `x` `(b, in)` on plain arrays, no gradients: the decoding
    /// step's path (see [`linear_rows`]).
    pub fn forward_rows(&self, x: &ArrayView2<f32>, team: &Team) -> Result<Array2<f32>> {
        Ok(linear_rows(&[self], x, team)?.remove(0))
    }
}

/// Weight values one chunk of [`linear_rows`] reads at least: small enough that a layer splits
/// into chunks both threads can share, large enough that claiming a chunk costs little.
const CHUNK_VALUES: usize = 1 << 15;

/// Several Linear layers applied to the same rows `x` `(b, in)` (the query, key and value
/// projections, say) as matrix-vector products, one result `(b, out_i)` per layer. Their
/// output features are cut into chunks of about `CHUNK_VALUES` weights, all shared over
/// `team`'s threads in one phase: with one token per sequence the product is bound by reading
/// the weights, and two cores read them twice as fast.
///
/// The products read each weight's cached transpose `(in, out)` ([`Param::transposed`], what
/// [`Linear::forward`] reads without a graph): a prompt's pass and the steps after it then
/// stream the same 4 bytes per weight, not two copies of the model, so the first steps find
/// the weights in cache (they read them from DRAM when a separate `(out, in)` copy was used).
pub fn linear_rows(
    layers: &[&Linear],
    x: &ArrayView2<f32>,
    team: &Team,
) -> Result<Vec<Array2<f32>>> {
    let (b, inf) = x.dim();
    if b == 0 {
        return Err(Error::invalid(
            "linear_rows",
            "rows",
            0,
            "needs at least one row (one position per sequence)",
        ));
    }
    let weights: Vec<RowWeights> = layers
        .iter()
        .map(|l| RowWeights::of("Linear", l, inf, l.out_features()))
        .collect::<Result<_>>()?;
    let x = x.as_standard_layout();
    let x = x.as_slice().expect("standard layout");
    // Whole strips of the kernel per chunk, as many as make CHUNK_VALUES weights.
    let strips = (CHUNK_VALUES / (inf.max(1) * GEMV_T_COLS)).max(1);
    let cols_per_chunk = strips * GEMV_T_COLS;
    // Results feature-major, (out_i, b): a chunk of output features is then one contiguous
    // piece each chunk fills alone.
    let mut results: Vec<Vec<f32>> = layers
        .iter()
        .map(|l| vec![0f32; l.out_features() * b])
        .collect();
    // (layer, first column, columns) of every chunk, and the piece of the results it fills.
    let mut chunks = Vec::new();
    let mut pieces = Vec::new();
    for (i, r) in results.iter_mut().enumerate() {
        for (c, piece) in r.chunks_mut(cols_per_chunk * b).enumerate() {
            chunks.push((i, c * cols_per_chunk, piece.len() / b));
            pieces.push(Mutex::new(piece));
        }
    }
    team.for_each_chunk(chunks.len(), &|c| {
        let (i, j0, cols) = chunks[c];
        let mut piece = pieces[c].lock().unwrap_or_else(|e| e.into_inner());
        if b == 1 {
            weights[i].columns(j0, x, &mut piece);
        } else {
            let mut one = vec![0f32; cols];
            for bi in 0..b {
                weights[i].columns(j0, &x[bi * inf..(bi + 1) * inf], &mut one);
                for (r, &y) in one.iter().enumerate() {
                    piece[r * b + bi] = y;
                }
            }
        }
    });
    drop(pieces);
    let outs = results
        .into_iter()
        .zip(layers)
        .map(|(r, l)| {
            let by_feature =
                Array2::from_shape_vec((l.out_features(), b), r).expect("out_features x b results");
            by_feature.t().as_standard_layout().into_owned()
        })
        .collect();
    Ok(outs)
}

/// A Linear layer as the decoding step reads it: its weight's cached transpose `(in, out)`
/// ([`Param::transposed_weights`], f32 or bf16 as the weight is stored, or a bf16 weight's
/// packed transpose for the CPU's bf16 dot products) and its bias, both contiguous, after
/// checking its shape.
pub(crate) struct RowWeights {
    weights: RowSource,
    bias: Option<performer_tensor::Data>,
    outputs: usize,
}

/// Where [`RowWeights`] reads a layer's weights.
enum RowSource {
    /// The cached transpose in the storage type (bf16 widened as it is read).
    Transposed(Transposed),
    /// A bf16 weight's packed transpose, for the CPU's bf16 dot products.
    Pairs(std::sync::Arc<Bf16Pairs>),
}

impl RowWeights {
    /// `layer`'s weights, checked to map `inputs` to `outputs` features; errors name `op`.
    pub(crate) fn of(op: &str, layer: &Linear, inputs: usize, outputs: usize) -> Result<Self> {
        if layer.in_features() != inputs || layer.out_features() != outputs {
            return Err(Error::shape(
                op,
                format!(
                    "a Linear {} -> {} given rows of {inputs} for {outputs} outputs",
                    layer.in_features(),
                    layer.out_features()
                ),
            ));
        }
        let bias = match &layer.bias {
            Some(b) if b.numel() != outputs => {
                return Err(Error::shape(
                    op,
                    format!("bias {:?} for {outputs} output features", b.shape()),
                ));
            }
            Some(b) => {
                let v = b.value();
                Some(if v.is_standard_layout() {
                    v
                } else {
                    v.as_standard_layout().into_owned().into_shared()
                })
            }
            None => None,
        };
        // The mode is read here, on the step's own thread: the helpers that share the product
        // use what it chose.
        let weights = if layer.weight.dtype() == DType::BF16 && bf16_gemm::use_native() {
            RowSource::Pairs(layer.weight.bf16_pairs()?)
        } else {
            RowSource::Transposed(layer.weight.transposed_weights()?)
        };
        Ok(RowWeights {
            weights,
            bias,
            outputs,
        })
    }

    /// The bias, if any.
    pub(crate) fn bias(&self) -> Option<&[f32]> {
        self.bias
            .as_ref()
            .map(|b| b.as_slice().expect("made contiguous"))
    }

    /// `out = x[r0..r0 + x.len()] W^T[r0..r0 + x.len(), c0..c0 + out.len()]`: rows `r0..` of
    /// the transpose times `x`, over the output features from `c0`, in the weight's storage
    /// type (bf16 weights are widened as they are read).
    fn product(&self, r0: usize, c0: usize, x: &[f32], out: &mut [f32]) {
        let n = self.outputs;
        let rows = r0 * n..(r0 + x.len()) * n;
        let transposed = match &self.weights {
            RowSource::Pairs(p) => return bf16_gemm::gemv_pairs(p, r0, c0, x, out),
            RowSource::Transposed(t) => t,
        };
        match transposed {
            Transposed::F32(t) => {
                let t = t.as_slice().expect("a fresh contiguous transpose");
                gemv_t(&t[rows], n, c0, x, out);
            }
            Transposed::BF16(t) => {
                let t = t.as_slice().expect("a fresh contiguous transpose");
                gemv_t_bf16(&t[rows], n, c0, x, out);
            }
        }
    }

    /// `out = x W^T + bias` over the output features `c0..c0 + out.len()`.
    pub(crate) fn columns(&self, c0: usize, x: &[f32], out: &mut [f32]) {
        self.product(0, c0, x, out);
        if let Some(b) = self.bias() {
            let b = &b[c0..c0 + out.len()];
            out.iter_mut().zip(b).for_each(|(o, b)| *o += b);
        }
    }

    /// `out = h W^T[r0..r0 + h.len(), ..]`: the share of the product that the inputs
    /// `r0..r0 + h.len()` contribute (their rows of the transpose), without the bias. A step
    /// that computes its inputs in pieces multiplies each piece as soon as it has it.
    pub(crate) fn rows_share(&self, r0: usize, h: &[f32], out: &mut [f32]) {
        self.product(r0, 0, h, out);
    }
}

impl Module for Linear {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.param("weight", &self.weight);
        if let Some(b) = &self.bias {
            v.param("bias", b);
        }
    }
}
