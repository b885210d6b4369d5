// Causal linear attention, chunkwise, with the inner products on TF32 tensor cores (sm_80+).
//
// Same algorithm, same arguments and the same launch grids as causal.cu (read its header for
// the math); only the products that carry the O(n m e) and O(n 64 m) work run as
// mma.sync.m16n8k8 with TF32 operands and f32 accumulation:
//   chunk_state:     the per-chunk update  A_chunk^T [B_chunk | bcol]      (inter-chunk states)
//   chunk_output:    X Y^T (masked scores), X Z_c (state product), mask(X Y^T) W
//   chunk_grad_feat: X Y^T (masked),        X Z_c^T,               mask(P) W
// Everything else stays f32 on CUDA cores: the running states and every accumulator, the
// normalizer's qf . (z + eps) and its sum of masked scores, the rank-1 ones/dden terms, the
// division by den. So the only extra error is the rounding of each tensor-core operand to TF32
// (10-bit mantissa) by cvt.rna (round to nearest, ties away from zero), which
// tests/tf32_error_model.rs reproduces on the CPU.
//
// Fragment layout of mma.m16n8k8 (.row.col, tf32), lane = 4 * g + t:
//   A (16x8):  a0 (g, t)  a1 (g+8, t)  a2 (g, t+4)  a3 (g+8, t+4)
//   B (8x8):   b0 (k=t, n=g)  b1 (k=t+4, n=g)
//   C (16x8):  c0 (g, 2t)  c1 (g, 2t+1)  c2 (g+8, 2t)  c3 (g+8, 2t+1)
// Shared-memory strides are chosen so that these reads hit 32 distinct banks: a row-major
// operand read as (row g, col t) wants stride = 4 (mod 32), one read as (row t, col g) wants
// stride = 8 (mod 32).

#define LDK 36   // row stride of [row][k] tiles, k < KSTEP (36 = 4 mod 32)
#define LDS 68   // row stride of the 64x64 score tile read as A (68 = 4 mod 32)
#define LDN 72   // row stride of [k][col] tiles read as B (72 = 8 mod 32)
#define LDT 40   // row stride of the state kernel's [position][32] tiles (40 = 8 mod 32)

// The two instructions that need a GPU. tests/host_emulation.rs compiles this file as C++ on
// the CPU with PERFORMER_CUDA_HOST_EMULATION defined and supplies both from the PTX ISA's
// definitions, which checks every index and fragment layout below without a GPU.
#ifndef PERFORMER_CUDA_HOST_EMULATION
// f32 -> TF32 bit pattern (low 13 bits zero), round to nearest, ties away from zero.
__device__ __forceinline__ unsigned tf32_bits(float x) {
#if __CUDA_ARCH__ >= 800
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
#else
    return __float_as_uint(x);
#endif
}

// d += A B for one 16x8x8 tile. Below sm_80 there is no TF32 mma: the source still compiles
// (every source is loaded on every device), and the host refuses TF32 there, so reaching this
// is a bug that should stop the kernel rather than return wrong numbers.
__device__ __forceinline__ void mma_tf32(float (&d)[4], const unsigned (&a)[4],
                                         const unsigned (&b)[2]) {
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();
#endif
}
#endif  // PERFORMER_CUDA_HOST_EMULATION

// The TF32 value of x kept as a float, for operands that are rounded once when staged in
// shared memory and then read by several warps.
__device__ __forceinline__ float tf32_round(float x) { return __uint_as_float(tf32_bits(x)); }

// A fragment from a row-major [row][k] tile; `convert` rounds values that were staged in f32
// (because an f32 consumer reads them too), otherwise they are TF32 already.
template <bool CONVERT>
__device__ __forceinline__ void load_a(unsigned (&a)[4], const float* base, int ld, int g, int t) {
    const float v0 = base[g * ld + t];
    const float v1 = base[(g + 8) * ld + t];
    const float v2 = base[g * ld + t + 4];
    const float v3 = base[(g + 8) * ld + t + 4];
    a[0] = CONVERT ? tf32_bits(v0) : __float_as_uint(v0);
    a[1] = CONVERT ? tf32_bits(v1) : __float_as_uint(v1);
    a[2] = CONVERT ? tf32_bits(v2) : __float_as_uint(v2);
    a[3] = CONVERT ? tf32_bits(v3) : __float_as_uint(v3);
}

