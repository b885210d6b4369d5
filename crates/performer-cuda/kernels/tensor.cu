// General tensor kernels of the device path: element-wise ops and their backward, broadcasting,
// strided copies, reductions, softmax, layer norm, embedding, cross-entropy, dropout, rotary,
// token shift and the optimizers. Every tensor is contiguous and row-major unless a `meta`
// array describes strides. Sizes of whole tensors are i64; row widths int.
//
// `meta` (a `StridedIndex`, passed by value as a kernel parameter, so a launch uploads nothing)
// describes an index mapping for the strided kernels: a logical row-major index space of
// `rank` axes (`shape`) and, for each operand, its element strides over those axes (0 on a
// broadcast axis). The host merges axes that are contiguous for every operand and drops axes
// of size 1 before it fills one, so `rank` is rarely above 4; it refuses more than
// STRIDED_MAX_RANK.

#define NEG_INF __int_as_float(0xff800000)

#define GRID_STRIDE(i, total) \
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < (total); i += (i64)gridDim.x * blockDim.x)

#define STRIDED_MAX_RANK 8
#define STRIDED_MAX_OPERANDS 3

// Mirrors `StridedIndex` in performer-cuda's launcher.rs (repr(C), 264 bytes).
struct StridedIndex {
    i64 rank;
    i64 shape[STRIDED_MAX_RANK];
    i64 stride[STRIDED_MAX_OPERANDS][STRIDED_MAX_RANK];
};
static_assert(sizeof(StridedIndex) == 264, "StridedIndex must match the host's layout");

// Offset of the logical row-major index `idx` in operand `which` under `meta`.
__device__ __forceinline__ i64 strided_offset(const StridedIndex& meta, i64 idx, int which) {
    const int rank = (int)meta.rank;
    i64 off = 0;
    for (int a = rank - 1; a >= 0; --a) {
        const i64 s = meta.shape[a];
        off += (idx % s) * meta.stride[which][a];
        idx /= s;
    }
    return off;
}

// ---------------------------------------------------------------------------------------------
// Element-wise

#define U_NEG 0
#define U_EXP 1
#define U_LOG 2
#define U_SQRT 3
#define U_RELU 4
#define U_GELU 5
#define U_TANH 6
#define U_SIGMOID 7
#define U_ABS 8
#define U_AFFINE 9   // a * x + b
#define U_POW 10     // x ^ a
#define U_RECIP 11
#define U_SQUARE 12
#define U_SILU 13
#define U_CLAMP 14   // into [a, b]
#define U_ELU 15
#define U_SOFTPLUS 16  // beta 1, threshold 20 (torch.nn.Softplus)
#define U_LEAKY_RELU 17  // slope a below 0

__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + expf(-x)); }

__device__ __forceinline__ float unary_value(int op, float x, float a, float b) {
    switch (op) {
        case U_NEG: return -x;
        case U_EXP: return expf(x);
        case U_LOG: return logf(x);
        case U_SQRT: return sqrtf(x);
        case U_RELU: return x > 0.f ? x : 0.f;
        case U_GELU: return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
        case U_TANH: return tanhf(x);
        case U_SIGMOID: return sigmoid_f(x);
        case U_ABS: return fabsf(x);
        case U_AFFINE: return a * x + b;
        case U_POW: return powf(x, a);
        case U_RECIP: return 1.f / x;
        case U_SQUARE: return x * x;
        case U_SILU: return x * sigmoid_f(x);
        // NaN passes through (neither comparison holds), as on the CPU.
        case U_CLAMP: return x < a ? a : (x > b ? b : x);
        case U_ELU: return x > 0.f ? x : expm1f(x);
        case U_SOFTPLUS: return x > 20.f ? x : log1pf(expf(x));
        case U_LEAKY_RELU: return x > 0.f ? x : a * x;
        default: return __int_as_float(0x7fc00000);  // NaN: an unknown op cannot pass a test
    }
}

