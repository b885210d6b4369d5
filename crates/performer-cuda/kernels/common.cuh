// Helpers shared by every performer-cuda kernel source. The crate prepends this text to each
// .cu file before handing it to NVRTC (NVRTC has no file system include path of ours).
//
// Layout convention for every kernel: row-major, contiguous, batch and heads flattened into one
// index `bh` (= blockIdx.z for the tiled kernels). Sizes are `int` (the crate checks they fit);
// offsets are computed in 64 bits because bh * n * m overflows 32 bits at long sequences.

#define CHUNK 64     // positions per chunk of the causal chunkwise algorithm
#define TILE 64      // output tile edge of the 64x64 register-tiled products
#define KSTEP 32     // reduction step of the tiled products
#define NTHREADS 256 // threads per block of the tiled kernels: 16x16, 4x4 outputs each

typedef long long i64;

// Float max through integer atomics: non-negative floats order like signed ints, negative ones
// in reverse like unsigned ints. The sign test is on the bit pattern so that -0.0 takes the
// unsigned branch (otherwise a block of all -0.0 could leave the -inf initial value in place).
__device__ __forceinline__ void atomic_max_float(float* addr, float v) {
    if (__float_as_int(v) >= 0) {
        atomicMax(reinterpret_cast<int*>(addr), __float_as_int(v));
    } else {
        atomicMin(reinterpret_cast<unsigned int*>(addr), __float_as_uint(v));
    }
}

// Max over the 16 lanes that share one tile row (lanes differ only in the low 4 bits).
__device__ __forceinline__ float max16(float v) {
    #pragma unroll
    for (int off = 8; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

// Sum over the 16 lanes that share one tile row.
__device__ __forceinline__ float sum16(float v) {
    #pragma unroll
    for (int off = 8; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}
