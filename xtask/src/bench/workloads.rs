//! The workloads of `BENCHMARKS.md`: exact shapes, what each process runs and its FLOP count.
//!
//! This is the one place that defines them. `examples/bench_workload.rs` (Rust) and
//! `tools/bench_reference.py` (performer-pytorch) implement each name; this module only says
//! which name to ask for, with which `--n`, and how many FLOPs one repetition counts.
//!
//! # How FLOPs are counted
//!
//! Analytically, from the model's shapes, for one repetition of the workload; one multiply-add is
//! two FLOPs. So `gflops` in the report is counted FLOPs over the median time and the distance to
//! the machine's GEMM floor (~200 GFLOP/s on the 2 cores here) is visible.
//!
//! * Matmul `(m x k) @ (k x n)`: `2mkn`.
//! * FAVOR+ softmax feature map of one head, for `n` rows of width `d` into `m` features:
//!   `2ndm` (projection) `+ 3nd` (scale, square, row sum) `+ 4nm` (subtract the diagonal term and
//!   the stabilizer, exp, scale). Queries and keys each pay it.
//! * Non-causal linear attention of one head: `context = k'^T v` (`2nmd`), `out = q' context`
//!   (`2nmd`), the normalizer `q' . sum(k')` (`3nm`) and the division (`nd + n`).
//! * Causal linear attention of one head, in the chunkwise GEMM form (chunk `C = 64`, the
//!   CUDA kernels' `CHUNK`): the inter-chunk state update and readout cost what the non-causal
//!   products do (`4nmd + 3nm + nd + n`), plus the intra-chunk blocks, counted in full (masked
//!   half included): `q'_c k'_c^T` and `A v_c`, `2nC(m + d)`, and the intra-chunk normalizer
//!   `2nC`. This is what makes BENCHMARKS.md's approximate figures (~4.3, ~17, ~270 GFLOP).
//! * Local (windowed) attention of one head, window `W`, each query seeing `W (1 + back + fwd)`
//!   keys (performer-pytorch: `look_backward = 1`, `look_forward = 1` unless causal): scores and
//!   weighted sum `4 n keys dh`, softmax `5 n keys`, rotary `6 n dh`.
//! * Elementwise work counts a few FLOPs per element: LayerNorm 7, ScaleNorm 4, GELU 8, rotary
//!   position embedding 3 per query/key element, bias add and residual add 1, log-softmax +
//!   NLL 4 per logit, Adam 12 per parameter.
//! * Forward + backward = 3 x forward (the backward of every GEMM is two GEMMs of the same
//!   size; elementwise work is counted the same way for simplicity). A training step adds the
//!   Adam update. Recomputation (reversible layers' backward re-running the forward) is the
//!   implementation's cost, not the model's, and is not counted (the usual MFU convention).
//! * Generation counts the model's minimal work: one causal forward over the prompt, then one
//!   position per further token with the recurrent (state-carrying) form of causal linear
//!   attention (`4md` per head per position, no chunk term). An implementation that recomputes
//!   the whole prefix per token (performer-pytorch does) does more work than is counted, so its
//!   GFLOP/s is low: that is the point.

/// FastAttention heads of the `attn-*` workloads.
pub const ATTN_HEADS: usize = 8;
/// FastAttention head width of the `attn-*` workloads.
pub const ATTN_DIM_HEAD: usize = 64;
/// Random features of every workload (`nb_features`).
pub const NB_FEATURES: usize = 256;
/// Chunk length of the chunkwise causal form the FLOP count assumes.
pub const CAUSAL_CHUNK: usize = 64;

/// Shape of the `lm-*` / `generate-*` PerformerLM.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LmShape {
    /// Vocabulary (`num_tokens`).
    pub vocab: usize,
    /// Model width (`dim`).
    pub dim: usize,
    /// Layers (`depth`).
    pub depth: usize,
    /// All heads (`heads`), local ones included.
    pub heads: usize,
    /// Local (windowed softmax) heads among `heads` (`local_attn_heads`).
    pub local_heads: usize,
    /// Window of the local heads (`local_window_size`).
    pub local_window: usize,
    /// Head width (`dim_head`).
    pub dim_head: usize,
    /// Random features (`nb_features`).
    pub nb_features: usize,
    /// Feed-forward expansion (`ff_mult`).
    pub ff_mult: usize,
    /// Gated feed-forward (`ff_glu`).
    pub ff_glu: bool,
    /// ScaleNorm instead of LayerNorm (`use_scalenorm`).
    pub scalenorm: bool,
    /// Causal attention.
    pub causal: bool,
}

