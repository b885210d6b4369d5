//! The `attn-*` workloads of BENCHMARKS.md as criterion benchmarks: FastAttention
//! (dim_heads 64, nb_features 256) on seeded q, k, v of shape (1, 8, n, 64), one iteration being
//! the forward and the backward of `out.sum()`. `cargo xtask bench` runs the same workloads as
//! separate processes, with peak RSS and the performer-pytorch reference; this is the quick
//! in-crate view (`cargo bench -p performer-favor`).
//!
//! mimalloc with purging off is the allocator, as in `examples/bench_workload.rs`: every
//! iteration allocates hundreds of MB afresh, and page faults into fresh memory cost as much as
//! the computation on these machines.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use performer_favor::{FastAttention, FastAttentionConfig};
use performer_tensor::Tensor;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` of mimalloc.h, which the Rust binding does not name; -1: never.
fn keep_freed_memory() {
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets an allocator option; mimalloc reads it when it next purges.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// The module and its inputs for one workload.
fn workload(causal: bool, n: usize) -> (FastAttention, [Tensor; 3]) {
    performer_tensor::rng::manual_seed(0);
    let attn = FastAttention::new(FastAttentionConfig {
        nb_features: Some(256),
        causal,
        ..FastAttentionConfig::new(64)
    })
    .expect("valid config");
    let shape = [1, 8, n, 64];
    let inputs = [(); 3].map(|_| Tensor::var(Tensor::randn(&shape).to_array()));
    (attn, inputs)
}

fn step(attn: &FastAttention, [q, k, v]: &[Tensor; 3]) {
    let out = attn.forward(q, k, v).expect("forward");
    black_box(out.sum_all().backward().expect("backward"));
}

fn attention(c: &mut Criterion) {
    keep_freed_memory();
    let mut group = c.benchmark_group("fast_attention");
    group.measurement_time(Duration::from_secs(10));
    for (name, causal, n) in [
        ("attn-noncausal-4k", false, 4096),
        ("attn-causal-1k", true, 1024),
        ("attn-causal-4k", true, 4096),
    ] {
        let (attn, inputs) = workload(causal, n);
        group.bench_function(name, |b| b.iter(|| step(&attn, &inputs)));
    }
    group.finish();
}

fn attention_long(c: &mut Criterion) {
    keep_freed_memory();
    let mut group = c.benchmark_group("fast_attention_long");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(20));
    let (attn, inputs) = workload(true, 65536);
    group.bench_function("attn-causal-64k", |b| b.iter(|| step(&attn, &inputs)));
    group.finish();
}

criterion_group!(benches, attention, attention_long);
criterion_main!(benches);