// d y / d x at x (y = the forward's output).
__device__ __forceinline__ float unary_slope(int op, float x, float y, float a, float b) {
    switch (op) {
        case U_NEG: return -1.f;
        case U_EXP: return y;
        case U_LOG: return 1.f / x;
        case U_SQRT: return 0.5f / y;
        case U_RELU: return x > 0.f ? 1.f : 0.f;
        case U_GELU: {
            const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
            const float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
            return cdf + x * pdf;
        }
        case U_TANH: return 1.f - y * y;
        case U_SIGMOID: return y * (1.f - y);
        case U_ABS: return x > 0.f ? 1.f : (x < 0.f ? -1.f : 0.f);
        case U_AFFINE: return a;
        case U_POW: return a * powf(x, a - 1.f);
        case U_RECIP: return -y * y;
        case U_SQUARE: return 2.f * x;
        case U_SILU: {
            const float s = sigmoid_f(x);
            return s * (1.f + x * (1.f - s));
        }
        // PyTorch's clamp passes the gradient on the closed interval.
        case U_CLAMP: return (x >= a && x <= b) ? 1.f : 0.f;
        case U_ELU: return x > 0.f ? 1.f : y + 1.f;
        case U_SOFTPLUS: return x > 20.f ? 1.f : sigmoid_f(x);
        case U_LEAKY_RELU: return x > 0.f ? 1.f : a;
        default: return __int_as_float(0x7fc00000);
    }
}

extern "C" __global__ void unary_f32(const float* __restrict__ x, float* __restrict__ y, i64 n,
                                     int op, float a, float b)
{
    GRID_STRIDE(i, n) y[i] = unary_value(op, x[i], a, b);
}

// gx = gy * f'(x); y is the forward's output (used by exp, sqrt, tanh, sigmoid, recip).
extern "C" __global__ void unary_backward_f32(const float* __restrict__ x, const float* __restrict__ y,
                                              const float* __restrict__ gy, float* __restrict__ gx,
                                              i64 n, int op, float a, float b)
{
    GRID_STRIDE(i, n) gx[i] = gy[i] * unary_slope(op, x[i], y[i], a, b);
}

#define B_ADD 0
#define B_SUB 1
#define B_MUL 2
#define B_DIV 3
#define B_MAX 4
#define B_MIN 5
#define B_POW 6

__device__ __forceinline__ float binary_value(int op, float a, float b) {
    switch (op) {
        case B_ADD: return a + b;
        case B_SUB: return a - b;
        case B_MUL: return a * b;
        case B_DIV: return a / b;
        case B_MAX: return fmaxf(a, b);
        case B_MIN: return fminf(a, b);
        case B_POW: return powf(a, b);
        default: return __int_as_float(0x7fc00000);
    }
}

// out[i] = a[off_a(i)] op b[off_b(i)], meta = [rank, shape, stride_a, stride_b].
extern "C" __global__ void binary_f32(const float* __restrict__ a, const float* __restrict__ b,
                                      float* __restrict__ out, i64 n, int op,
                                      const StridedIndex meta)
{
    GRID_STRIDE(i, n) {
        out[i] = binary_value(op, a[strided_offset(meta, i, 0)], b[strided_offset(meta, i, 1)]);
    }
}

// Full-size partial gradients of a binary op (reduced to each operand's shape by sum_to_f32):
// ga[i] = gout[i] * d(a op b)/da, gb[i] likewise; either may be null. Max and min split the
// gradient evenly between tied operands, as the CPU path does; pow's exponent gets no gradient
// where the base is <= 0, nor its base where the exponent is 0 (the CPU's conventions).
extern "C" __global__ void binary_backward_f32(const float* __restrict__ a, const float* __restrict__ b,
                                               const float* __restrict__ gout, float* __restrict__ ga,
                                               float* __restrict__ gb, i64 n, int op,
                                               const StridedIndex meta)
{
    GRID_STRIDE(i, n) {
        const float x = a[strided_offset(meta, i, 0)];
        const float y = b[strided_offset(meta, i, 1)];
        const float g = gout[i];
        float da = 0.f, db = 0.f;
        switch (op) {
            case B_ADD: da = g; db = g; break;
            case B_SUB: da = g; db = -g; break;
            case B_MUL: da = g * y; db = g * x; break;
            case B_DIV: da = g / y; db = -g * x / (y * y); break;
            case B_MAX:
            case B_MIN: {
                const bool first = (op == B_MAX) == (x > y);
                da = x == y ? 0.5f * g : (first ? g : 0.f);
                db = x == y ? 0.5f * g : (first ? 0.f : g);
                break;
            }
            case B_POW:
                da = y == 0.f ? 0.f : g * y * powf(x, y - 1.f);
                db = x > 0.f ? g * powf(x, y) * logf(x) : 0.f;
                break;
            default: da = db = __int_as_float(0x7fc00000);
        }
        if (ga) ga[i] = da;
        if (gb) gb[i] = db;
    }
}