/// PerformerLM vocab 256, dim 256, depth 4, heads 4, dim_head 64, nb_features 256.
pub const LM_BASE: LmShape = LmShape {
    vocab: 256,
    dim: 256,
    depth: 4,
    heads: 4,
    local_heads: 0,
    local_window: 256,
    dim_head: 64,
    nb_features: NB_FEATURES,
    ff_mult: 4,
    ff_glu: false,
    scalenorm: false,
    causal: true,
};

/// The `lm-small-64` PerformerLM: the shape of a quick CPU run (dim 128, depth 4, heads 4,
/// dim_head 32, nb_features 64, causal; shift_tokens changes no FLOP count).
pub const LM_SMALL: LmShape = LmShape {
    dim: 128,
    dim_head: 32,
    nb_features: 64,
    ..LM_BASE
};

/// Sequences per step of `lm-small-64`.
pub const LM_SMALL_BATCH: usize = 12;

/// What one workload process runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// FastAttention h8 d64 m256 over `n` positions: forward + backward of `out.sum()`.
    Attention {
        /// Causal (prefix) attention.
        causal: bool,
        /// Sequence length.
        n: usize,
    },
    /// One training step of PerformerLM on `batch` sequences of `n + 1` tokens: loss,
    /// backward, Adam step. `reversible` and `shift_tokens` change no FLOP count.
    LmTrain {
        /// The model.
        shape: LmShape,
        /// Positions the model sees per sequence.
        n: usize,
        /// Sequences per step.
        batch: usize,
    },
    /// Prime with `prompt` random tokens, sample `new_tokens` more (top-k, filter_thres 0.9).
    Generate {
        /// The model.
        shape: LmShape,
        /// Prompt length.
        prompt: usize,
        /// Sampled tokens.
        new_tokens: usize,
    },
    /// `(m x k) @ (k x n)`: the machine's GEMM floor in the same run.
    Matmul {
        /// Rows of the left operand.
        m: usize,
        /// Inner dimension.
        k: usize,
        /// Columns of the right operand.
        n: usize,
    },
}

/// A BENCHMARKS.md target: an upper bound on time, a lower bound on tokens/s, a memory cap.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Target {
    /// Median time at most this.
    pub max_ms: Option<f64>,
    /// Tokens per second at least this.
    pub min_tokens_per_s: Option<f64>,
    /// Peak RSS at most this.
    pub max_rss_mib: Option<f64>,
    /// At least this many times faster (median) than the named workload of the same run.
    pub min_speedup_over: Option<(&'static str, f64)>,
    /// A bf16 workload's bars against the f32 model it is rounded from.
    pub against_f32: Option<AgainstF32>,
}

/// What `bench_workload --against-f32` must show for a bf16 workload: the generation of the bf16
/// model against that of the f32 model it is rounded from (the same seed, prompt and sampler).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AgainstF32 {
    /// At least this many leading sampled tokens equal.
    pub min_equal_tokens: usize,
    /// `max |bf16 - f32| / max |f32|` of the logits, worst step, at most this.
    pub max_logits_rel_err: f64,
}

/// One benchmark workload.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// Name in the report and on the command line (`attn-causal-4k`, `attn-causal@16384`).
    pub name: String,
    /// Name the workload processes understand (`--workload`).
    pub process_name: &'static str,
    /// `--n` to pass, if any (the scaling sweep's families take it).
    pub n_arg: Option<usize>,
    /// What runs.
    pub kind: Kind,
    /// The BENCHMARKS.md target.
    pub target: Target,
}

impl Workload {
    fn named(name: &'static str, kind: Kind, target: Target) -> Self {
        Self {
            name: name.to_string(),
            process_name: name,
            n_arg: None,
            kind,
            target,
        }
    }

    /// Tokens one repetition processes (positions for attention and training, sampled tokens
    /// for generation, rows for the matmul).
    pub fn tokens(&self) -> usize {
        match self.kind {
            Kind::Attention { n, .. } => n,
            Kind::LmTrain { n, batch, .. } => batch * n,
            Kind::Generate { new_tokens, .. } => new_tokens,
            Kind::Matmul { m, .. } => m,
        }
    }