// ---------------------------------------------------------------------------------------------
// States (see causal.cu's chunk_state). grid: (ceil(m/32), ceil((e+1)/32), bh); block: 256.
// Each of the 8 warps owns one 16x8 piece of the 32x32 state tile: features 16*(w/4)..,
// value columns 8*(w%4)... Per chunk the warp runs 8 mma steps over the 64 positions,
// accumulating straight into the running f32 state.
template <bool REVERSE>
__device__ __forceinline__ void chunk_state_tc(
    const float* __restrict__ A, const float* __restrict__ B, const float* __restrict__ bcol,
    float* __restrict__ S, float* __restrict__ sc, int n, int m, int e)
{
    // Position-major, as read from global memory; TF32 values.
    __shared__ float as[CHUNK * LDT];
    __shared__ float bs[CHUNK * LDT];

    const int bh = blockIdx.z;
    const int m0 = blockIdx.x * 32;
    const int e0 = blockIdx.y * 32;
    const int nt = (n + CHUNK - 1) / CHUNK;
    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int g = (tid % 32) / 4;
    const int t = tid % 4;
    const int fr = 16 * (warp / 4);
    const int ec = 8 * (warp % 4);
    const float* Ab = A + (i64)bh * n * m;
    const float* Bb = B + (i64)bh * n * e;
    const float* cb = bcol ? bcol + (i64)bh * n : nullptr;
    float* Sb = S + (i64)bh * nt * m * e;
    float* scb = sc + (i64)bh * nt * m;

    float s[4] = {0.f, 0.f, 0.f, 0.f};
    for (int step = 0; step < nt; ++step) {
        const int c = REVERSE ? nt - 1 - step : step;
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int gm = m0 + fr + g + 8 * (i >> 1);
            const int ge = e0 + ec + 2 * t + (i & 1);
            if (gm >= m) continue;
            if (ge < e) {
                Sb[((i64)c * m + gm) * e + ge] = s[i];
            } else if (ge == e) {
                scb[(i64)c * m + gm] = s[i];
            }
        }
        const int r0 = c * CHUNK;
        for (int idx = tid; idx < CHUNK * 32; idx += NTHREADS) {
            const int r = idx / 32;
            const int cc = idx % 32;
            const int gr = r0 + r;
            const bool rok = gr < n;
            const float av = (rok && m0 + cc < m) ? Ab[(i64)gr * m + m0 + cc] : 0.f;
            const int ge = e0 + cc;
            float bv = 0.f;
            if (rok) {
                if (ge < e) bv = Bb[(i64)gr * e + ge];
                else if (ge == e) bv = cb ? cb[gr] : 1.f;
            }
            as[r * LDT + cc] = tf32_round(av);
            bs[r * LDT + cc] = tf32_round(bv);
        }
        __syncthreads();
        #pragma unroll
        for (int k0 = 0; k0 < CHUNK; k0 += 8) {
            // A = as^T: row = feature, k = position.
            unsigned a[4], b[2];
            a[0] = __float_as_uint(as[(k0 + t) * LDT + fr + g]);
            a[1] = __float_as_uint(as[(k0 + t) * LDT + fr + g + 8]);
            a[2] = __float_as_uint(as[(k0 + t + 4) * LDT + fr + g]);
            a[3] = __float_as_uint(as[(k0 + t + 4) * LDT + fr + g + 8]);
            b[0] = __float_as_uint(bs[(k0 + t) * LDT + ec + g]);
            b[1] = __float_as_uint(bs[(k0 + t + 4) * LDT + ec + g]);
            mma_tf32(s, a, b);
        }
        __syncthreads();
    }
}

extern "C" __global__ void __launch_bounds__(NTHREADS) chunk_state_fwd_tf32(
    const float* __restrict__ A, const float* __restrict__ B, const float* __restrict__ bcol,
    float* __restrict__ S, float* __restrict__ sc, int n, int m, int e)
{
    chunk_state_tc<false>(A, B, bcol, S, sc, n, m, e);
}

