// Causal linear attention, chunkwise (the algorithm of flash-linear-attention's chunk kernels):
// positions are cut into chunks of 64; within a chunk a masked 64x64 product, across chunks a
// running state. Per (batch, head) `bh`, with features qf, kf: n x m and values v: n x e:
//
//   num_i = sum_{j<=i} (qf_i . kf_j) v_j
//   den_i = sum_{j<=i} (qf_i . kf_j) + eps * sum(qf_i)      (performer-pytorch adds eps to every
//                                                             element of the key cumsum)
//   out_i = num_i / den_i
//
// State before chunk c: h_c = sum_{j < 64c} kf_j v_j^T (m x e) and z_c = sum_{j < 64c} kf_j (m).
// Backward, with dnum_i = g_i / den_i and dden_i = -(g_i . out_i) / den_i:
//   dqf_i = sum_{j<=i} (dnum_i . v_j + dden_i) kf_j + eps * dden_i
//   dkf_j = sum_{i>=j} (dnum_i . v_j + dden_i) qf_i
//   dv_j  = sum_{i>=j} (qf_i . kf_j) dnum_i
// The reverse states are U_c = sum_{i >= 64(c+1)} qf_i dnum_i^T and u_c = sum_{i >= 64(c+1)} qf_i dden_i.
//
// Four kernels cover forward and backward:
//   chunk_state_{fwd,rev}   the exclusive prefix (or suffix) states of every chunk;
//   chunk_output_fwd        out and den of a chunk;  chunk_output_rev: dv of a chunk;
//   chunk_grad_feat_{fwd,rev}: dqf (fwd) and dkf (rev) of a chunk.

// ---------------------------------------------------------------------------------------------
// States. For every chunk c (in scan order), writes the state accumulated over the chunks
// before it, then adds chunk c:  S_c = sum A_j^T [B_j | bcol_j] over the chunks already seen.
// The extra column bcol (ones when null) is carried as column e of a virtual (e+1)-column B and
// stored separately in sc, so one kernel gives both h and z (forward) or U and u (reverse).
// grid: (ceil(m/32), ceil((e+1)/32), bh); block: 256; each thread owns 2x2 of the 32x32 tile.
// S: (bh, nt, m, e); sc: (bh, nt, m).
template <bool REVERSE>
__device__ __forceinline__ void chunk_state(
    const float* __restrict__ A, const float* __restrict__ B, const float* __restrict__ bcol,
    float* __restrict__ S, float* __restrict__ sc, int n, int m, int e)
{
    __shared__ float as[CHUNK][33];
    __shared__ float bs[CHUNK][33];

    const int bh = blockIdx.z;
    const int m0 = blockIdx.x * 32;
    const int e0 = blockIdx.y * 32;
    const int nt = (n + CHUNK - 1) / CHUNK;
    const int tid = threadIdx.x;
    const int tm = tid / 16;
    const int te = tid % 16;
    const float* Ab = A + (i64)bh * n * m;
    const float* Bb = B + (i64)bh * n * e;
    const float* cb = bcol ? bcol + (i64)bh * n : nullptr;
    float* Sb = S + (i64)bh * nt * m * e;
    float* scb = sc + (i64)bh * nt * m;

    float s[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
    for (int step = 0; step < nt; ++step) {
        const int c = REVERSE ? nt - 1 - step : step;
        #pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int gm = m0 + tm + 16 * i;
            if (gm >= m) continue;
            #pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int ge = e0 + te + 16 * j;
                if (ge < e) {
                    Sb[((i64)c * m + gm) * e + ge] = s[i][j];
                } else if (ge == e) {
                    scb[(i64)c * m + gm] = s[i][j];
                }
            }
        }
        const int r0 = c * CHUNK;
        for (int idx = tid; idx < CHUNK * 32; idx += NTHREADS) {
            const int r = idx / 32;
            const int cc = idx % 32;
            const int gr = r0 + r;
            const bool rok = gr < n;
            as[r][cc] = (rok && m0 + cc < m) ? Ab[(i64)gr * m + m0 + cc] : 0.f;
            const int ge = e0 + cc;
            float bv = 0.f;
            if (rok) {
                if (ge < e) bv = Bb[(i64)gr * e + ge];
                else if (ge == e) bv = cb ? cb[gr] : 1.f;
            }
            bs[r][cc] = bv;
        }
        __syncthreads();
        #pragma unroll 16
        for (int r = 0; r < CHUNK; ++r) {
            const float a0 = as[r][tm], a1 = as[r][tm + 16];
            const float b0 = bs[r][te], b1 = bs[r][te + 16];
            s[0][0] = fmaf(a0, b0, s[0][0]);
            s[0][1] = fmaf(a0, b1, s[0][1]);
            s[1][0] = fmaf(a1, b0, s[1][0]);
            s[1][1] = fmaf(a1, b1, s[1][1]);
        }
        __syncthreads();
    }
}

