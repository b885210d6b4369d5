//! Times causal FAVOR+ attention on the GPU with CUDA events after warm-up, for the device
//! bundle's comparison with performer-pytorch and flash-linear-attention (`.device/run.sh`).
//!
//! Two rows per length:
//! * `performer-cuda full`: feature maps + chunkwise causal attention, forward and backward
//!   (what performer-pytorch's `FastAttention(causal=True)` does);
//! * `performer-cuda core`: causal linear attention on precomputed features, forward and
//!   backward (what flash-linear-attention's `chunk_linear_attn` does).
//!
//! Usage: `cuda_bench [--n 4096,16384,65536] [--batch 1] [--heads 8] [--dim 64] [--features 256]
//!         [--warmup 3] [--iters 10] [--csv FILE]`

use std::io::Write;

use performer_cuda::cudarc::driver::sys::CUevent_flags;
use performer_cuda::ops::{self, FeatureKind, LinearDims};
use performer_cuda::reference::Rng;
use performer_cuda::{
    AttentionShape, CudaDevice, CudaFastAttention, DeviceBuffer, GpuLauncher, SharedLauncher,
};

struct Args {
    lens: Vec<usize>,
    batch: usize,
    heads: usize,
    dim: usize,
    features: usize,
    warmup: usize,
    iters: usize,
    csv: Option<String>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        lens: vec![4096, 16384, 65536],
        batch: 1,
        heads: 8,
        dim: 64,
        features: 256,
        warmup: 3,
        iters: 10,
        csv: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let val = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--n" => a.lens = val.split(',').map(num).collect::<Result<_, _>>()?,
            "--batch" => a.batch = num(&val)?,
            "--heads" => a.heads = num(&val)?,
            "--dim" => a.dim = num(&val)?,
            "--features" => a.features = num(&val)?,
            "--warmup" => a.warmup = num(&val)?,
            "--iters" => a.iters = num(&val)?.max(1),
            "--csv" => a.csv = Some(val),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

/// Median milliseconds of `f` over `iters` runs after `warmup`, each bracketed by CUDA events.
fn time_ms(
    dev: &CudaDevice,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> performer_cuda::Result<()>,
) -> performer_cuda::Result<f64> {
    let op = |e| performer_cuda::Error::Driver {
        op: "bench timing",
        source: e,
    };
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = dev
            .context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(op)?;
        let end = dev
            .context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(op)?;
        start.record(dev.stream()).map_err(op)?;
        f()?;
        end.record(dev.stream()).map_err(op)?;
        times.push(start.elapsed_ms(&end).map_err(op)? as f64);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

fn run(args: &Args) -> performer_cuda::Result<Vec<String>> {
    let gpu = std::sync::Arc::new(GpuLauncher::new(0, false)?);
    let launcher: SharedLauncher = gpu.clone();
    let dev = gpu.device().clone();
    println!("device: {} ({})", dev.name()?, dev.arch());
    let (b, h, d, m) = (args.batch, args.heads, args.dim, args.features);
    let mut rows = Vec::new();
    for &n in &args.lens {
        let shape = AttentionShape::new(b, h, n, d);
        let mut rng = Rng::new(n as u64);
        let host = |rng: &mut Rng, len: usize, s: f64| -> Vec<f32> {
            rng.normal_vec(len, s)
                .into_iter()
                .map(|v| v as f32)
                .collect()
        };
        let q = DeviceBuffer::from_f32(&launcher, &host(&mut rng, shape.qk_len(), 0.5))?;
        let k = DeviceBuffer::from_f32(&launcher, &host(&mut rng, shape.qk_len(), 0.5))?;
        let v = DeviceBuffer::from_f32(&launcher, &host(&mut rng, shape.v_len(), 1.0))?;
        let g = DeviceBuffer::from_f32(&launcher, &host(&mut rng, shape.v_len(), 1.0))?;
        let proj = host(&mut rng, m * d, 1.0);
        let attn = CudaFastAttention::new(&launcher, &proj, m, d, true)?;

        let full_fwd = time_ms(&dev, args.warmup, args.iters, || {
            attn.forward(&q, &k, &v, shape).map(|_| ())
        })?;
        let full_both = time_ms(&dev, args.warmup, args.iters, || {
            let fwd = attn.forward(&q, &k, &v, shape)?;
            attn.backward(&q, &k, &v, &fwd, &g).map(|_| ())
        })?;

        let qf = attn.feature_map(&q, shape, FeatureKind::Query)?;
        let kf = attn.feature_map(&k, shape, FeatureKind::Key)?;
        let dims = LinearDims {
            bh: b * h,
            n,
            m,
            e: d,
        };
        let core_fwd = time_ms(&dev, args.warmup, args.iters, || {
            ops::causal_linear_attention(&launcher, &qf, &kf, &v, dims).map(|_| ())
        })?;
        let core_both = time_ms(&dev, args.warmup, args.iters, || {
            let (out, den) = ops::causal_linear_attention(&launcher, &qf, &kf, &v, dims)?;
            ops::causal_linear_attention_backward(&launcher, &qf, &kf, &v, &out, &den, &g, dims)
                .map(|_| ())
        })?;
        for (name, fwd, both) in [
            ("performer-cuda full", full_fwd, full_both),
            ("performer-cuda core", core_fwd, core_both),
        ] {
            println!("BENCH {name:<22} n={n:<6} fwd {fwd:9.3} ms  fwd+bwd {both:9.3} ms");
            rows.push(format!(
                "{name},{n},{fwd:.4},{both:.4},f32 CUDA cores; NVRTC {}",
                dev.arch()
            ));
        }
    }
    Ok(rows)
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cuda_bench: {e}");
            std::process::exit(2);
        }
    };
    if !performer_cuda::driver_available() || CudaDevice::count() == 0 {
        println!("SKIPPED cuda_bench: no CUDA driver or device on this machine");
        return;
    }
    match run(&args) {
        Ok(rows) => {
            if let Some(path) = &args.csv {
                let write = || -> std::io::Result<()> {
                    let mut f = std::fs::File::create(path)?;
                    writeln!(f, "impl,n,fwd_ms,fwd_bwd_ms,note")?;
                    for r in &rows {
                        writeln!(f, "{r}")?;
                    }
                    Ok(())
                };
                if let Err(e) = write() {
                    eprintln!("cuda_bench: writing {path}: {e}");
                    std::process::exit(1);
                }
            }
        }
        Err(e) => {
            eprintln!("cuda_bench: {e}");
            std::process::exit(1);
        }
    }
}