// y[i] = x[off(i)], meta = [rank, shape, stride_x]: permutes, slices (x offset by the caller),
// broadcasts (stride 0) and makes contiguous.
extern "C" __global__ void strided_copy_f32(const float* __restrict__ x, float* __restrict__ y, i64 n,
                                            const StridedIndex meta)
{
    GRID_STRIDE(i, n) y[i] = x[strided_offset(meta, i, 0)];
}

// y[j] = sum over the reduced axes of x: meta = [rank, shape, stride_x] describes the kept
// axes (y's row-major index space, n_out elements), then meta2 = [rank2, shape2, stride_x2]
// the summed axes. One thread per output, summing in a fixed order (deterministic).
extern "C" __global__ void sum_to_f32(const float* __restrict__ x, float* __restrict__ y, i64 n_out,
                                      const StridedIndex meta, const StridedIndex meta2,
                                      i64 n_red)
{
    GRID_STRIDE(j, n_out) {
        const float* base = x + strided_offset(meta, j, 0);
        float s = 0.f;
        for (i64 r = 0; r < n_red; ++r) s += base[strided_offset(meta2, r, 0)];
        y[j] = s;
    }
}

// dst[off(i)] = src[i], meta = [rank, shape, stride_dst]: writes a contiguous tensor into a
// view of a larger one (dst offset by the caller): the inverse of strided_copy_f32, for narrow's
// backward, pad and cat. The view's offsets are distinct, so no two threads write one element.
extern "C" __global__ void strided_scatter_f32(const float* __restrict__ src, float* __restrict__ dst,
                                               i64 n, const StridedIndex meta)
{
    GRID_STRIDE(i, n) dst[strided_offset(meta, i, 0)] = src[i];
}

// ---------------------------------------------------------------------------------------------
// Gather along one axis (index_select, gather): out[i] = x[off_x(i) + idx[off_idx(i)] * step],
// meta = [rank, shape (the output's), stride_x (0 on the gathered axis), stride_idx]. Indices
// were checked by the host. The backward adds each output's gradient into the element it was
// read from (gx zeroed by the caller); repeated indices meet in atomicAdd.

extern "C" __global__ void gather_f32(const float* __restrict__ x, const i64* __restrict__ idx,
                                      float* __restrict__ out, i64 n, i64 step,
                                      const StridedIndex meta)
{
    GRID_STRIDE(i, n) {
        out[i] = x[strided_offset(meta, i, 0) + idx[strided_offset(meta, i, 1)] * step];
    }
}

extern "C" __global__ void gather_backward_f32(const float* __restrict__ gout,
                                               const i64* __restrict__ idx, float* __restrict__ gx,
                                               i64 n, i64 step, const StridedIndex meta)
{
    GRID_STRIDE(i, n) {
        atomicAdd(&gx[strided_offset(meta, i, 0) + idx[strided_offset(meta, i, 1)] * step], gout[i]);
    }
}

// ---------------------------------------------------------------------------------------------
// Select by a condition (where, masked_fill): out[i] = cond[off_c(i)] != 0 ? a[off_a(i)] :
// b[off_b(i)], meta = [rank, shape, stride_cond, stride_a, stride_b]. The backward writes the
// full-size partial gradients (reduced to each operand's shape by sum_to_f32), meta = [rank,
// shape, stride_cond]; ga or gb may be null.

extern "C" __global__ void where_f32(const float* __restrict__ cond, const float* __restrict__ a,
                                     const float* __restrict__ b, float* __restrict__ out, i64 n,
                                     const StridedIndex meta)
{
    GRID_STRIDE(i, n) {
        out[i] = cond[strided_offset(meta, i, 0)] != 0.f ? a[strided_offset(meta, i, 1)]
                                                         : b[strided_offset(meta, i, 2)];
    }
}