extern "C" __global__ void __launch_bounds__(NTHREADS) chunk_state_fwd(
    const float* __restrict__ A, const float* __restrict__ B, const float* __restrict__ bcol,
    float* __restrict__ S, float* __restrict__ sc, int n, int m, int e)
{
    chunk_state<false>(A, B, bcol, S, sc, n, m, e);
}

extern "C" __global__ void __launch_bounds__(NTHREADS) chunk_state_rev(
    const float* __restrict__ A, const float* __restrict__ B, const float* __restrict__ bcol,
    float* __restrict__ S, float* __restrict__ sc, int n, int m, int e)
{
    chunk_state<true>(A, B, bcol, S, sc, n, m, e);
}

// ---------------------------------------------------------------------------------------------
// Chunk output. For chunk c and a 64-column tile of e:
//   O[a,:] = X_a . Z_c[:, tile] + sum_{b in mask(a)} (X_a . Y_b) W_b[tile]
// mask(a) = {b <= a} forward, {b >= a} reverse. X, Y: n x m; W: n x e; Z: (bh, nt, m, e).
// Forward (X=qf, Y=kf, W=v, Z=h, zc=z) also forms den and divides: out = O / den.
// Reverse (X=kf, Y=qf, W=dnum, Z=U) gives dv.
// grid: (nt, ceil(e/64), bh); block: 256.
template <bool REVERSE, bool WANT_DEN>
__device__ __forceinline__ void chunk_output(
    const float* __restrict__ X, const float* __restrict__ Y, const float* __restrict__ W,
    const float* __restrict__ Z, const float* __restrict__ zc, float* __restrict__ out,
    float* __restrict__ den, int n, int m, int e, float eps)
{
    // Phase 1 (loop over m): xs, ys [KSTEP][65], zs [KSTEP][64], zcs [KSTEP].
    // Phase 2 (chunk product): as_ [64][65], ws [64][64]. The phases share the buffer.
    __shared__ float smem[CHUNK * 65 + CHUNK * TILE];
    float* xs = smem;
    float* ys = xs + KSTEP * 65;
    float* zs = ys + KSTEP * 65;
    float* zcs = zs + KSTEP * TILE;
    float* as_ = smem;
    float* ws = smem + CHUNK * 65;

    const int c = blockIdx.x;
    const int e0 = blockIdx.y * TILE;
    const int bh = blockIdx.z;
    const int nt = gridDim.x;
    const int r0 = c * CHUNK;
    const int tid = threadIdx.x;
    const int tx = tid % 16;
    const int ty = tid / 16;
    const float* Xb = X + (i64)bh * n * m;
    const float* Yb = Y + (i64)bh * n * m;
    const float* Wb = W + (i64)bh * n * e;
    const float* Zc = Z + ((i64)bh * nt + c) * m * e;
    const float* zcc = WANT_DEN ? zc + ((i64)bh * nt + c) * m : nullptr;

    float accA[4][4], accO[4][4], dpart[4];
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        dpart[i] = 0.f;
        #pragma unroll
        for (int j = 0; j < 4; ++j) { accA[i][j] = 0.f; accO[i][j] = 0.f; }
    }

    for (int k0 = 0; k0 < m; k0 += KSTEP) {
        for (int idx = tid; idx < CHUNK * KSTEP; idx += NTHREADS) {
            const int r = idx / KSTEP;
            const int kk = idx % KSTEP;
            const int gr = r0 + r;
            const int gk = k0 + kk;
            const bool ok = gr < n && gk < m;
            xs[kk * 65 + r] = ok ? Xb[(i64)gr * m + gk] : 0.f;
            ys[kk * 65 + r] = ok ? Yb[(i64)gr * m + gk] : 0.f;
        }
        for (int idx = tid; idx < KSTEP * TILE; idx += NTHREADS) {
            const int kk = idx / TILE;
            const int cc = idx % TILE;
            const int gk = k0 + kk;
            const int ge = e0 + cc;
            zs[kk * TILE + cc] = (gk < m && ge < e) ? Zc[(i64)gk * e + ge] : 0.f;
        }
        if (WANT_DEN && tid < KSTEP) {
            // eps * sum(qf_i) rides along with the state: qf_i . (z + eps).
            zcs[tid] = (k0 + tid < m) ? zcc[k0 + tid] + eps : 0.f;
        }
        __syncthreads();
        #pragma unroll 8
        for (int kk = 0; kk < KSTEP; ++kk) {
            float a[4], b[4], zb[4];
            #pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = xs[kk * 65 + ty + 16 * i];
            #pragma unroll
            for (int j = 0; j < 4; ++j) {
                b[j] = ys[kk * 65 + tx + 16 * j];
                zb[j] = zs[kk * TILE + tx + 16 * j];
            }
            #pragma unroll
            for (int i = 0; i < 4; ++i)
                #pragma unroll
                for (int j = 0; j < 4; ++j) {
                    accA[i][j] = fmaf(a[i], b[j], accA[i][j]);
                    accO[i][j] = fmaf(a[i], zb[j], accO[i][j]);
                }
        }
        if (WANT_DEN) {
            // Each of the 16 lanes of a row takes two of the 32 features of this step.
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = ty + 16 * i;
                dpart[i] = fmaf(xs[tx * 65 + r], zcs[tx], dpart[i]);
                dpart[i] = fmaf(xs[(tx + 16) * 65 + r], zcs[tx + 16], dpart[i]);
            }
        }
        __syncthreads();
    }

    // Mask the intra-chunk scores and park them in shared memory for the chunk product.
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int a = ty + 16 * i;
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int b = tx + 16 * j;
            const bool keep = REVERSE ? (b >= a) : (b <= a);
            const float v = keep ? accA[i][j] : 0.f;
            as_[a * 65 + b] = v;
            if (WANT_DEN) dpart[i] += v;
        }
    }
    for (int idx = tid; idx < CHUNK * TILE; idx += NTHREADS) {
        const int r = idx / TILE;
        const int cc = idx % TILE;
        const int gr = r0 + r;
        const int ge = e0 + cc;
        ws[r * TILE + cc] = (gr < n && ge < e) ? Wb[(i64)gr * e + ge] : 0.f;
    }
    __syncthreads();
    #pragma unroll 8
    for (int b = 0; b < CHUNK; ++b) {
        float a[4], w[4];
        #pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = as_[(ty + 16 * i) * 65 + b];
        #pragma unroll
        for (int j = 0; j < 4; ++j) w[j] = ws[b * TILE + tx + 16 * j];
        #pragma unroll
        for (int i = 0; i < 4; ++i)
            #pragma unroll
            for (int j = 0; j < 4; ++j) accO[i][j] = fmaf(a[i], w[j], accO[i][j]);
    }

    float* ob = out + (i64)bh * n * e;
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int gr = r0 + ty + 16 * i;
        float scale = 1.f;
        if (WANT_DEN) {
            const float dsum = sum16(dpart[i]);
            scale = 1.f / dsum;
            if (blockIdx.y == 0 && tx == 0 && gr < n) den[(i64)bh * n + gr] = dsum;
        }
        if (gr >= n) continue;
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int ge = e0 + tx + 16 * j;
            if (ge < e) ob[(i64)gr * e + ge] = WANT_DEN ? accO[i][j] * scale : accO[i][j];
        }
    }
}