    /// Counted FLOPs of one repetition (see the module docs).
    pub fn flops(&self) -> f64 {
        match self.kind {
            Kind::Attention { causal, n } => {
                3.0 * ATTN_HEADS as f64
                    * fast_attention_head_fwd(n, ATTN_DIM_HEAD, NB_FEATURES, causal)
            }
            Kind::LmTrain { shape, n, batch } => {
                3.0 * batch as f64 * lm_forward(&shape, n) + adam(&shape)
            }
            Kind::Generate {
                shape,
                prompt,
                new_tokens,
            } => {
                lm_forward(&shape, prompt)
                    + new_tokens.saturating_sub(1) as f64 * lm_decode_step(&shape)
            }
            Kind::Matmul { m, k, n } => 2.0 * (m * k * n) as f64,
        }
    }
}

const fn target(
    max_ms: Option<f64>,
    min_tokens_per_s: Option<f64>,
    max_rss_mib: Option<f64>,
) -> Target {
    Target {
        max_ms,
        min_tokens_per_s,
        max_rss_mib,
        min_speedup_over: None,
        against_f32: None,
    }
}

/// The workloads of BENCHMARKS.md in table order, then the `matmul-4k` GEMM calibration.
pub fn all() -> Vec<Workload> {
    let attn = |causal, n| Kind::Attention { causal, n };
    let lm = |causal, full: bool| {
        let mut shape = LmShape { causal, ..LM_BASE };
        if full {
            shape.ff_glu = true;
            shape.scalenorm = true;
            shape.local_heads = 2;
        }
        Kind::LmTrain {
            shape,
            n: 1024,
            batch: 1,
        }
    };
    vec![
        Workload::named(
            "attn-noncausal-4k",
            attn(false, 4096),
            target(Some(90.0), None, Some(250.0)),
        ),
        Workload::named(
            "attn-causal-1k",
            attn(true, 1024),
            target(Some(30.0), None, Some(150.0)),
        ),
        Workload::named(
            "attn-causal-4k",
            attn(true, 4096),
            target(Some(130.0), None, Some(300.0)),
        ),
        Workload::named(
            "attn-causal-64k",
            attn(true, 65536),
            target(Some(2500.0), None, Some(3072.0)),
        ),
        Workload::named(
            "lm-causal-1k",
            lm(true, false),
            target(None, Some(4000.0), Some(400.0)),
        ),
        Workload::named(
            "lm-noncausal-1k",
            lm(false, false),
            target(None, Some(6000.0), Some(400.0)),
        ),
        Workload::named(
            "lm-full-1k",
            lm(true, true),
            target(None, Some(2600.0), Some(300.0)),
        ),
        Workload::named(
            "lm-small-64",
            Kind::LmTrain {
                shape: LM_SMALL,
                n: 64,
                batch: LM_SMALL_BATCH,
            },
            target(None, Some(12000.0), None),
        ),
        Workload::named(
            "generate-512",
            Kind::Generate {
                shape: LM_BASE,
                prompt: 512,
                new_tokens: 64,
            },
            target(None, Some(1500.0), None),
        ),
        Workload::named(
            "generate-512-bf16",
            Kind::Generate {
                shape: LM_BASE,
                prompt: 512,
                new_tokens: 64,
            },
            Target {
                min_speedup_over: Some(("generate-512", 1.6)),
                against_f32: Some(AgainstF32 {
                    min_equal_tokens: 16,
                    max_logits_rel_err: 1e-2,
                }),
                ..Target::default()
            },
        ),
        Workload::named(
            "matmul-4k",
            Kind::Matmul {
                m: 4096,
                k: 512,
                n: 2048,
            },
            Target::default(),
        ),
    ]
}

/// One point of the scaling sweep: FastAttention forward + backward at length `n`, run as the
/// `attn-causal` / `attn-noncausal` family with `--n`.
pub fn scaling_point(causal: bool, n: usize) -> Workload {
    let process_name = if causal {
        "attn-causal"
    } else {
        "attn-noncausal"
    };
    Workload {
        name: format!("{process_name}@{n}"),
        process_name,
        n_arg: Some(n),
        kind: Kind::Attention { causal, n },
        target: Target::default(),
    }
}

/// Default lengths of the scaling sweep: 1k to 64k, powers of two.
pub fn default_scaling_lengths() -> Vec<usize> {
    (10..=16).map(|p| 1usize << p).collect()
}

