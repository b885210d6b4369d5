//! The FAVOR+ and linear-attention kernels (favor.cu, causal.cu, causal_tf32.cu, linear.cu) on
//! the emulated device, through the same [`Launcher`] interface a GPU uses, in the launch
//! sequences of `ops.rs`, against the f64 reference: f32 kernels within 1e-4, TF32 within 1e-3.
//! Every output buffer starts as NaN (the emulator's fresh memory), so an element no kernel
//! writes fails the comparison. Where a GPU is present (the device bundle) the same sequences
//! run on it through `GpuLauncher`, its allocations NaN-filled too.

mod common;

use common::{close, down, emulated, round, up};
use performer_cuda::reference::{self as r, Dims, Rng};
use performer_cuda::{
    DeviceBuffer, Elem, GemmStridedBatched, KernelArg as A, LaunchDims, SharedLauncher, Transpose,
};

const CHUNK: usize = 64;
const TILE: usize = 64;

fn scratch(dev: &SharedLauncher, len: usize) -> DeviceBuffer {
    DeviceBuffer::alloc(dev, len, Elem::F32).unwrap_or_else(|e| panic!("{e}"))
}

fn launch(dev: &SharedLauncher, name: &str, dims: LaunchDims, args: &[A]) {
    // SAFETY: each call below passes the kernel's parameters in order and type (the emulator
    // checks number and kinds) with buffers sized as in ops.rs for the same grid.
    unsafe { dev.launch(name, dims, args) }.unwrap_or_else(|e| panic!("{name}: {e}"));
}

#[test]
fn favor_feature_map_forward_and_backward() {
    let Some(dev) = emulated("favor_feature_map_forward_and_backward") else {
        return;
    };
    // n past one tile, m not a multiple of the tile, bh > 1.
    let (bh, n, d, m) = (2usize, 70usize, 16usize, 72usize);
    let dims = Dims { bh, n, d, m, e: 1 };
    let mut rng = Rng::new(7);
    let x = round(&rng.normal_vec(bh * n * d, 1.0));
    let p = round(&rng.normal_vec(m * d, 1.0));
    let g = round(&rng.normal_vec(bh * n * m, 1.0));
    let (xd, pd, gd) = (up(&dev, &x), up(&dev, &p), up(&dev, &g));
    for is_query in [true, false] {
        let stab_len = if is_query { bh * n } else { bh };
        let feat = scratch(&dev, bh * n * m);
        let diag = scratch(&dev, bh * n);
        let stab = scratch(&dev, stab_len);
        launch(
            &dev,
            "fill_f32",
            LaunchDims::cover(stab_len, 256),
            &[
                stab.arg(),
                A::I64(stab_len as i64),
                A::F32(f32::NEG_INFINITY),
            ],
        );
        let dn = (d as f32).powf(-0.25);
        launch(
            &dev,
            "favor_project",
            LaunchDims::grid3(n.div_ceil(TILE), m.div_ceil(TILE), bh, 256),
            &[
                xd.arg(),
                pd.arg(),
                feat.arg(),
                diag.arg(),
                stab.arg(),
                A::I32(is_query as i32),
                A::I32(n as i32),
                A::I32(m as i32),
                A::I32(d as i32),
                A::F32(dn),
            ],
        );
        launch(
            &dev,
            "favor_exp",
            LaunchDims::cover(bh * n * m, 256),
            &[
                feat.arg(),
                diag.arg(),
                stab.arg(),
                A::I32(is_query as i32),
                A::I32(n as i32),
                A::I32(m as i32),
                A::F32((m as f32).powf(-0.5)),
                A::F32(1e-4),
                A::I64((bh * n * m) as i64),
            ],
        );
        let want = r::softmax_features(&x, &p, dims, is_query);
        let got = down(&feat);
        close(&format!("features (query={is_query})"), &got, &want, 1e-4);

        let gx = scratch(&dev, bh * n * d);
        launch(
            &dev,
            "favor_backward",
            LaunchDims::grid3(n.div_ceil(TILE), d.div_ceil(TILE), bh, 256),
            &[
                xd.arg(),
                pd.arg(),
                feat.arg(),
                gd.arg(),
                gx.arg(),
                A::I32(n as i32),
                A::I32(m as i32),
                A::I32(d as i32),
                A::F32(dn),
                A::F32((m as f32).powf(-0.5) * 1e-4),
            ],
        );
        let want_gx = r::softmax_features_backward(&x, &p, &want, &g, dims);
        close(
            &format!("dx (query={is_query})"),
            &down(&gx),
            &want_gx,
            1e-4,
        );
    }
}