extern "C" __global__ void __launch_bounds__(NTHREADS) chunk_output_fwd(
    const float* __restrict__ qf, const float* __restrict__ kf, const float* __restrict__ v,
    const float* __restrict__ h, const float* __restrict__ z, float* __restrict__ out,
    float* __restrict__ den, int n, int m, int e, float eps)
{
    chunk_output<false, true>(qf, kf, v, h, z, out, den, n, m, e, eps);
}

extern "C" __global__ void __launch_bounds__(NTHREADS) chunk_output_rev(
    const float* __restrict__ kf, const float* __restrict__ qf, const float* __restrict__ dnum,
    const float* __restrict__ U, float* __restrict__ dv, int n, int m, int e)
{
    chunk_output<true, false>(kf, qf, dnum, U, nullptr, dv, nullptr, n, m, e, 0.f);
}

// ---------------------------------------------------------------------------------------------
// Feature gradients. For chunk c and a 64-feature tile:
//   P[a,b]  = X_a . Y_b + xcol_a * ycol_b                    (reduction over e)
//   O[a,:]  = sum_{b in mask(a)} P[a,b] W_b[tile] + X_a . Z_c[tile, :]^T + xcol_a * (zc_c[tile] + zc_add)
// Forward mask {b <= a}: dqf with X=dnum, xcol=dden, Y=v, ycol=1, W=kf, Z=h, zc=z, zc_add=eps.
// Reverse mask {b >= a}: dkf with X=v, xcol=1, Y=dnum, ycol=dden, W=qf, Z=U, zc=u, zc_add=0.
// A null xcol/ycol means ones. X, Y: n x e; W, out: n x m; Z: (bh, nt, m, e); zc: (bh, nt, m).
// grid: (nt, ceil(m/64), bh); block: 256.
template <bool REVERSE>
__device__ __forceinline__ void chunk_grad_feat(
    const float* __restrict__ X, const float* __restrict__ xcol, const float* __restrict__ Y,
    const float* __restrict__ ycol, const float* __restrict__ W, const float* __restrict__ Z,
    const float* __restrict__ zc, float zc_add, float* __restrict__ out, int n, int m, int e)
{
    // Phase 1: xs, ys, zs [KSTEP][65]. Phase 2: ps [64][65], ws [64][64].
    __shared__ float smem[CHUNK * 65 + CHUNK * TILE];
    float* xs = smem;
    float* ys = xs + KSTEP * 65;
    float* zs = ys + KSTEP * 65;
    float* ps = smem;
    float* ws = smem + CHUNK * 65;

    const int c = blockIdx.x;
    const int m0 = blockIdx.y * TILE;
    const int bh = blockIdx.z;
    const int nt = gridDim.x;
    const int r0 = c * CHUNK;
    const int tid = threadIdx.x;
    const int tx = tid % 16;
    const int ty = tid / 16;
    const float* Xb = X + (i64)bh * n * e;
    const float* Yb = Y + (i64)bh * n * e;
    const float* Wb = W + (i64)bh * n * m;
    const float* Zc = Z + ((i64)bh * nt + c) * m * e;
    const float* zcc = zc + ((i64)bh * nt + c) * m;

    float accP[4][4], accO[4][4];
    #pragma unroll
    for (int i = 0; i < 4; ++i)
        #pragma unroll
        for (int j = 0; j < 4; ++j) { accP[i][j] = 0.f; accO[i][j] = 0.f; }

    for (int k0 = 0; k0 < e; k0 += KSTEP) {
        for (int idx = tid; idx < CHUNK * KSTEP; idx += NTHREADS) {
            const int r = idx / KSTEP;
            const int kk = idx % KSTEP;
            const int gk = k0 + kk;
            const int gr = r0 + r;
            const bool ok = gr < n && gk < e;
            xs[kk * 65 + r] = ok ? Xb[(i64)gr * e + gk] : 0.f;
            ys[kk * 65 + r] = ok ? Yb[(i64)gr * e + gk] : 0.f;
            // Z rows are features: read feature m0 + r, value dims k0..k0+31 (contiguous).
            const int gm = m0 + r;
            zs[kk * 65 + r] = (gm < m && gk < e) ? Zc[(i64)gm * e + gk] : 0.f;
        }
        __syncthreads();
        #pragma unroll 8
        for (int kk = 0; kk < KSTEP; ++kk) {
            float a[4], b[4], zb[4];
            #pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = xs[kk * 65 + ty + 16 * i];
            #pragma unroll
            for (int j = 0; j < 4; ++j) {
                b[j] = ys[kk * 65 + tx + 16 * j];
                zb[j] = zs[kk * 65 + tx + 16 * j];
            }
            #pragma unroll
            for (int i = 0; i < 4; ++i)
                #pragma unroll
                for (int j = 0; j < 4; ++j) {
                    accP[i][j] = fmaf(a[i], b[j], accP[i][j]);
                    accO[i][j] = fmaf(a[i], zb[j], accO[i][j]);
                }
        }
        __syncthreads();
    }

    const float* xcb = xcol ? xcol + (i64)bh * n : nullptr;
    const float* ycb = ycol ? ycol + (i64)bh * n : nullptr;
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int a = ty + 16 * i;
        const int ga = r0 + a;
        const float xc = ga < n ? (xcb ? xcb[ga] : 1.f) : 0.f;
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int b = tx + 16 * j;
            const int gb = r0 + b;
            const float yc = gb < n ? (ycb ? ycb[gb] : 1.f) : 0.f;
            const bool keep = REVERSE ? (b >= a) : (b <= a);
            ps[a * 65 + b] = keep ? fmaf(xc, yc, accP[i][j]) : 0.f;
            const int gm = m0 + b;
            if (gm < m) accO[i][j] = fmaf(xc, zcc[gm] + zc_add, accO[i][j]);
        }
    }
    for (int idx = tid; idx < CHUNK * TILE; idx += NTHREADS) {
        const int r = idx / TILE;
        const int cc = idx % TILE;
        const int gr = r0 + r;
        const int gm = m0 + cc;
        ws[r * TILE + cc] = (gr < n && gm < m) ? Wb[(i64)gr * m + gm] : 0.f;
    }
    __syncthreads();
    #pragma unroll 8
    for (int b = 0; b < CHUNK; ++b) {
        float a[4], w[4];
        #pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = ps[(ty + 16 * i) * 65 + b];
        #pragma unroll
        for (int j = 0; j < 4; ++j) w[j] = ws[b * TILE + tx + 16 * j];
        #pragma unroll
        for (int i = 0; i < 4; ++i)
            #pragma unroll
            for (int j = 0; j < 4; ++j) accO[i][j] = fmaf(a[i], w[j], accO[i][j]);
    }

    float* ob = out + (i64)bh * n * m;
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int gr = r0 + ty + 16 * i;
        if (gr >= n) continue;
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int gm = m0 + tx + 16 * j;
            if (gm < m) ob[(i64)gr * m + gm] = accO[i][j];
        }
    }
}

