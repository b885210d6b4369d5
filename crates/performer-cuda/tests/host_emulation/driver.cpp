// Runs the causal kernels of kernels/causal.cu and kernels/causal_tf32.cu on the CPU, compiled
// as C++ (tests/host_emulation.rs builds and drives this). Every CUDA thread is an OS thread, a
// block's 256 threads run together (blocks one after another, so `__shared__` can be a static
// local), __syncthreads is a barrier of the block, and the warp collectives (shuffles, TF32
// mma.sync) exchange values through per-warp slots between two barriers of the warp.
//
// mma.sync.m16n8k8 .row.col .tf32 is emulated from the PTX ISA's fragment layout, independent of
// how the kernels use it, and every operand is checked to be a TF32 value (13 low bits zero), so
// an unrounded operand or a wrong fragment index shows up as an error here.
//
// Usage: driver DIR BH N M E SUFFIX, with DIR/{qf,kf,v,g}.bin (raw f32); writes
// DIR/{out,den,dqf,dkf,dv}<SUFFIX>.bin. SUFFIX is "" (f32 kernels) or "_tf32".

#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

struct Dim3 {
    unsigned x = 0, y = 0, z = 0;
};
thread_local Dim3 threadIdx, blockIdx;
Dim3 gridDim, blockDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __restrict__ __restrict
#define __shared__ static

constexpr int kThreads = 256;

inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline int __float_as_int(float x) { int u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned u) { float x; std::memcpy(&x, &u, 4); return x; }
[[noreturn]] inline void __trap() { std::fprintf(stderr, "trap\n"); std::abort(); }
// Only referenced by common.cuh's float max, which the causal kernels do not call.
inline int atomicMax(int* a, int v) { int o = *a; if (v > o) *a = v; return o; }
inline unsigned atomicMin(unsigned* a, unsigned v) { unsigned o = *a; if (v < o) *a = v; return o; }

// Barriers and exchange slots of the block being run.
struct BlockSync {
    std::barrier<> block{kThreads};
    std::vector<std::unique_ptr<std::barrier<>>> warp;
    float xchg[kThreads];
    unsigned frag[kThreads][6];
    BlockSync() {
        for (int w = 0; w < kThreads / 32; ++w) warp.emplace_back(new std::barrier<>(32));
    }
};
BlockSync* g_sync = nullptr;

inline void __syncthreads() { g_sync->block.arrive_and_wait(); }
inline void warp_wait() { g_sync->warp[threadIdx.x / 32]->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int off) {
    const int tid = threadIdx.x;
    g_sync->xchg[tid] = v;
    warp_wait();
    const float r = g_sync->xchg[(tid & ~31) | ((tid & 31) ^ off)];
    warp_wait();
    return r;
}

// cvt.rna.tf32.f32: add half of the kept last place to the magnitude, drop 13 bits.
inline unsigned tf32_bits(float x) {
    const unsigned u = __float_as_uint(x);
    if (!std::isfinite(x)) return u;
    return (u + 0x1000u) & ~0x1fffu;
}

inline void mma_tf32(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    const int tid = threadIdx.x;
    const int base = tid & ~31;
    for (int i = 0; i < 4; ++i) g_sync->frag[tid][i] = a[i];
    g_sync->frag[tid][4] = b[0];
    g_sync->frag[tid][5] = b[1];
    warp_wait();
    float A[16][8], B[8][8];
    for (int l = 0; l < 32; ++l) {
        const unsigned* f = g_sync->frag[base + l];
        for (int i = 0; i < 6; ++i) {
            if (f[i] & 0x1fffu) {
                std::fprintf(stderr, "mma operand not TF32: lane %d reg %d bits %08x\n", l, i, f[i]);
                std::abort();
            }
        }
        const int g = l / 4, t = l % 4;
        A[g][t] = __uint_as_float(f[0]);
        A[g + 8][t] = __uint_as_float(f[1]);
        A[g][t + 4] = __uint_as_float(f[2]);
        A[g + 8][t + 4] = __uint_as_float(f[3]);
        B[t][g] = __uint_as_float(f[4]);
        B[t + 4][g] = __uint_as_float(f[5]);
    }
    warp_wait();
    const int g = (tid & 31) / 4, t = tid % 4;
    for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
        float s = d[i];
        for (int k = 0; k < 8; ++k) s += A[row][k] * B[k][col];
        d[i] = s;
    }
}

#define PERFORMER_CUDA_HOST_EMULATION 1
#include "common.cuh"
#include "causal.cu"
#include "causal_tf32.cu"

// Runs f on every block of grid, one block at a time, 256 threads each.
template <class F>
void launch(Dim3 grid, F f) {
    gridDim = grid;
    blockDim = Dim3{kThreads, 1, 1};
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                BlockSync sync;
                g_sync = &sync;
                std::vector<std::thread> threads;
                for (unsigned t = 0; t < kThreads; ++t)
                    threads.emplace_back([=] {
                        threadIdx = Dim3{t, 0, 0};
                        blockIdx = Dim3{x, y, z};
                        f();
                    });
                for (auto& th : threads) th.join();
            }
}

static std::vector<float> load(const std::string& path, size_t len) {
    std::vector<float> v(len);
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f || std::fread(v.data(), 4, len, f) != len) {
        std::fprintf(stderr, "cannot read %s\n", path.c_str());
        std::exit(2);
    }
    std::fclose(f);
    return v;
}