/// The launch sequence of ops::causal_linear_attention and its backward.
fn causal_case(dev: &SharedLauncher, bh: usize, n: usize, m: usize, e: usize, tf32: bool) {
    let dims = Dims { bh, n, d: 1, m, e };
    let mut rng = Rng::new(40 + n as u64);
    let scale = (m as f64).powf(-0.5);
    let feats = |rng: &mut Rng| {
        round(
            &rng.normal_vec(bh * n * m, 0.5)
                .iter()
                .map(|x| scale * x.exp())
                .collect::<Vec<_>>(),
        )
    };
    let qf = feats(&mut rng);
    let kf = feats(&mut rng);
    let v = round(&rng.normal_vec(bh * n * e, 1.0));
    let g = round(&rng.normal_vec(bh * n * e, 1.0));
    let (qd, kd, vd, gd) = (up(dev, &qf), up(dev, &kf), up(dev, &v), up(dev, &g));
    let sfx = if tf32 { "_tf32" } else { "" };
    let k = |name: &str| format!("{name}{sfx}");
    let nt = n.div_ceil(CHUNK);
    let (ni, mi, ei) = (A::I32(n as i32), A::I32(m as i32), A::I32(e as i32));
    let states = |a: &DeviceBuffer,
                  b: &DeviceBuffer,
                  col: A,
                  s: &DeviceBuffer,
                  sc: &DeviceBuffer,
                  rev: bool| {
        let name = k(if rev {
            "chunk_state_rev"
        } else {
            "chunk_state_fwd"
        });
        launch(
            dev,
            &name,
            LaunchDims::grid3(m.div_ceil(32), (e + 1).div_ceil(32), bh, 256),
            &[a.arg(), b.arg(), col, s.arg(), sc.arg(), ni, mi, ei],
        );
    };
    let h = scratch(dev, bh * nt * m * e);
    let z = scratch(dev, bh * nt * m);
    states(&kd, &vd, A::Ptr(0), &h, &z, false);
    let out = scratch(dev, bh * n * e);
    let den = scratch(dev, bh * n);
    launch(
        dev,
        &k("chunk_output_fwd"),
        LaunchDims::grid3(nt, e.div_ceil(TILE), bh, 256),
        &[
            qd.arg(),
            kd.arg(),
            vd.arg(),
            h.arg(),
            z.arg(),
            out.arg(),
            den.arg(),
            ni,
            mi,
            ei,
            A::F32(1e-6),
        ],
    );
    let rows = bh * n;
    let dnum = scratch(dev, bh * n * e);
    let dden = scratch(dev, bh * n);
    launch(
        dev,
        "attention_grad_prep",
        LaunchDims::cover(rows * 32, 256),
        &[
            gd.arg(),
            out.arg(),
            den.arg(),
            A::I64(1),
            dnum.arg(),
            A::I64(e as i64),
            dden.arg(),
            A::I64(1),
            A::I64(rows as i64),
            ei,
        ],
    );
    let s = scratch(dev, bh * nt * m * e);
    let sc = scratch(dev, bh * nt * m);
    states(&kd, &vd, A::Ptr(0), &s, &sc, false);
    let dqf = scratch(dev, bh * n * m);
    let feat_grid = LaunchDims::grid3(nt, m.div_ceil(TILE), bh, 256);
    launch(
        dev,
        &k("chunk_grad_feat_fwd"),
        feat_grid,
        &[
            dnum.arg(),
            dden.arg(),
            vd.arg(),
            kd.arg(),
            s.arg(),
            sc.arg(),
            A::F32(1e-6),
            dqf.arg(),
            ni,
            mi,
            ei,
        ],
    );
    states(&qd, &dnum, dden.arg(), &s, &sc, true);
    let dkf = scratch(dev, bh * n * m);
    launch(
        dev,
        &k("chunk_grad_feat_rev"),
        feat_grid,
        &[
            vd.arg(),
            dnum.arg(),
            dden.arg(),
            qd.arg(),
            s.arg(),
            sc.arg(),
            dkf.arg(),
            ni,
            mi,
            ei,
        ],
    );
    let dv = scratch(dev, bh * n * e);
    launch(
        dev,
        &k("chunk_output_rev"),
        LaunchDims::grid3(nt, e.div_ceil(TILE), bh, 256),
        &[
            kd.arg(),
            qd.arg(),
            dnum.arg(),
            s.arg(),
            dv.arg(),
            ni,
            mi,
            ei,
        ],
    );
    let tol = if tf32 { 1e-3 } else { 1e-4 };
    let (want_out, want_den) = r::causal_linear_attention(&qf, &kf, &v, dims);
    let (wdq, wdk, wdv) = r::causal_linear_attention_backward(&qf, &kf, &v, &g, dims);
    let tag = format!("{sfx} bh{bh} n{n} m{m} e{e}");
    close(&format!("out{tag}"), &down(&out), &want_out, tol);
    close(&format!("den{tag}"), &down(&den), &want_den, tol);
    close(&format!("dqf{tag}"), &down(&dqf), &wdq, tol);
    close(&format!("dkf{tag}"), &down(&dkf), &wdk, tol);
    close(&format!("dv{tag}"), &down(&dv), &wdv, tol);
}