extern "C" __global__ void where_backward_f32(const float* __restrict__ cond,
                                              const float* __restrict__ gout, float* __restrict__ ga,
                                              float* __restrict__ gb, i64 n,
                                              const StridedIndex meta)
{
    GRID_STRIDE(i, n) {
        const bool c = cond[strided_offset(meta, i, 0)] != 0.f;
        if (ga) ga[i] = c ? gout[i] : 0.f;
        if (gb) gb[i] = c ? 0.f : gout[i];
    }
}

// ---------------------------------------------------------------------------------------------
// Backward of the row reductions of reduce_rows_f32 over (rows, cols):
// max: the gradient of each row's maximum m[r] shared evenly among the elements equal to it
// (PyTorch's amax); one thread per row counts its ties, then writes its row.
extern "C" __global__ void max_rows_backward_f32(const float* __restrict__ x,
                                                 const float* __restrict__ m,
                                                 const float* __restrict__ gm,
                                                 float* __restrict__ gx, i64 rows, i64 cols)
{
    GRID_STRIDE(r, rows) {
        const float* xr = x + r * cols;
        const float mr = m[r];
        float ties = 0.f;
        for (i64 c = 0; c < cols; ++c) ties += xr[c] == mr ? 1.f : 0.f;
        const float share = gm[r] / ties;
        for (i64 c = 0; c < cols; ++c) gx[r * cols + c] = xr[c] == mr ? share : 0.f;
    }
}

// norm (the Euclidean norm nrm[r] of each row): gx = gn * x / nrm, 0 where the norm is 0.
extern "C" __global__ void norm_rows_backward_f32(const float* __restrict__ x,
                                                  const float* __restrict__ nrm,
                                                  const float* __restrict__ gn,
                                                  float* __restrict__ gx, i64 rows, i64 cols)
{
    GRID_STRIDE(i, rows * cols) {
        const i64 r = i / cols;
        const float n = nrm[r];
        gx[i] = n > 0.f ? gn[r] * x[i] / n : 0.f;
    }
}

// ---------------------------------------------------------------------------------------------
// Row reductions: one block of NTHREADS per row (grid-stride over rows).

#define R_SUM 0
#define R_MAX 1
#define R_SUMSQ 2

// Reduces v over the block with `op` (sum or max); every thread gets the result.
__device__ __forceinline__ float block_reduce(float v, int op, float* red) {
    const int tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    for (int off = 16; off > 0; off >>= 1) {
        const float o = __shfl_xor_sync(0xffffffffu, v, off);
        v = op == R_MAX ? fmaxf(v, o) : v + o;
    }
    if (lane == 0) red[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    float r = red[0];
    for (int w = 1; w < warps; ++w) r = op == R_MAX ? fmaxf(r, red[w]) : r + red[w];
    __syncthreads();  // red may be reused by the next call
    return r;
}

extern "C" __global__ void __launch_bounds__(NTHREADS) reduce_rows_f32(
    const float* __restrict__ x, float* __restrict__ y, i64 rows, i64 cols, int op)
{
    __shared__ float red[NTHREADS / 32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + r * cols;
        float v = op == R_MAX ? NEG_INF : 0.f;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            const float e = xr[c];
            v = op == R_MAX ? fmaxf(v, e) : (op == R_SUMSQ ? v + e * e : v + e);
        }
        v = block_reduce(v, op == R_MAX ? R_MAX : R_SUM, red);
        if (threadIdx.x == 0) y[r] = v;
    }
}