extern "C" __global__ void __launch_bounds__(NTHREADS) chunk_grad_feat_fwd(
    const float* __restrict__ dnum, const float* __restrict__ dden, const float* __restrict__ v,
    const float* __restrict__ kf, const float* __restrict__ h, const float* __restrict__ z,
    float eps, float* __restrict__ dqf, int n, int m, int e)
{
    chunk_grad_feat<false>(dnum, dden, v, nullptr, kf, h, z, eps, dqf, n, m, e);
}

extern "C" __global__ void __launch_bounds__(NTHREADS) chunk_grad_feat_rev(
    const float* __restrict__ v, const float* __restrict__ dnum, const float* __restrict__ dden,
    const float* __restrict__ qf, const float* __restrict__ U, const float* __restrict__ u,
    float* __restrict__ dkf, int n, int m, int e)
{
    chunk_grad_feat<true>(v, nullptr, dnum, dden, qf, U, u, 0.f, dkf, n, m, e);
}

// ---------------------------------------------------------------------------------------------
// Gradient of out = num / den at each position, one warp per position:
//   dnum = g / den,  dden = -(g . out) / den.
// Strides let the non-causal path write straight into its (e+1)-column augmented buffer.
extern "C" __global__ void attention_grad_prep(
    const float* __restrict__ g, const float* __restrict__ out, const float* __restrict__ den,
    i64 den_stride, float* __restrict__ dnum, i64 dnum_ld, float* __restrict__ dden,
    i64 dden_stride, i64 rows, int e)
{
    const int lane = threadIdx.x % 32;
    const i64 warp = (blockIdx.x * (i64)blockDim.x + threadIdx.x) / 32;
    const i64 nwarps = ((i64)gridDim.x * blockDim.x) / 32;
    for (i64 r = warp; r < rows; r += nwarps) {
        const float inv = 1.f / den[r * den_stride];
        float dot = 0.f;
        for (int c = lane; c < e; c += 32) {
            const float gv = g[r * e + c];
            dot = fmaf(gv, out[r * e + c], dot);
            dnum[r * dnum_ld + c] = gv * inv;
        }
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        if (lane == 0) dden[r * dden_stride] = -dot * inv;
    }
}