#[test]
fn causal_kernels_f32_and_tf32() {
    let Some(dev) = emulated("causal_kernels_f32_and_tf32") else {
        return;
    };
    // Lengths past a chunk boundary and mid-chunk, m and e not multiples of the 32-wide
    // reduction step or the 64-wide tiles, bh > 1.
    for &(bh, n, m, e) in &[(2usize, 100usize, 72usize, 40usize), (1, 64, 32, 70)] {
        for tf32 in [false, true] {
            causal_case(&dev, bh, n, m, e, tf32);
        }
    }
}

/// gemm in the row-major convention of ops::gemm_rm (C = op(A) op(B), handed to cuBLAS as
/// C^T = op(B)^T op(A)^T).
#[allow(clippy::too_many_arguments)]
fn gemm_rm(
    dev: &SharedLauncher,
    ta: bool,
    rows: usize,
    cols: usize,
    inner: usize,
    a: &DeviceBuffer,
    lda: usize,
    sa: usize,
    b: &DeviceBuffer,
    ldb: usize,
    sb: usize,
    c: &DeviceBuffer,
    ldc: usize,
    sc: usize,
    batch: usize,
) {
    let g = GemmStridedBatched {
        transa: Transpose::No,
        transb: if ta { Transpose::Yes } else { Transpose::No },
        m: cols as i32,
        n: rows as i32,
        k: inner as i32,
        alpha: 1.0,
        a: b.ptr(),
        lda: ldb as i32,
        stride_a: sb as i64,
        b: a.ptr(),
        ldb: lda as i32,
        stride_b: sa as i64,
        beta: 0.0,
        c: c.ptr(),
        ldc: ldc as i32,
        stride_c: sc as i64,
        batch: batch as i32,
    };
    // SAFETY: the matrices lie in the buffers (sized by the caller as in ops.rs).
    unsafe { dev.gemm_strided_batched(&g) }.unwrap_or_else(|e| panic!("gemm: {e}"));
}