// y[c] = sum_r x[r, c] (column sums: gradients of broadcast row parameters).
extern "C" __global__ void sum_cols_f32(const float* __restrict__ x, float* __restrict__ y, i64 rows,
                                        i64 cols)
{
    GRID_STRIDE(c, cols) {
        float s = 0.f;
        for (i64 r = 0; r < rows; ++r) s += x[r * cols + c];
        y[c] = s;
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax over the last axis (log_softmax when `log`), and its backward from the output.

extern "C" __global__ void __launch_bounds__(NTHREADS) softmax_rows_f32(
    const float* __restrict__ x, float* __restrict__ y, i64 rows, i64 cols, int log_out)
{
    __shared__ float red[NTHREADS / 32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + r * cols;
        float* yr = y + r * cols;
        float mx = NEG_INF;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) mx = fmaxf(mx, xr[c]);
        mx = block_reduce(mx, R_MAX, red);
        float s = 0.f;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) s += expf(xr[c] - mx);
        s = block_reduce(s, R_SUM, red);
        const float ls = logf(s);
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            const float z = xr[c] - mx;
            yr[c] = log_out ? z - ls : expf(z) / s;
        }
    }
}

// softmax: gx = y * (gy - sum(gy * y)); log_softmax: gx = gy - exp(y) * sum(gy).
extern "C" __global__ void __launch_bounds__(NTHREADS) softmax_rows_backward_f32(
    const float* __restrict__ y, const float* __restrict__ gy, float* __restrict__ gx, i64 rows,
    i64 cols, int log_out)
{
    __shared__ float red[NTHREADS / 32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* yr = y + r * cols;
        const float* gr = gy + r * cols;
        float* out = gx + r * cols;
        float s = 0.f;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) s += log_out ? gr[c] : gr[c] * yr[c];
        s = block_reduce(s, R_SUM, red);
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x)
            out[c] = log_out ? gr[c] - expf(yr[c]) * s : yr[c] * (gr[c] - s);
    }
}

// ---------------------------------------------------------------------------------------------
// Layer norm over the last axis: y = (x - mean) * rstd * gamma + beta (gamma, beta nullable).
// mean and rstd (one per row) are kept for the backward.

extern "C" __global__ void __launch_bounds__(NTHREADS) layer_norm_rows_f32(
    const float* __restrict__ x, const float* __restrict__ gamma, const float* __restrict__ beta,
    float* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out, i64 rows,
    i64 cols, float eps)
{
    __shared__ float red[NTHREADS / 32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + r * cols;
        float s = 0.f;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) s += xr[c];
        const float mean = block_reduce(s, R_SUM, red) / (float)cols;
        float q = 0.f;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            const float d = xr[c] - mean;
            q += d * d;
        }
        const float var = block_reduce(q, R_SUM, red) / (float)cols;
        const float rstd = 1.f / sqrtf(var + eps);
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            float v = (xr[c] - mean) * rstd;
            if (gamma) v *= gamma[c];
            if (beta) v += beta[c];
            y[r * cols + c] = v;
        }
        if (threadIdx.x == 0) {
            mean_out[r] = mean;
            rstd_out[r] = rstd;
        }
    }
}

// gx, and gy * xhat per element (its column sums are d gamma; those of gy are d beta).
extern "C" __global__ void __launch_bounds__(NTHREADS) layer_norm_rows_backward_f32(
    const float* __restrict__ x, const float* __restrict__ gamma, const float* __restrict__ mean_in,
    const float* __restrict__ rstd_in, const float* __restrict__ gy, float* __restrict__ gx,
    float* __restrict__ gy_xhat, i64 rows, i64 cols)
{
    __shared__ float red[NTHREADS / 32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float mean = mean_in[r], rstd = rstd_in[r];
        const float* xr = x + r * cols;
        const float* gr = gy + r * cols;
        float s1 = 0.f, s2 = 0.f;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            const float xhat = (xr[c] - mean) * rstd;
            const float g = gr[c] * (gamma ? gamma[c] : 1.f);
            s1 += g;
            s2 += g * xhat;
        }
        s1 = block_reduce(s1, R_SUM, red);
        s2 = block_reduce(s2, R_SUM, red);
        const float inv_n = 1.f / (float)cols;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            const float xhat = (xr[c] - mean) * rstd;
            const float g = gr[c] * (gamma ? gamma[c] : 1.f);
            gx[r * cols + c] = rstd * (g - inv_n * s1 - xhat * inv_n * s2);
            if (gy_xhat) gy_xhat[r * cols + c] = gr[c] * xhat;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scale norm (performer-pytorch's ScaleNorm): y = x / max(|x|, eps) * g with one learned scalar
// g (read from the device). norm_out keeps max(|x|, eps) per row for the backward.

extern "C" __global__ void __launch_bounds__(NTHREADS) scale_norm_rows_f32(
    const float* __restrict__ x, const float* __restrict__ g, float* __restrict__ y,
    float* __restrict__ norm_out, i64 rows, i64 cols, float eps)
{
    __shared__ float red[NTHREADS / 32];
    const float gv = g[0];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + r * cols;
        float q = 0.f;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) q += xr[c] * xr[c];
        const float n = fmaxf(sqrtf(block_reduce(q, R_SUM, red)), eps);
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) y[r * cols + c] = xr[c] / n * gv;
        if (threadIdx.x == 0) norm_out[r] = n;
    }
}

