// Element-wise helpers of non-causal linear attention. The products themselves are cuBLAS
// strided-batched GEMMs on (e+1)-column "augmented" buffers whose last column carries the
// normalizer: [v | 1] turns k'^T v into [k'^T v | sum_j k'_j], and q' times that gives
// [num | den] in one GEMM (same trick in the backward with [dnum | dden]).

// vaug[r, :] = [v[r, :], 1]
extern "C" __global__ void augment_ones(const float* __restrict__ v, float* __restrict__ vaug,
                                        i64 rows, int e)
{
    const i64 total = rows * (e + 1);
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        const i64 r = idx / (e + 1);
        const int c = (int)(idx % (e + 1));
        vaug[idx] = c < e ? v[r * e + c] : 1.f;
    }
}

// out[r, c] = num_aug[r, c] / num_aug[r, e]
extern "C" __global__ void normalize_rows(const float* __restrict__ num_aug, float* __restrict__ out,
                                          i64 rows, int e)
{
    const i64 total = rows * e;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        const i64 r = idx / e;
        const int c = (int)(idx % e);
        out[idx] = num_aug[r * (e + 1) + c] / num_aug[r * (e + 1) + e];
    }
}

// x[0..len) = value. Starts the feature stabiliser at -inf (the identity of the atomic max),
// and poisons fresh buffers in tests so that an element no kernel wrote cannot pass as zero.
extern "C" __global__ void fill_f32(float* __restrict__ x, i64 len, float value)
{
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < len; i += (i64)gridDim.x * blockDim.x) {
        x[i] = value;
    }
}