#[test]
fn non_causal_linear_attention_through_emulated_cublas() {
    let Some(dev) = emulated("non_causal_linear_attention_through_emulated_cublas") else {
        return;
    };
    let (bh, n, m, e) = (3usize, 37usize, 20usize, 9usize);
    let dims = Dims { bh, n, d: 1, m, e };
    let mut rng = Rng::new(3);
    let pos = |rng: &mut Rng, len| {
        round(
            &rng.normal_vec(len, 0.5)
                .iter()
                .map(|x| x.exp())
                .collect::<Vec<_>>(),
        )
    };
    let qf = pos(&mut rng, bh * n * m);
    let kf = pos(&mut rng, bh * n * m);
    let v = round(&rng.normal_vec(bh * n * e, 1.0));
    let (qd, kd, vd) = (up(&dev, &qf), up(&dev, &kf), up(&dev, &v));
    let ea = e + 1;
    let vaug = scratch(&dev, bh * n * ea);
    launch(
        &dev,
        "augment_ones",
        LaunchDims::cover(bh * n * ea, 256),
        &[
            vd.arg(),
            vaug.arg(),
            A::I64((bh * n) as i64),
            A::I32(e as i32),
        ],
    );
    let context = scratch(&dev, bh * m * ea);
    gemm_rm(
        &dev,
        true,
        m,
        ea,
        n,
        &kd,
        m,
        n * m,
        &vaug,
        ea,
        n * ea,
        &context,
        ea,
        m * ea,
        bh,
    );
    let num = scratch(&dev, bh * n * ea);
    gemm_rm(
        &dev,
        false,
        n,
        ea,
        m,
        &qd,
        m,
        n * m,
        &context,
        ea,
        m * ea,
        &num,
        ea,
        n * ea,
        bh,
    );
    let out = scratch(&dev, bh * n * e);
    launch(
        &dev,
        "normalize_rows",
        LaunchDims::cover(bh * n * e, 256),
        &[
            num.arg(),
            out.arg(),
            A::I64((bh * n) as i64),
            A::I32(e as i32),
        ],
    );
    close(
        "linear attention",
        &down(&out),
        &r::linear_attention(&qf, &kf, &v, dims),
        1e-4,
    );
}

/// attention_grad_prep gives each row one warp in a grid-stride loop over `rows * 32` threads
/// in blocks of 256, so when the rows do not fill a block its later warps skip the loop while
/// the first ones shuffle. That is correct CUDA (a warp collective needs only its own warp);
/// the emulator must not take it for a divergent barrier whichever thread it runs first (it
/// did, in whole-model backward passes and causal fixtures). 3 rows (one block, five idle
/// warps) and 9 rows (the second block: one busy warp, seven idle), 16 launches each, every
/// launch its own thread order: all succeed and match the formula.
#[test]
fn warp_per_row_kernels_with_idle_warps_run_under_every_thread_order() {
    let Some(dev) = emulated("warp_per_row_kernels_with_idle_warps_run_under_every_thread_order")
    else {
        return;
    };
    for (rows, e) in [(3usize, 5usize), (9, 40)] {
        let mut rng = Rng::new(11);
        let g = round(&rng.normal_vec(rows * e, 1.0));
        let out = round(&rng.normal_vec(rows * e, 1.0));
        let den: Vec<f64> = round(
            &rng.normal_vec(rows, 1.0)
                .iter()
                .map(|v| v.abs() + 0.5)
                .collect::<Vec<_>>(),
        );
        let (gd, outd, dend) = (up(&dev, &g), up(&dev, &out), up(&dev, &den));
        let want_num: Vec<f64> = (0..rows * e).map(|i| g[i] / den[i / e]).collect();
        let want_den: Vec<f64> = (0..rows)
            .map(|r| -(0..e).map(|c| g[r * e + c] * out[r * e + c]).sum::<f64>() / den[r])
            .collect();
        for launch_no in 0..16 {
            let dnum = scratch(&dev, rows * e);
            let dden = scratch(&dev, rows);
            launch(
                &dev,
                "attention_grad_prep",
                LaunchDims::cover(rows * 32, 256),
                &[
                    gd.arg(),
                    outd.arg(),
                    dend.arg(),
                    A::I64(1),
                    dnum.arg(),
                    A::I64(e as i64),
                    dden.arg(),
                    A::I64(1),
                    A::I64(rows as i64),
                    A::I32(e as i32),
                ],
            );
            close(
                &format!("{rows} rows, launch {launch_no}: dnum"),
                &down(&dnum),
                &want_num,
                1e-5,
            );
            close(
                &format!("{rows} rows, launch {launch_no}: dden"),
                &down(&dden),
                &want_den,
                1e-5,
            );
        }
    }
}