// gx = g / n * (gy - [|x| > eps] * (x . gy) / n^2 * x), and per row (gy . x) / n (their sum is
// d g).
extern "C" __global__ void __launch_bounds__(NTHREADS) scale_norm_rows_backward_f32(
    const float* __restrict__ x, const float* __restrict__ g, const float* __restrict__ norm_in,
    const float* __restrict__ gy, float* __restrict__ gx, float* __restrict__ dg_rows, i64 rows,
    i64 cols, float eps)
{
    __shared__ float red[NTHREADS / 32];
    const float gv = g[0];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + r * cols;
        const float* gr = gy + r * cols;
        float dot = 0.f, q = 0.f;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            dot += xr[c] * gr[c];
            q += xr[c] * xr[c];
        }
        dot = block_reduce(dot, R_SUM, red);
        q = block_reduce(q, R_SUM, red);
        const float n = norm_in[r];
        // Where the clamp is active the norm is the constant eps: no gradient through it.
        const float through = sqrtf(q) > eps ? dot / (n * n) : 0.f;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x)
            gx[r * cols + c] = gv / n * (gr[c] - through * xr[c]);
        if (threadIdx.x == 0) dg_rows[r] = dot / n;
    }
}

// ---------------------------------------------------------------------------------------------
// Embedding: out[i, :] = table[ids[i], :]; an id outside [0, vocab) sets *err to 1 (checked by
// the host when it next reads) and writes zeros instead of reading out of bounds.

extern "C" __global__ void embedding_f32(const float* __restrict__ table, const i64* __restrict__ ids,
                                         float* __restrict__ out, i64 n_ids, int dim, i64 vocab,
                                         int* __restrict__ err)
{
    GRID_STRIDE(i, n_ids * dim) {
        const i64 row = i / dim;
        const int c = (int)(i % dim);
        const i64 id = ids[row];
        if (id < 0 || id >= vocab) {
            atomicExch(err, 1);
            out[i] = 0.f;
        } else {
            out[i] = table[id * dim + c];
        }
    }
}

// gtable[ids[i], :] += gout[i, :] (gtable zeroed by the caller; ids already checked).
extern "C" __global__ void embedding_backward_f32(const float* __restrict__ gout,
                                                  const i64* __restrict__ ids,
                                                  float* __restrict__ gtable, i64 n_ids, int dim,
                                                  i64 vocab)
{
    GRID_STRIDE(i, n_ids * dim) {
        const i64 id = ids[i / dim];
        if (id >= 0 && id < vocab) atomicAdd(&gtable[id * dim + (i % dim)], gout[i]);
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy over rows of logits with integer targets: loss[r] = lse_r - logits[r, t_r], 0
// where t_r == ignore_index (valid[r] = 0 there, 1 elsewhere); a target outside [0, cols) that
// is not ignore_index sets *err.

extern "C" __global__ void __launch_bounds__(NTHREADS) cross_entropy_f32(
    const float* __restrict__ logits, const i64* __restrict__ targets, float* __restrict__ loss,
    float* __restrict__ valid, float* __restrict__ lse_out, i64 rows, i64 cols, i64 ignore_index,
    int* __restrict__ err)
{
    __shared__ float red[NTHREADS / 32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = logits + r * cols;
        float mx = NEG_INF;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) mx = fmaxf(mx, xr[c]);
        mx = block_reduce(mx, R_MAX, red);
        float s = 0.f;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) s += expf(xr[c] - mx);
        s = block_reduce(s, R_SUM, red);
        if (threadIdx.x == 0) {
            const float lse = mx + logf(s);
            const i64 t = targets[r];
            lse_out[r] = lse;
            if (t == ignore_index) {
                loss[r] = 0.f;
                valid[r] = 0.f;
            } else if (t < 0 || t >= cols) {
                atomicExch(err, 1);
                loss[r] = 0.f;
                valid[r] = 0.f;
            } else {
                loss[r] = lse - xr[t];
                valid[r] = 1.f;
            }
        }
    }
}