extern "C" __global__ void __launch_bounds__(NTHREADS) chunk_state_rev_tf32(
    const float* __restrict__ A, const float* __restrict__ B, const float* __restrict__ bcol,
    float* __restrict__ S, float* __restrict__ sc, int n, int m, int e)
{
    chunk_state_tc<true>(A, B, bcol, S, sc, n, m, e);
}

// ---------------------------------------------------------------------------------------------
// The 64x64 block product shared by both chunk kernels' second phase:
//   acc[j] += mask(P)[rows of this warp, :] W[:, cols of this warp]
// P (f32, [64][LDS]) is rounded here, W ([64][LDN]) is TF32 already. Warp w owns rows
// 16*(w%4).. and columns 32*(w/4)..; with the causal mask the positions past the warp's last
// row (forward) or before its first row (reverse) are zero, so their k-steps are skipped.
template <bool REVERSE>
__device__ __forceinline__ void masked_block_product(
    float (&acc)[4][4], const float* ps, const float* ws, int rb, int ch, int g, int t)
{
    const int k_lo = REVERSE ? 16 * rb : 0;
    const int k_hi = REVERSE ? CHUNK : 16 * (rb + 1);
    for (int k0 = k_lo; k0 < k_hi; k0 += 8) {
        unsigned a[4];
        load_a<true>(a, ps + 16 * rb * LDS + k0, LDS, g, t);
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int col = 32 * ch + 8 * j + g;
            unsigned b[2];
            b[0] = __float_as_uint(ws[(k0 + t) * LDN + col]);
            b[1] = __float_as_uint(ws[(k0 + t + 4) * LDN + col]);
            mma_tf32(acc[j], a, b);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Chunk output (see causal.cu's chunk_output). grid: (nt, ceil(e/64), bh); block: 256.
//   O[a,:] = X_a . Z_c[:, tile] + sum_{b in mask(a)} (X_a . Y_b) W_b[tile]
// Forward also forms den_a = X_a . (z_c + eps) + sum_{b <= a} X_a . Y_b in f32 and divides.
template <bool REVERSE, bool WANT_DEN>
__device__ __forceinline__ void chunk_output_tc(
    const float* __restrict__ X, const float* __restrict__ Y, const float* __restrict__ W,
    const float* __restrict__ Z, const float* __restrict__ zc, float* __restrict__ out,
    float* __restrict__ den, int n, int m, int e, float eps)
{
    // Phase 1 (loop over m): xs [64][LDK] (f32: the normalizer reads it too), ys [64][LDK]
    // (TF32), zs [KSTEP][LDN] (TF32), zcs [KSTEP]. Phase 2: ps [64][LDS] masked scores (f32:
    // den sums them), ws [64][LDN] (TF32). dens [64] lives past both.
    __shared__ float smem[CHUNK * LDS + CHUNK * LDN + CHUNK];
    float* xs = smem;
    float* ys = xs + CHUNK * LDK;
    float* zs = ys + CHUNK * LDK;
    float* zcs = zs + KSTEP * LDN;
    float* ps = smem;
    float* ws = smem + CHUNK * LDS;
    float* dens = ws + CHUNK * LDN;

    const int c = blockIdx.x;
    const int e0 = blockIdx.y * TILE;
    const int bh = blockIdx.z;
    const int nt = gridDim.x;
    const int r0 = c * CHUNK;
    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int g = (tid % 32) / 4;
    const int t = tid % 4;
    const int rb = warp % 4;
    const int ch = warp / 4;
    // Normalizer work split: 4 threads per row, each a quarter of the columns.
    const int drow = tid / 4;
    const int dq = tid % 4;
    const float* Xb = X + (i64)bh * n * m;
    const float* Yb = Y + (i64)bh * n * m;
    const float* Wb = W + (i64)bh * n * e;
    const float* Zc = Z + ((i64)bh * nt + c) * m * e;
    const float* zcc = WANT_DEN ? zc + ((i64)bh * nt + c) * m : nullptr;

    float accA[4][4], accO[4][4];
    #pragma unroll
    for (int j = 0; j < 4; ++j)
        #pragma unroll
        for (int i = 0; i < 4; ++i) { accA[j][i] = 0.f; accO[j][i] = 0.f; }
    float dpart = 0.f;

    for (int k0 = 0; k0 < m; k0 += KSTEP) {
        for (int idx = tid; idx < CHUNK * KSTEP; idx += NTHREADS) {
            const int r = idx / KSTEP;
            const int kk = idx % KSTEP;
            const int gr = r0 + r;
            const int gk = k0 + kk;
            const bool ok = gr < n && gk < m;
            xs[r * LDK + kk] = ok ? Xb[(i64)gr * m + gk] : 0.f;
            ys[r * LDK + kk] = tf32_round(ok ? Yb[(i64)gr * m + gk] : 0.f);
        }
        for (int idx = tid; idx < KSTEP * TILE; idx += NTHREADS) {
            const int kk = idx / TILE;
            const int cc = idx % TILE;
            const int gk = k0 + kk;
            const int ge = e0 + cc;
            zs[kk * LDN + cc] = tf32_round((gk < m && ge < e) ? Zc[(i64)gk * e + ge] : 0.f);
        }
        if (WANT_DEN && tid < KSTEP) {
            // eps * sum(qf_i) rides along with the state: qf_i . (z + eps).
            zcs[tid] = (k0 + tid < m) ? zcc[k0 + tid] + eps : 0.f;
        }
        __syncthreads();
        #pragma unroll
        for (int kk = 0; kk < KSTEP; kk += 8) {
            unsigned a[4];
            load_a<true>(a, xs + 16 * rb * LDK + kk, LDK, g, t);
            #pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int col = 32 * ch + 8 * j + g;
                unsigned b[2];
                b[0] = __float_as_uint(ys[col * LDK + kk + t]);
                b[1] = __float_as_uint(ys[col * LDK + kk + t + 4]);
                mma_tf32(accA[j], a, b);
                b[0] = __float_as_uint(zs[(kk + t) * LDN + col]);
                b[1] = __float_as_uint(zs[(kk + t + 4) * LDN + col]);
                mma_tf32(accO[j], a, b);
            }
        }
        if (WANT_DEN) {
            #pragma unroll
            for (int j = 0; j < KSTEP / 4; ++j) {
                const int kk = dq + 4 * j;
                dpart = fmaf(xs[drow * LDK + kk], zcs[kk], dpart);
            }
        }
        __syncthreads();
    }

    // Mask the intra-chunk scores and park them (f32) for the normalizer and phase 2.
    #pragma unroll
    for (int j = 0; j < 4; ++j)
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int a = 16 * rb + g + 8 * (i >> 1);
            const int b = 32 * ch + 8 * j + 2 * t + (i & 1);
            const bool keep = REVERSE ? (b >= a) : (b <= a);
            ps[a * LDS + b] = keep ? accA[j][i] : 0.f;
        }
    for (int idx = tid; idx < CHUNK * TILE; idx += NTHREADS) {
        const int r = idx / TILE;
        const int cc = idx % TILE;
        const int gr = r0 + r;
        const int ge = e0 + cc;
        ws[r * LDN + cc] = tf32_round((gr < n && ge < e) ? Wb[(i64)gr * e + ge] : 0.f);
    }
    __syncthreads();
    if (WANT_DEN) {
        #pragma unroll
        for (int j = 0; j < CHUNK / 4; ++j) dpart += ps[drow * LDS + dq + 4 * j];
        dpart += __shfl_xor_sync(0xffffffffu, dpart, 1);
        dpart += __shfl_xor_sync(0xffffffffu, dpart, 2);
        if (dq == 0) {
            dens[drow] = dpart;
            const int gr = r0 + drow;
            if (blockIdx.y == 0 && gr < n) den[(i64)bh * n + gr] = dpart;
        }
    }
    masked_block_product<REVERSE>(accO, ps, ws, rb, ch, g, t);
    if (WANT_DEN) __syncthreads();  // dens complete

    float* ob = out + (i64)bh * n * e;
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int a = 16 * rb + g + 8 * (i >> 1);
        const int gr = r0 + a;
        if (gr >= n) continue;
        const float scale = WANT_DEN ? 1.f / dens[a] : 1.f;
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int ge = e0 + 32 * ch + 8 * j + 2 * t + (i & 1);
            if (ge < e) ob[(i64)gr * e + ge] = WANT_DEN ? accO[j][i] * scale : accO[j][i];
        }
    }
}

