// FAVOR+ softmax feature map (performer-pytorch `softmax_kernel`), forward and backward.
//
// Per (batch, head) `bh`, with x: n x d, projection P: m x d, dn = d^-0.25, r = m^-0.5:
//   dd[i,j]  = dn * x[i,:] . P[j,:]
//   diag[i]  = dn^2 / 2 * |x[i,:]|^2
//   feat[i,j] = r * (exp(dd[i,j] - diag[i] - stab) + eps)
// where stab is max_j dd[i,j] for queries and max_{i,j} dd[i,j] for keys. The stabiliser is
// detached in the reference, so the backward treats it as a constant:
//   G[i,j] = dfeat[i,j] * (feat[i,j] - r*eps)            (= dL/d(exponent))
//   dx[i,:] = dn * sum_j G[i,j] P[j,:] - dn^2 * (sum_j G[i,j]) * x[i,:]

// dd tile (64 positions x 64 features) with the stabiliser reduced by atomics.
// grid: (ceil(n/64), ceil(m/64), bh); block: 256.
// per_row != 0: stab has one slot per position (queries); else one slot per bh (keys).
// Blocks with blockIdx.y == 0 also write diag (each position once).
extern "C" __global__ void __launch_bounds__(NTHREADS) favor_project(
    const float* __restrict__ x, const float* __restrict__ proj, float* __restrict__ dd,
    float* __restrict__ diag, float* __restrict__ stab, int per_row, int n, int m, int d, float dn)
{
    // Stored transposed ([k][row]) so the inner loop reads a row of each operand per step.
    __shared__ float xs[KSTEP][TILE + 1];
    __shared__ float ps[KSTEP][TILE + 1];
    __shared__ float red[NTHREADS / 32];

    const int bh = blockIdx.z;
    const int row0 = blockIdx.x * TILE;
    const int col0 = blockIdx.y * TILE;
    const int tid = threadIdx.x;
    const int tx = tid % 16;
    const int ty = tid / 16;
    const float* xb = x + (i64)bh * n * d;
    const bool want_diag = blockIdx.y == 0;

    float acc[4][4];
    #pragma unroll
    for (int i = 0; i < 4; ++i)
        #pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    float sq = 0.f; // |x|^2 of row `tid` of the tile, for tid < 64

    for (int k0 = 0; k0 < d; k0 += KSTEP) {
        for (int idx = tid; idx < TILE * KSTEP; idx += NTHREADS) {
            const int r = idx / KSTEP;
            const int kk = idx % KSTEP;
            const int gk = k0 + kk;
            const int gi = row0 + r;
            const int gj = col0 + r;
            xs[kk][r] = (gi < n && gk < d) ? xb[(i64)gi * d + gk] : 0.f;
            ps[kk][r] = (gj < m && gk < d) ? proj[(i64)gj * d + gk] : 0.f;
        }
        __syncthreads();
        #pragma unroll 8
        for (int kk = 0; kk < KSTEP; ++kk) {
            float a[4], b[4];
            #pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = xs[kk][ty + 16 * i];
            #pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = ps[kk][tx + 16 * j];
            #pragma unroll
            for (int i = 0; i < 4; ++i)
                #pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        if (want_diag && tid < TILE) {
            #pragma unroll 8
            for (int kk = 0; kk < KSTEP; ++kk) sq = fmaf(xs[kk][tid], xs[kk][tid], sq);
        }
        __syncthreads();
    }

    float* ddb = dd + (i64)bh * n * m;
    float bmax = __int_as_float(0xff800000);
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int gi = row0 + ty + 16 * i;
        float rmax = __int_as_float(0xff800000);
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int gj = col0 + tx + 16 * j;
            if (gi < n && gj < m) {
                const float v = dn * acc[i][j];
                ddb[(i64)gi * m + gj] = v;
                rmax = fmaxf(rmax, v);
            }
        }
        if (per_row) {
            rmax = max16(rmax);
            if (tx == 0 && gi < n) atomic_max_float(&stab[(i64)bh * n + gi], rmax);
        } else {
            bmax = fmaxf(bmax, rmax);
        }
    }
    if (!per_row) {
        // Block max: 16-lane groups, then the two halves of each warp, then across warps.
        bmax = max16(bmax);
        bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, 16));
        if ((tid & 31) == 0) red[tid / 32] = bmax;
        __syncthreads();
        if (tid == 0) {
            float v = red[0];
            for (int w = 1; w < NTHREADS / 32; ++w) v = fmaxf(v, red[w]);
            atomic_max_float(&stab[bh], v);
        }
    }
    if (want_diag && tid < TILE && row0 + tid < n) {
        diag[(i64)bh * n + row0 + tid] = 0.5f * dn * dn * sq;
    }
}