// Backward of the mean over valid rows: glogits[r, c] = (softmax - onehot) * gloss / count,
// with gloss and count read from device scalars (no host round trip); 0 on ignored rows.
extern "C" __global__ void cross_entropy_backward_f32(
    const float* __restrict__ logits, const i64* __restrict__ targets, const float* __restrict__ lse,
    const float* __restrict__ gloss, const float* __restrict__ count, float* __restrict__ glogits,
    i64 rows, i64 cols, i64 ignore_index)
{
    const float scale = gloss[0] / count[0];
    GRID_STRIDE(i, rows * cols) {
        const i64 r = i / cols, c = i % cols;
        const i64 t = targets[r];
        if (t == ignore_index || t < 0 || t >= cols) {
            glogits[i] = 0.f;
        } else {
            const float p = expf(logits[i] - lse[r]);
            glogits[i] = (p - (c == t ? 1.f : 0.f)) * scale;
        }
    }
}

// out[0] = num[0] / den[0] (a mean whose count lives on the device).
extern "C" __global__ void ratio_f32(const float* __restrict__ num, const float* __restrict__ den,
                                     float* __restrict__ out)
{
    if (blockIdx.x == 0 && threadIdx.x == 0) out[0] = num[0] / den[0];
}

// ---------------------------------------------------------------------------------------------
// Dropout from a counter-based generator: element i of a call keeps its value when
// hash(seed, offset + i) >= p, so the same (seed, offset) replays the same mask (the reversible
// stack's backward and the dropout backward both recompute it instead of storing it).

__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// A uniform in [0, 1) from (seed, counter): two rounds of splitmix64's finaliser.
__device__ __forceinline__ float counter_uniform(unsigned long long seed, unsigned long long ctr) {
    const unsigned long long h = mix64(mix64(seed ^ 0x9E3779B97F4A7C15ULL) + ctr);
    return (float)(h >> 40) * (1.0f / 16777216.0f);
}