extern "C" __global__ void __launch_bounds__(NTHREADS) chunk_output_fwd_tf32(
    const float* __restrict__ qf, const float* __restrict__ kf, const float* __restrict__ v,
    const float* __restrict__ h, const float* __restrict__ z, float* __restrict__ out,
    float* __restrict__ den, int n, int m, int e, float eps)
{
    chunk_output_tc<false, true>(qf, kf, v, h, z, out, den, n, m, e, eps);
}

extern "C" __global__ void __launch_bounds__(NTHREADS) chunk_output_rev_tf32(
    const float* __restrict__ kf, const float* __restrict__ qf, const float* __restrict__ dnum,
    const float* __restrict__ U, float* __restrict__ dv, int n, int m, int e)
{
    chunk_output_tc<true, false>(kf, qf, dnum, U, nullptr, dv, nullptr, n, m, e, 0.f);
}

// ---------------------------------------------------------------------------------------------
// Feature gradients (see causal.cu's chunk_grad_feat). grid: (nt, ceil(m/64), bh); block: 256.
//   P[a,b]  = X_a . Y_b + xcol_a * ycol_b                    (reduction over e)
//   O[a,:]  = sum_{b in mask(a)} P[a,b] W_b[tile] + X_a . Z_c[tile, :]^T + xcol_a * (zc_c[tile] + zc_add)
template <bool REVERSE>
__device__ __forceinline__ void chunk_grad_feat_tc(
    const float* __restrict__ X, const float* __restrict__ xcol, const float* __restrict__ Y,
    const float* __restrict__ ycol, const float* __restrict__ W, const float* __restrict__ Z,
    const float* __restrict__ zc, float zc_add, float* __restrict__ out, int n, int m, int e)
{
    // Phase 1: xs, ys, zs [64][LDK], all TF32 (zs rows are features, read as B = Z^T).
    // Phase 2: ps [64][LDS] (f32, rounded when read), ws [64][LDN] (TF32).
    __shared__ float smem[CHUNK * LDS + CHUNK * LDN];
    float* xs = smem;
    float* ys = xs + CHUNK * LDK;
    float* zs = ys + CHUNK * LDK;
    float* ps = smem;
    float* ws = smem + CHUNK * LDS;

    const int c = blockIdx.x;
    const int m0 = blockIdx.y * TILE;
    const int bh = blockIdx.z;
    const int nt = gridDim.x;
    const int r0 = c * CHUNK;
    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int g = (tid % 32) / 4;
    const int t = tid % 4;
    const int rb = warp % 4;
    const int ch = warp / 4;
    const float* Xb = X + (i64)bh * n * e;
    const float* Yb = Y + (i64)bh * n * e;
    const float* Wb = W + (i64)bh * n * m;
    const float* Zc = Z + ((i64)bh * nt + c) * m * e;
    const float* zcc = zc + ((i64)bh * nt + c) * m;

    float accP[4][4], accO[4][4];
    #pragma unroll
    for (int j = 0; j < 4; ++j)
        #pragma unroll
        for (int i = 0; i < 4; ++i) { accP[j][i] = 0.f; accO[j][i] = 0.f; }

    for (int k0 = 0; k0 < e; k0 += KSTEP) {
        for (int idx = tid; idx < CHUNK * KSTEP; idx += NTHREADS) {
            const int r = idx / KSTEP;
            const int kk = idx % KSTEP;
            const int gk = k0 + kk;
            const int gr = r0 + r;
            const bool ok = gr < n && gk < e;
            xs[r * LDK + kk] = tf32_round(ok ? Xb[(i64)gr * e + gk] : 0.f);
            ys[r * LDK + kk] = tf32_round(ok ? Yb[(i64)gr * e + gk] : 0.f);
            // Z rows are features: read feature m0 + r, value dims k0..k0+31 (contiguous).
            const int gm = m0 + r;
            zs[r * LDK + kk] = tf32_round((gm < m && gk < e) ? Zc[(i64)gm * e + gk] : 0.f);
        }
        __syncthreads();
        #pragma unroll
        for (int kk = 0; kk < KSTEP; kk += 8) {
            unsigned a[4];
            load_a<false>(a, xs + 16 * rb * LDK + kk, LDK, g, t);
            #pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int col = 32 * ch + 8 * j + g;
                unsigned b[2];
                b[0] = __float_as_uint(ys[col * LDK + kk + t]);
                b[1] = __float_as_uint(ys[col * LDK + kk + t + 4]);
                mma_tf32(accP[j], a, b);
                b[0] = __float_as_uint(zs[col * LDK + kk + t]);
                b[1] = __float_as_uint(zs[col * LDK + kk + t + 4]);
                mma_tf32(accO[j], a, b);
            }
        }
        __syncthreads();
    }

    // Rank-1 terms in f32, then the mask; P is parked in f32 and rounded when read as A.
    const float* xcb = xcol ? xcol + (i64)bh * n : nullptr;
    const float* ycb = ycol ? ycol + (i64)bh * n : nullptr;
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int a = 16 * rb + g + 8 * (i >> 1);
        const int ga = r0 + a;
        const float xc = ga < n ? (xcb ? xcb[ga] : 1.f) : 0.f;
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int b = 32 * ch + 8 * j + 2 * t + (i & 1);
            const int gb = r0 + b;
            const float yc = gb < n ? (ycb ? ycb[gb] : 1.f) : 0.f;
            const bool keep = REVERSE ? (b >= a) : (b <= a);
            ps[a * LDS + b] = keep ? fmaf(xc, yc, accP[j][i]) : 0.f;
            const int gm = m0 + b;
            if (gm < m) accO[j][i] = fmaf(xc, zcc[gm] + zc_add, accO[j][i]);
        }
    }
    for (int idx = tid; idx < CHUNK * TILE; idx += NTHREADS) {
        const int r = idx / TILE;
        const int cc = idx % TILE;
        const int gr = r0 + r;
        const int gm = m0 + cc;
        ws[r * LDN + cc] = tf32_round((gr < n && gm < m) ? Wb[(i64)gr * m + gm] : 0.f);
    }
    __syncthreads();
    masked_block_product<REVERSE>(accO, ps, ws, rb, ch, g, t);

    float* ob = out + (i64)bh * n * m;
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int gr = r0 + 16 * rb + g + 8 * (i >> 1);
        if (gr >= n) continue;
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int gm = m0 + 32 * ch + 8 * j + 2 * t + (i & 1);
            if (gm < m) ob[(i64)gr * m + gm] = accO[j][i];
        }
    }
}

extern "C" __global__ void __launch_bounds__(NTHREADS) chunk_grad_feat_fwd_tf32(
    const float* __restrict__ dnum, const float* __restrict__ dden, const float* __restrict__ v,
    const float* __restrict__ kf, const float* __restrict__ h, const float* __restrict__ z,
    float eps, float* __restrict__ dqf, int n, int m, int e)
{
    chunk_grad_feat_tc<false>(dnum, dden, v, nullptr, kf, h, z, eps, dqf, n, m, e);
}

extern "C" __global__ void __launch_bounds__(NTHREADS) chunk_grad_feat_rev_tf32(
    const float* __restrict__ v, const float* __restrict__ dnum, const float* __restrict__ dden,
    const float* __restrict__ qf, const float* __restrict__ U, const float* __restrict__ u,
    float* __restrict__ dkf, int n, int m, int e)
{
    chunk_grad_feat_tc<true>(v, nullptr, dnum, dden, qf, U, u, 0.f, dkf, n, m, e);
}