/// Forward FLOPs of FastAttention for one head over `n` positions.
pub fn fast_attention_head_fwd(n: usize, d: usize, m: usize, causal: bool) -> f64 {
    let (n, d, m) = (n as f64, d as f64, m as f64);
    let feature_map = 2.0 * n * d * m + 3.0 * n * d + 4.0 * n * m;
    let mut attention = 4.0 * n * m * d + 3.0 * n * m + n * d + n;
    if causal {
        let c = CAUSAL_CHUNK as f64;
        attention += 2.0 * n * c * (m + d) + 2.0 * n * c;
    }
    2.0 * feature_map + attention
}

/// Forward FLOPs of local attention for one head over `n` positions.
fn local_attention_head_fwd(n: usize, dh: usize, window: usize, causal: bool) -> f64 {
    let keys = (window * if causal { 2 } else { 3 }) as f64;
    let (n, dh) = (n as f64, dh as f64);
    4.0 * n * keys * dh + 5.0 * n * keys + 6.0 * n * dh
}

/// Per-position forward FLOPs of everything in one layer but the attention core.
fn layer_dense_per_position(s: &LmShape) -> f64 {
    let (dim, inner) = (s.dim as f64, (s.heads * s.dim_head) as f64);
    let hidden = (s.dim * s.ff_mult) as f64;
    let norm = if s.scalenorm { 4.0 } else { 7.0 } * dim;
    let qkv = 3.0 * 2.0 * dim * inner;
    let rotary = 2.0 * 3.0 * ((s.heads - s.local_heads) * s.dim_head) as f64;
    let out = 2.0 * inner * dim; // attn_out_bias = False in PerformerLM
    let ff_in = if s.ff_glu { 2.0 } else { 1.0 } * (2.0 * dim * hidden + hidden);
    let ff_act = 8.0 * hidden + if s.ff_glu { hidden } else { 0.0 };
    let ff_out = 2.0 * hidden * dim + dim;
    2.0 * norm + qkv + rotary + out + ff_in + ff_act + ff_out + 2.0 * dim
}

/// Per-position forward FLOPs outside the layers: positional embedding add, final norm, logits,
/// log-softmax + NLL.
fn head_per_position(s: &LmShape) -> f64 {
    let (dim, vocab) = (s.dim as f64, s.vocab as f64);
    dim + 7.0 * dim + 2.0 * dim * vocab + vocab + 4.0 * vocab
}

/// Forward FLOPs of PerformerLM (and its loss) over `n` positions.
pub fn lm_forward(s: &LmShape, n: usize) -> f64 {
    let global = (s.heads - s.local_heads) as f64;
    let attention = global * fast_attention_head_fwd(n, s.dim_head, s.nb_features, s.causal)
        + s.local_heads as f64 * local_attention_head_fwd(n, s.dim_head, s.local_window, s.causal);
    let per_layer = n as f64 * layer_dense_per_position(s) + attention;
    s.depth as f64 * per_layer + n as f64 * head_per_position(s)
}

/// Forward FLOPs of PerformerLM's matrix products alone over `n` positions: the projections,
/// the feed-forward and the logits, the FAVOR+ feature maps' `x W^T` and attention products
/// (with the chunked causal form's intra-chunk blocks), and local attention's scores and
/// weighted sums. A training step does three times these (each product's backward is two
/// products of its size); at the machine's GEMM rate they are the step's floor.
pub fn lm_matmul_flops(s: &LmShape, n: usize) -> f64 {
    let (dim, inner, hidden) = (
        s.dim as f64,
        (s.heads * s.dim_head) as f64,
        (s.dim * s.ff_mult) as f64,
    );
    let ff_in_width = if s.ff_glu { 2.0 * hidden } else { hidden };
    let dense =
        3.0 * 2.0 * dim * inner + 2.0 * inner * dim + 2.0 * dim * ff_in_width + 2.0 * hidden * dim;
    let (nf, d, m) = (n as f64, s.dim_head as f64, s.nb_features as f64);
    let mut favor = 2.0 * (2.0 * nf * d * m) + 4.0 * nf * m * d;
    if s.causal {
        favor += 2.0 * nf * CAUSAL_CHUNK as f64 * (m + d);
    }
    let keys = (s.local_window * if s.causal { 2 } else { 3 }) as f64;
    let local = 4.0 * nf * keys * d;
    let per_layer =
        nf * dense + (s.heads - s.local_heads) as f64 * favor + s.local_heads as f64 * local;
    s.depth as f64 * per_layer + nf * 2.0 * dim * s.vocab as f64
}