// y = x * keep / (1 - p) (also the backward, applied to the output gradient).
extern "C" __global__ void dropout_f32(const float* __restrict__ x, float* __restrict__ y, i64 n,
                                       float p, unsigned long long seed, unsigned long long offset)
{
    const float scale = 1.f / (1.f - p);
    GRID_STRIDE(i, n) {
        const bool keep = counter_uniform(seed, offset + (unsigned long long)i) >= p;
        y[i] = keep ? x[i] * scale : 0.f;
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding (performer-pytorch's rotate_every_two): x (groups, n, d), sin and cos (n, d)
// with each value repeated for the pair; y = x * cos + rot(x) * sin with rot(x1, x2) =
// (-x2, x1). `transpose` applies the adjoint, which is the backward: g * cos + rot^T(g * sin),
// rot^T(g1, g2) = (g2, -g1).

extern "C" __global__ void rotary_f32(const float* __restrict__ x, const float* __restrict__ sin_t,
                                      const float* __restrict__ cos_t, float* __restrict__ y,
                                      i64 groups, int n, int d, int transpose)
{
    GRID_STRIDE(i, groups * n * d) {
        const int c = (int)(i % d);
        const i64 pos = (i / d) % n;
        const i64 pi = pos * d + c;
        const bool even = (c & 1) == 0;
        const float partner = x[even ? i + 1 : i - 1];
        float rot;
        if (!transpose) {
            rot = even ? -partner : partner;            // rot(x)[c]
            y[i] = x[i] * cos_t[pi] + rot * sin_t[pi];
        } else {
            const float ps = sin_t[even ? pi + 1 : pi - 1];
            rot = even ? partner * ps : -partner * ps;  // rot^T(x * sin)[c]
            y[i] = x[i] * cos_t[pi] + rot;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Token shift: x (b, n, d); columns [col0, col1) move `shift` positions along n (zeros where
// they leave the sequence), other columns are copied. The backward is the shift by -shift.

extern "C" __global__ void token_shift_f32(const float* __restrict__ x, float* __restrict__ y,
                                           i64 batch, int n, int d, int col0, int col1, int shift)
{
    GRID_STRIDE(i, batch * n * d) {
        const int c = (int)(i % d);
        const int t = (int)((i / d) % n);
        if (c < col0 || c >= col1) {
            y[i] = x[i];
        } else {
            const int src = t - shift;
            y[i] = (src >= 0 && src < n) ? x[i + (i64)(src - t) * d] : 0.f;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Optimizers (PyTorch's update rules), one element per thread.

// Adam (decoupled == 0: L2 weight decay added to the gradient) or AdamW (decoupled != 0:
// p *= 1 - lr * wd). bc1 = 1 - beta1^t and bc2 = 1 - beta2^t come from the host's step count.
extern "C" __global__ void adam_f32(float* __restrict__ p, const float* __restrict__ g,
                                    float* __restrict__ m, float* __restrict__ v, i64 n, float lr,
                                    float beta1, float beta2, float eps, float wd, float bc1,
                                    float bc2, int decoupled)
{
    GRID_STRIDE(i, n) {
        float gi = g[i];
        float pi = p[i];
        if (wd != 0.f) {
            if (decoupled) pi *= 1.f - lr * wd;
            else gi += wd * pi;
        }
        const float mi = beta1 * m[i] + (1.f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        const float denom = sqrtf(vi / bc2) + eps;
        p[i] = pi - lr * (mi / bc1) / denom;
    }
}

// SGD with momentum (PyTorch: the buffer starts as the first gradient), dampening and
// Nesterov; `first` marks the first step. buf may be null when momentum == 0.
extern "C" __global__ void sgd_f32(float* __restrict__ p, const float* __restrict__ g,
                                   float* __restrict__ buf, i64 n, float lr, float momentum,
                                   float dampening, float wd, int nesterov, int first)
{
    GRID_STRIDE(i, n) {
        float d = g[i] + wd * p[i];
        if (momentum != 0.f) {
            const float b = first ? d : momentum * buf[i] + (1.f - dampening) * d;
            buf[i] = b;
            d = nesterov ? d + momentum * b : b;
        }
        p[i] -= lr * d;
    }
}

// Gradient clipping by the global norm: x *= min(1, max_norm / (sqrt(sumsq[0]) + 1e-6)), with
// the sum of squares already on the device.
extern "C" __global__ void clip_scale_f32(float* __restrict__ x, i64 n, const float* __restrict__ sumsq,
                                          float max_norm)
{
    const float scale = fminf(1.f, max_norm / (sqrtf(sumsq[0]) + 1e-6f));
    GRID_STRIDE(i, n) x[i] *= scale;
}

// ---------------------------------------------------------------------------------------------
// bf16 storage (autocast). A bf16 value is the upper 16 bits of an f32, held as an unsigned
// short so that the emulator's C++ needs no cuda_bf16.h. Narrowing rounds to nearest, ties to
// even, with integer ops (the same bits as __float2bfloat16_rn): NaN stays a (quiet) NaN,
// values past bf16's largest finite round to infinity. Widening is exact.

__device__ __forceinline__ unsigned short f32_to_bf16_bits(float x) {
    const unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x0040u);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float bf16_bits_to_f32(unsigned short b) {
    return __uint_as_float((unsigned)b << 16);
}

extern "C" __global__ void f32_to_bf16(const float* __restrict__ x, unsigned short* __restrict__ y,
                                       i64 n)
{
    GRID_STRIDE(i, n) y[i] = f32_to_bf16_bits(x[i]);
}

extern "C" __global__ void bf16_to_f32(const unsigned short* __restrict__ x, float* __restrict__ y,
                                       i64 n)
{
    GRID_STRIDE(i, n) y[i] = bf16_bits_to_f32(x[i]);
}