static void save(const std::string& path, const std::vector<float>& v) {
    FILE* f = std::fopen(path.c_str(), "wb");
    if (!f || std::fwrite(v.data(), 4, v.size(), f) != v.size()) {
        std::fprintf(stderr, "cannot write %s\n", path.c_str());
        std::exit(2);
    }
    std::fclose(f);
}

// A buffer every element of which the kernels must write: NaN until then.
static std::vector<float> poisoned(size_t len) { return std::vector<float>(len, NAN); }

int main(int argc, char** argv) {
    if (argc != 7) {
        std::fprintf(stderr, "usage: driver DIR BH N M E SUFFIX\n");
        return 2;
    }
    const std::string dir = argv[1];
    const int bh = std::atoi(argv[2]), n = std::atoi(argv[3]), m = std::atoi(argv[4]),
              e = std::atoi(argv[5]);
    const bool tf32 = std::string(argv[6]) == "_tf32";
    const std::string suffix = argv[6];
    const unsigned nt = (n + CHUNK - 1) / CHUNK;
    const float eps = 1e-6f;
    auto qf = load(dir + "/qf.bin", (size_t)bh * n * m);
    auto kf = load(dir + "/kf.bin", (size_t)bh * n * m);
    auto v = load(dir + "/v.bin", (size_t)bh * n * e);
    auto g = load(dir + "/g.bin", (size_t)bh * n * e);

    // The launch sequence of ops.rs (causal_linear_attention and its backward).
    auto states = [&](const float* A, const float* B, const float* col, float* S, float* sc,
                      bool rev) {
        launch(Dim3{(unsigned)(m + 31) / 32, (unsigned)(e + 32) / 32, (unsigned)bh}, [&] {
            if (tf32) {
                if (rev) chunk_state_rev_tf32(A, B, col, S, sc, n, m, e);
                else chunk_state_fwd_tf32(A, B, col, S, sc, n, m, e);
            } else {
                if (rev) chunk_state_rev(A, B, col, S, sc, n, m, e);
                else chunk_state_fwd(A, B, col, S, sc, n, m, e);
            }
        });
    };
    auto h = poisoned((size_t)bh * nt * m * e), z = poisoned((size_t)bh * nt * m);
    states(kf.data(), v.data(), nullptr, h.data(), z.data(), false);
    auto out = poisoned((size_t)bh * n * e), den = poisoned((size_t)bh * n);
    launch(Dim3{nt, (unsigned)(e + 63) / 64, (unsigned)bh}, [&] {
        if (tf32) chunk_output_fwd_tf32(qf.data(), kf.data(), v.data(), h.data(), z.data(),
                                        out.data(), den.data(), n, m, e, eps);
        else chunk_output_fwd(qf.data(), kf.data(), v.data(), h.data(), z.data(), out.data(),
                              den.data(), n, m, e, eps);
    });

    auto dnum = poisoned((size_t)bh * n * e), dden = poisoned((size_t)bh * n);
    const long long rows = (long long)bh * n;
    launch(Dim3{(unsigned)((rows * 32 + kThreads - 1) / kThreads), 1, 1}, [&] {
        attention_grad_prep(g.data(), out.data(), den.data(), 1, dnum.data(), e, dden.data(), 1,
                            rows, e);
    });
    auto S = poisoned((size_t)bh * nt * m * e), sc = poisoned((size_t)bh * nt * m);
    states(kf.data(), v.data(), nullptr, S.data(), sc.data(), false);
    auto dqf = poisoned((size_t)bh * n * m);
    const Dim3 feat_grid{nt, (unsigned)(m + 63) / 64, (unsigned)bh};
    launch(feat_grid, [&] {
        if (tf32) chunk_grad_feat_fwd_tf32(dnum.data(), dden.data(), v.data(), kf.data(),
                                           S.data(), sc.data(), eps, dqf.data(), n, m, e);
        else chunk_grad_feat_fwd(dnum.data(), dden.data(), v.data(), kf.data(), S.data(),
                                 sc.data(), eps, dqf.data(), n, m, e);
    });
    states(qf.data(), dnum.data(), dden.data(), S.data(), sc.data(), true);
    auto dkf = poisoned((size_t)bh * n * m), dv = poisoned((size_t)bh * n * e);
    launch(feat_grid, [&] {
        if (tf32) chunk_grad_feat_rev_tf32(v.data(), dnum.data(), dden.data(), qf.data(),
                                           S.data(), sc.data(), dkf.data(), n, m, e);
        else chunk_grad_feat_rev(v.data(), dnum.data(), dden.data(), qf.data(), S.data(),
                                 sc.data(), dkf.data(), n, m, e);
    });
    launch(Dim3{nt, (unsigned)(e + 63) / 64, (unsigned)bh}, [&] {
        if (tf32) chunk_output_rev_tf32(kf.data(), qf.data(), dnum.data(), S.data(), dv.data(),
                                        n, m, e);
        else chunk_output_rev(kf.data(), qf.data(), dnum.data(), S.data(), dv.data(), n, m, e);
    });

    save(dir + "/out" + suffix + ".bin", out);
    save(dir + "/den" + suffix + ".bin", den);
    save(dir + "/dqf" + suffix + ".bin", dqf);
    save(dir + "/dkf" + suffix + ".bin", dkf);
    save(dir + "/dv" + suffix + ".bin", dv);
    return 0;
}