/// Forward FLOPs of one generated position with carried attention state.
pub fn lm_decode_step(s: &LmShape) -> f64 {
    let (d, m) = (s.dim_head as f64, s.nb_features as f64);
    let feature_map = 2.0 * d * m + 3.0 * d + 4.0 * m;
    let attention = 4.0 * m * d + 3.0 * m + d + 1.0;
    let global = (s.heads - s.local_heads) as f64 * (2.0 * feature_map + attention);
    let local =
        s.local_heads as f64 * local_attention_head_fwd(1, s.dim_head, s.local_window, s.causal);
    s.depth as f64 * (layer_dense_per_position(s) + global + local) + head_per_position(s)
}

/// Parameters of the PerformerLM (embedding, layers, output head).
pub fn lm_parameters(s: &LmShape) -> usize {
    let (dim, inner, hidden) = (s.dim, s.heads * s.dim_head, s.dim * s.ff_mult);
    let norm = if s.scalenorm { 1 } else { 2 * dim };
    let ff_in_width = if s.ff_glu { 2 * hidden } else { hidden };
    let layer = 2 * norm
        + 3 * dim * inner
        + inner * dim
        + dim * ff_in_width
        + ff_in_width
        + hidden * dim
        + dim;
    s.vocab * dim + s.depth * layer + 2 * dim + dim * s.vocab + s.vocab
}

/// FLOPs of one Adam update of the PerformerLM.
fn adam(s: &LmShape) -> f64 {
    12.0 * lm_parameters(s) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gflop(name: &str) -> f64 {
        all().into_iter().find(|w| w.name == name).unwrap().flops() / 1e9
    }

    #[test]
    fn flop_counts_match_benchmarks_md() {
        // The approximate figures BENCHMARKS.md quotes, within 5%.
        for (name, approx) in [
            ("attn-noncausal-4k", 13.0),
            ("attn-causal-1k", 4.3),
            ("attn-causal-4k", 17.0),
            ("attn-causal-64k", 270.0),
            ("lm-causal-1k", 28.0),
            ("lm-noncausal-1k", 26.0),
        ] {
            let got = gflop(name);
            assert!(
                (got / approx - 1.0).abs() < 0.05,
                "{name}: {got} GFLOP vs ~{approx}"
            );
        }
        assert_eq!(gflop("matmul-4k"), 2.0 * 4096.0 * 512.0 * 2048.0 / 1e9);
    }

    #[test]
    fn lm_parameter_count_matches_performer_pytorch() {
        // sum(p.numel() for p in PerformerLM(num_tokens=256, max_seq_len=1024, dim=256, depth=4,
        // heads=4, dim_head=64, nb_features=256).parameters()) ...
        assert_eq!(lm_parameters(&LM_BASE), 3_286_784);
        // ... and with ff_glu=True, use_scalenorm=True, local_attn_heads=2 (lm-full-1k).
        let full = LmShape {
            ff_glu: true,
            scalenorm: true,
            local_heads: 2,
            ..LM_BASE
        };
        assert_eq!(lm_parameters(&full), 4_335_368);
        // ... and lm-small-64's (dim 128, dim_head 32, nb_features 64, max_seq_len 64,
        // shift_tokens=True: the shift has no parameters).
        assert_eq!(lm_parameters(&LM_SMALL), 857_088);
    }

    #[test]
    fn matmul_flops_are_most_but_not_all_of_the_count() {
        for w in all() {
            let Kind::LmTrain { shape, n, batch } = w.kind else {
                continue;
            };
            let products = 3.0 * batch as f64 * lm_matmul_flops(&shape, n);
            let share = products / w.flops();
            assert!(
                (0.85..1.0).contains(&share),
                "{}: matrix products are {share} of the counted FLOPs",
                w.name
            );
        }
    }

    #[test]
    fn names_are_unique_and_sweep_points_are_named_by_length() {
        let names: std::collections::BTreeSet<_> = all().into_iter().map(|w| w.name).collect();
        assert_eq!(names.len(), all().len());
        let p = scaling_point(true, 16384);
        assert_eq!(
            (p.name.as_str(), p.process_name, p.n_arg),
            ("attn-causal@16384", "attn-causal", Some(16384))
        );
        assert_eq!(default_scaling_lengths().first(), Some(&1024));
        assert_eq!(default_scaling_lengths().last(), Some(&65536));
    }
}