// In place: feat = ratio * (exp(dd - diag - stab) + eps). One thread per element.
extern "C" __global__ void favor_exp(
    float* __restrict__ feat, const float* __restrict__ diag, const float* __restrict__ stab,
    int per_row, int n, int m, float ratio, float eps, i64 total)
{
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        const i64 row = idx / m;      // position index over bh * n
        const i64 bh = row / n;
        const float s = per_row ? stab[row] : stab[bh];
        feat[idx] = ratio * (expf(feat[idx] - diag[row] - s) + eps);
    }
}

// dx tile (64 positions x 64 input dims), reduction over the m features.
// grid: (ceil(n/64), ceil(d/64), bh); block: 256.
extern "C" __global__ void __launch_bounds__(NTHREADS) favor_backward(
    const float* __restrict__ x, const float* __restrict__ proj, const float* __restrict__ feat,
    const float* __restrict__ gfeat, float* __restrict__ gx, int n, int m, int d, float dn,
    float ratio_eps)
{
    __shared__ float gs[KSTEP][TILE + 1]; // G transposed: [feature][row]
    __shared__ float ps[KSTEP][TILE + 1]; // P: [feature][input dim]
    __shared__ float rowsum[TILE];

    const int bh = blockIdx.z;
    const int row0 = blockIdx.x * TILE;
    const int col0 = blockIdx.y * TILE;
    const int tid = threadIdx.x;
    const int tx = tid % 16;
    const int ty = tid / 16;
    const float* fb = feat + (i64)bh * n * m;
    const float* gb = gfeat + (i64)bh * n * m;

    float acc[4][4];
    #pragma unroll
    for (int i = 0; i < 4; ++i)
        #pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    float rs = 0.f;

    for (int k0 = 0; k0 < m; k0 += KSTEP) {
        for (int idx = tid; idx < TILE * KSTEP; idx += NTHREADS) {
            const int r = idx / KSTEP;
            const int kk = idx % KSTEP;
            const int gi = row0 + r;
            const int gk = k0 + kk;
            float g = 0.f;
            if (gi < n && gk < m) {
                const i64 off = (i64)gi * m + gk;
                g = gb[off] * (fb[off] - ratio_eps);
            }
            gs[kk][r] = g;
        }
        for (int idx = tid; idx < TILE * KSTEP; idx += NTHREADS) {
            const int kk = idx / TILE;
            const int c = idx % TILE;
            const int gk = k0 + kk;
            const int gc = col0 + c;
            ps[kk][c] = (gk < m && gc < d) ? proj[(i64)gk * d + gc] : 0.f;
        }
        __syncthreads();
        #pragma unroll 8
        for (int kk = 0; kk < KSTEP; ++kk) {
            float a[4], b[4];
            #pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = gs[kk][ty + 16 * i];
            #pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = ps[kk][tx + 16 * j];
            #pragma unroll
            for (int i = 0; i < 4; ++i)
                #pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        if (tid < TILE) {
            #pragma unroll 8
            for (int kk = 0; kk < KSTEP; ++kk) rs += gs[kk][tid];
        }
        __syncthreads();
    }
    if (tid < TILE) rowsum[tid] = rs;
    __syncthreads();

    const float* xb = x + (i64)bh * n * d;
    float* gxb = gx + (i64)bh * n * d;
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = ty + 16 * i;
        const int gi = row0 + r;
        if (gi >= n) continue;
        const float corr = dn * dn * rowsum[r];
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int gc = col0 + tx + 16 * j;
            if (gc < d) {
                const i64 off = (i64)gi * d + gc;
                gxb[off] = dn * acc[i][j] - corr * xb[off];
            }
        }
    }
}
