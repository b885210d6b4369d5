//! Bad input to every public constructor and forward, in one table: each case must return the
//! expected kind of `performer_tensor::Error` whose message names the argument, the value and
//! the limit, and none may panic (each runs under `catch_unwind`).

use std::panic::{AssertUnwindSafe, catch_unwind};

use ndarray::{Array2, array};
use performer_favor::{FastAttention, FastAttentionConfig};
use performer_layers::{
    AttentionConfig, Block, BlockInputs, CrossAttention, Embedding, LocalAttention, SelfAttention,
};
use performer_models::*;
use performer_tensor::{Error, Result, Tensor};
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Invalid,
    Shape,
    Index,
}

fn kind_of(e: &Error) -> Option<Kind> {
    match e {
        Error::InvalidArgument { .. } => Some(Kind::Invalid),
        Error::Shape { .. } => Some(Kind::Shape),
        Error::Index { .. } => Some(Kind::Index),
        _ => None,
    }
}

type Run<'a> = Box<dyn Fn() -> Result<()> + 'a>;

struct Case<'a> {
    group: &'static str,
    name: &'static str,
    kind: Kind,
    needles: &'static [&'static str],
    run: Run<'a>,
}

struct Table<'a> {
    group: &'static str,
    cases: Vec<Case<'a>>,
}

impl<'a> Table<'a> {
    fn group(&mut self, g: &'static str) {
        self.group = g;
    }

    fn add<T>(
        &mut self,
        name: &'static str,
        kind: Kind,
        needles: &'static [&'static str],
        f: impl Fn() -> Result<T> + 'a,
    ) {
        self.cases.push(Case {
            group: self.group,
            name,
            kind,
            needles,
            run: Box::new(move || f().map(|_| ())),
        });
    }
}

fn lm_cfg(causal: bool) -> PerformerLMConfig {
    PerformerLMConfig {
        num_tokens: 20,
        max_seq_len: 32,
        dim: 16,
        depth: 2,
        heads: 2,
        dim_head: 8,
        nb_features: Some(12),
        causal,
        ..Default::default()
    }
}

fn perf_cfg() -> PerformerConfig {
    PerformerConfig {
        dim: 16,
        depth: 2,
        heads: 2,
        dim_head: Some(8),
        nb_features: Some(8),
        ..Default::default()
    }
}

fn attn_cfg() -> AttentionConfig {
    AttentionConfig {
        heads: 2,
        dim_head: Some(8),
        nb_features: Some(8),
        local_heads: 1,
        local_window_size: 4,
        ..AttentionConfig::new(16)
    }
}

fn fa_cfg(causal: bool) -> FastAttentionConfig {
    FastAttentionConfig {
        nb_features: Some(8),
        causal,
        ..FastAttentionConfig::new(8)
    }
}

fn lm_json(extra: Value) -> Value {
    let mut kw = json!({"num_tokens": 20, "max_seq_len": 32, "dim": 16, "depth": 1, "heads": 2, "dim_head": 8});
    for (k, v) in extra.as_object().unwrap() {
        kw[k] = v.clone();
    }
    json!({"model": "PerformerLM", "kwargs": kw})
}

fn enc_dec_json(extra: Value) -> Value {
    let mut kw = json!({"dim": 16, "enc_num_tokens": 20, "enc_max_seq_len": 32, "enc_depth": 1, "enc_heads": 2,
        "dec_num_tokens": 20, "dec_max_seq_len": 32, "dec_depth": 1, "dec_heads": 2});
    for (k, v) in extra.as_object().unwrap() {
        kw[k] = v.clone();
    }
    json!({"model": "PerformerEncDec", "kwargs": kw})
}

fn toks(b: usize, n: usize) -> Array2<i64> {
    Array2::from_shape_fn((b, n), |(i, j)| ((i + j) % 7 + 1) as i64)
}

fn qkv(q: &[usize], k: &[usize], v: &[usize]) -> (Tensor, Tensor, Tensor) {
    (Tensor::randn(q), Tensor::randn(k), Tensor::randn(v))
}

fn bools(b: usize, n: usize) -> Array2<bool> {
    Array2::from_elem((b, n), true)
}

#[test]
fn every_bad_input_is_a_clear_error_and_none_panics() {
    performer_tensor::rng::manual_seed(9);
    let lm = PerformerLM::new(lm_cfg(true)).unwrap();
    let lm_nc = PerformerLM::new(lm_cfg(false)).unwrap();
    let dec = PerformerLM::new(PerformerLMConfig {
        cross_attend: true,
        ..lm_cfg(true)
    })
    .unwrap();
    let perf = Performer::new(perf_cfg()).unwrap();
    let perf_x = Performer::new(PerformerConfig {
        cross_attend: true,
        ..perf_cfg()
    })
    .unwrap();
    let sa = SelfAttention::new(attn_cfg()).unwrap();
    let ca = CrossAttention::new(AttentionConfig {
        local_heads: 0,
        ..attn_cfg()
    })
    .unwrap();
    let fa = FastAttention::new(fa_cfg(false)).unwrap();
    let fac = FastAttention::new(fa_cfg(true)).unwrap();
    let la = LocalAttention::new(4, false, 0.0, 8).unwrap();
    let ar = AutoregressiveWrapper::new(PerformerLM::new(lm_cfg(true)).unwrap());
    let ar_dec = AutoregressiveWrapper::new(
        PerformerLM::new(PerformerLMConfig {
            cross_attend: true,
            ..lm_cfg(true)
        })
        .unwrap(),
    );
    let enc_dec = PerformerEncDec::new(PerformerEncDecConfig {
        dim: 16,
        enc: lm_cfg(false),
        dec: lm_cfg(true),
        ..Default::default()
    })
    .unwrap();
    let x = Tensor::randn(&[1, 5, 16]);
    let ctx = Tensor::randn(&[1, 7, 16]);
    let gen_opts = GenerateOptions::default();

    let mut t = Table {
        group: "",
        cases: Vec::new(),
    };
    use Kind::*;

    // ---------------------------------------------------------------- constructors
    t.group("constructors");
    let perf_new = |f: fn(&mut PerformerConfig)| {
        move || {
            let mut c = perf_cfg();
            f(&mut c);
            Performer::new(c)
        }
    };
    t.add(
        "Performer dim 0",
        Invalid,
        &["`dim` = 0", "must be positive"],
        perf_new(|c| c.dim = 0),
    );
    t.add(
        "Performer depth 0",
        Invalid,
        &["`depth` = 0", "positive"],
        perf_new(|c| c.depth = 0),
    );
    t.add(
        "Performer heads 0",
        Invalid,
        &["`heads` = 0", "positive"],
        perf_new(|c| c.heads = 0),
    );
    t.add(
        "Performer dim not divisible by heads",
        Invalid,
        &["`dim` = 15", "divisible by heads = 2"],
        perf_new(|c| c.dim = 15),
    );
    t.add(
        "Performer local heads > heads",
        Invalid,
        &["`local_attn_heads` = 3", "3 local heads exceed heads = 2"],
        perf_new(|c| c.local_attn_heads = LocalAttnHeads::All(3)),
    );
    t.add(
        "Performer local_attn_heads tuple of the wrong length",
        Invalid,
        &["`local_attn_heads` = [1, 0, 1]", "depth = 2 entries"],
        perf_new(|c| c.local_attn_heads = LocalAttnHeads::PerLayer(vec![1, 0, 1])),
    );
    t.add(
        "Performer local_attn_heads empty tuple",
        Invalid,
        &["`local_attn_heads` = []", "depth = 2"],
        perf_new(|c| c.local_attn_heads = LocalAttnHeads::PerLayer(vec![])),
    );
    t.add(
        "Performer nb_features 0",
        Invalid,
        &["`nb_features` = 0", "positive"],
        perf_new(|c| c.nb_features = Some(0)),
    );
    t.add(
        "Performer dim_head 0",
        Invalid,
        &["`dim_head` = 0", "positive"],
        perf_new(|c| c.dim_head = Some(0)),
    );
    t.add(
        "Performer ff_mult 0",
        Invalid,
        &["`ff_mult` = 0"],
        perf_new(|c| c.ff_mult = 0),
    );
    t.add(
        "Performer ff_chunks 0",
        Invalid,
        &["`ff_chunks` = 0"],
        perf_new(|c| c.ff_chunks = 0),
    );
    t.add(
        "Performer local window 0",
        Invalid,
        &["`local_window_size` = 0", "positive"],
        perf_new(|c| {
            c.local_attn_heads = LocalAttnHeads::All(1);
            c.local_window_size = 0;
        }),
    );
    t.add(
        "Performer attn_dropout 1",
        Invalid,
        &["`attn_dropout` = 1", "[0, 1)"],
        perf_new(|c| c.attn_dropout = 1.0),
    );
    t.add(
        "Performer ff_dropout NaN",
        Invalid,
        &["`ff_dropout` = NaN", "[0, 1)"],
        perf_new(|c| c.ff_dropout = f32::NAN),
    );
    t.add(
        "Performer ff_dropout negative",
        Invalid,
        &["`ff_dropout` = -0.5", "[0, 1)"],
        perf_new(|c| c.ff_dropout = -0.5),
    );
    t.add(
        "Performer scalenorm and rezero",
        Invalid,
        &["`use_rezero` = true", "exclude each other"],
        perf_new(|c| {
            c.use_scalenorm = true;
            c.use_rezero = true;
        }),
    );
    t.add(
        "Performer local heads with odd dim_head",
        Invalid,
        &["`dim_head` = 7", "even"],
        perf_new(|c| {
            c.dim_head = Some(7);
            c.local_attn_heads = LocalAttnHeads::All(1);
        }),
    );
    t.add(
        "Performer dim_head 1 gives 0 default features",
        Invalid,
        &["`nb_features` = 0", "dim_heads 1"],
        perf_new(|c| {
            c.dim_head = Some(1);
            c.nb_features = None;
        }),
    );
    t.add(
        "Performer dim too large to allocate",
        Invalid,
        &["`dim` = 4611686018427387904", "isize::MAX"],
        perf_new(|c| c.dim = 1 << 62),
    );
    t.add(
        "Performer depth too large to allocate",
        Invalid,
        &["`depth` = 18446744073709551615", "isize::MAX"],
        perf_new(|c| c.depth = usize::MAX),
    );
    t.add(
        "Performer nb_features too large",
        Invalid,
        &["`nb_features` = 4611686018427387904", "isize::MAX"],
        perf_new(|c| c.nb_features = Some(1 << 62)),
    );
    t.add(
        "Performer ff_mult too large",
        Invalid,
        &["`ff_mult` = 1152921504606846976", "isize::MAX"],
        perf_new(|c| c.ff_mult = 1 << 60),
    );

    let lm_new = |f: fn(&mut PerformerLMConfig)| {
        move || {
            let mut c = lm_cfg(true);
            f(&mut c);
            PerformerLM::new(c)
        }
    };
    t.add(
        "PerformerLM num_tokens 0",
        Invalid,
        &["`num_tokens` = 0"],
        lm_new(|c| c.num_tokens = 0),
    );
    t.add(
        "PerformerLM max_seq_len 0",
        Invalid,
        &["`max_seq_len` = 0"],
        lm_new(|c| c.max_seq_len = 0),
    );
    t.add(
        "PerformerLM dim_head 0",
        Invalid,
        &["`dim_head` = 0"],
        lm_new(|c| c.dim_head = 0),
    );
    t.add(
        "PerformerLM heads 0",
        Invalid,
        &["`heads` = 0"],
        lm_new(|c| c.heads = 0),
    );
    t.add(
        "PerformerLM depth 0",
        Invalid,
        &["`depth` = 0"],
        lm_new(|c| c.depth = 0),
    );
    t.add(
        "PerformerLM emb_dropout 1",
        Invalid,
        &["`emb_dropout` = 1", "[0, 1)"],
        lm_new(|c| c.emb_dropout = 1.0),
    );
    t.add(
        "PerformerLM odd dim with rotary",
        Invalid,
        &["`dim` = 15", "even dim"],
        lm_new(|c| c.dim = 15),
    );
    t.add(
        "PerformerLM dim not divisible by heads",
        Invalid,
        &["`dim` = 18", "divisible by heads = 4"],
        lm_new(|c| {
            c.dim = 18;
            c.heads = 4;
        }),
    );
    t.add(
        "PerformerLM odd dim_head with rotary",
        Invalid,
        &["`dim_head` = 7", "even dim_head"],
        lm_new(|c| c.dim_head = 7),
    );
    t.add(
        "PerformerLM axial shape does not cover max_seq_len",
        Invalid,
        &[
            "`axial_position_shape` = [2, 8]",
            "max_seq_len = 32",
            "covers 16",
        ],
        lm_new(|c| {
            c.rotary_position_emb = false;
            c.axial_position_emb = true;
            c.axial_position_shape = Some(vec![2, 8]);
        }),
    );
    t.add(
        "PerformerLM axial shape empty",
        Invalid,
        &["`axial_position_shape` = []", "max_seq_len = 32"],
        lm_new(|c| {
            c.rotary_position_emb = false;
            c.axial_position_emb = true;
            c.axial_position_shape = Some(vec![]);
        }),
    );
    t.add(
        "PerformerLM axial shape with a 0 axis",
        Invalid,
        &["`axial_position_shape` = [0, 64]"],
        lm_new(|c| {
            c.rotary_position_emb = false;
            c.axial_position_emb = true;
            c.axial_position_shape = Some(vec![0, 64]);
        }),
    );
    t.add(
        "PerformerLM axial shape whose product overflows",
        Invalid,
        &[
            "`axial_position_shape` = [1099511627776, 1099511627776]",
            "isize::MAX",
        ],
        lm_new(|c| {
            c.rotary_position_emb = false;
            c.axial_position_emb = true;
            c.axial_position_shape = Some(vec![1 << 40, 1 << 40]);
        }),
    );
    t.add(
        "PerformerLM num_tokens too large to allocate",
        Invalid,
        &["`num_tokens` = 18446744073709551615", "isize::MAX"],
        lm_new(|c| c.num_tokens = usize::MAX),
    );
    t.add(
        "PerformerLM max_seq_len too large to allocate",
        Invalid,
        &["`max_seq_len` = 9223372036854775807", "isize::MAX"],
        lm_new(|c| c.max_seq_len = usize::MAX / 2),
    );
    t.add(
        "PerformerLM token embedding of the wrong shape",
        Shape,
        &["token embedding [10, 16]", "(num_tokens, dim) = (20, 16)"],
        || PerformerLM::with_token_embedding(lm_cfg(true), Embedding::new(10, 16)),
    );

    let enc_dec_new = |f: fn(&mut PerformerEncDecConfig)| {
        move || {
            let mut c = PerformerEncDecConfig {
                dim: 16,
                enc: lm_cfg(false),
                dec: lm_cfg(true),
                ..Default::default()
            };
            f(&mut c);
            PerformerEncDec::new(c)
        }
    };
    t.add(
        "PerformerEncDec tied embeddings of different vocabularies",
        Invalid,
        &[
            "`tie_token_embeds` = true",
            "enc_num_tokens (20)",
            "dec_num_tokens (30)",
        ],
        enc_dec_new(|c| {
            c.tie_token_embeds = true;
            c.dec.num_tokens = 30;
        }),
    );
    t.add(
        "PerformerEncDec encoder heads 0",
        Invalid,
        &["`heads` = 0"],
        enc_dec_new(|c| c.enc.heads = 0),
    );
    t.add(
        "PerformerEncDec odd dim",
        Invalid,
        &["`dim` = 15"],
        enc_dec_new(|c| c.dim = 15),
    );
    t.add(
        "PerformerEncDec decoder local heads > heads",
        Invalid,
        &["`local_attn_heads`", "exceed heads = 2"],
        enc_dec_new(|c| c.dec.local_attn_heads = LocalAttnHeads::All(3)),
    );

    let sa_new = |f: fn(&mut AttentionConfig)| {
        move || {
            let mut c = attn_cfg();
            f(&mut c);
            SelfAttention::new(c)
        }
    };
    t.add(
        "SelfAttention heads 0",
        Invalid,
        &["`heads` = 0"],
        sa_new(|c| c.heads = 0),
    );
    t.add(
        "SelfAttention dim not divisible by heads",
        Invalid,
        &["`dim` = 15", "multiple of heads (2)"],
        sa_new(|c| c.dim = 15),
    );
    t.add(
        "SelfAttention local heads > heads",
        Invalid,
        &["`local_heads` = 3", "at most heads (2)"],
        sa_new(|c| c.local_heads = 3),
    );
    t.add(
        "SelfAttention dropout 1",
        Invalid,
        &["`dropout` = 1", "[0, 1)"],
        sa_new(|c| c.dropout = 1.0),
    );
    t.add(
        "SelfAttention dim_head 0",
        Invalid,
        &["`dim_head` = 0"],
        sa_new(|c| c.dim_head = Some(0)),
    );
    t.add(
        "SelfAttention nb_features 0",
        Invalid,
        &["`nb_features` = 0"],
        sa_new(|c| c.nb_features = Some(0)),
    );
    t.add(
        "SelfAttention local window 0",
        Invalid,
        &["`local_window_size` = 0"],
        sa_new(|c| c.local_window_size = 0),
    );
    t.add(
        "SelfAttention local heads with odd dim_head",
        Invalid,
        &["`dim_head` = 7", "even"],
        sa_new(|c| c.dim_head = Some(7)),
    );
    t.add(
        "CrossAttention with local heads",
        Invalid,
        &["`local_heads` = 1", "not compatible with cross attention"],
        || CrossAttention::new(attn_cfg()),
    );
    t.add("CrossAttention dim 0", Invalid, &["`dim` = 0"], || {
        CrossAttention::new(AttentionConfig {
            local_heads: 0,
            ..AttentionConfig::new(0)
        })
    });
    t.add(
        "FastAttention dim_heads 0",
        Invalid,
        &["`dim_heads` = 0"],
        || FastAttention::new(FastAttentionConfig::new(0)),
    );
    t.add(
        "FastAttention nb_features 0",
        Invalid,
        &["`nb_features` = 0"],
        || {
            FastAttention::new(FastAttentionConfig {
                nb_features: Some(0),
                ..FastAttentionConfig::new(8)
            })
        },
    );
    t.add(
        "FastAttention dim_heads 1 gives 0 default features",
        Invalid,
        &["`nb_features` = 0", "dim_heads 1 gives int(d ln d) = 0"],
        || FastAttention::new(FastAttentionConfig::new(1)),
    );
    t.add(
        "FastAttention chunk size 0",
        Invalid,
        &["`chunk` = 0"],
        || FastAttention::new(fa_cfg(false))?.set_chunk_size(0),
    );
    t.add(
        "LocalAttention window 0",
        Invalid,
        &["`local_window_size` = 0", "positive"],
        || LocalAttention::new(0, false, 0.0, 8),
    );
    t.add(
        "LocalAttention odd dim_head",
        Invalid,
        &["`dim_head` = 7", "even"],
        || LocalAttention::new(4, false, 0.0, 7),
    );
    t.add(
        "LocalAttention dim_head 0",
        Invalid,
        &["`dim_head` = 0"],
        || LocalAttention::new(4, true, 0.0, 0),
    );
    t.add(
        "LocalAttention dropout 1.5",
        Invalid,
        &["`dropout` = 1.5", "[0, 1)"],
        || LocalAttention::new(4, false, 1.5, 8),
    );
    t.add(
        "LocalAttention dropout NaN",
        Invalid,
        &["`dropout` = NaN"],
        || LocalAttention::new(4, false, f32::NAN, 8),
    );

    // ---------------------------------------------------------------- forwards
    t.group("forwards");
    t.add(
        "PerformerLM empty batch",
        Invalid,
        &["`x` = shape [0, 5]", "at least one"],
        || lm.forward(&toks(0, 5).view(), &LmInputs::default()),
    );
    t.add(
        "PerformerLM empty sequence",
        Invalid,
        &["`x` = shape [1, 0]", "at least one"],
        || lm.forward(&toks(1, 0).view(), &LmInputs::default()),
    );
    t.add(
        "PerformerLM sequence longer than max_seq_len",
        Invalid,
        &["`sequence length` = 33", "max_seq_len = 32"],
        || lm.forward(&toks(1, 33).view(), &LmInputs::default()),
    );
    t.add(
        "PerformerLM token id = num_tokens",
        Index,
        &["token ids", "index 20", "size 20"],
        || lm.forward(&array![[1i64, 20]].view(), &LmInputs::default()),
    );
    t.add(
        "PerformerLM negative token id",
        Index,
        &["token ids", "index -1"],
        || lm.forward(&array![[-1i64, 2]].view(), &LmInputs::default()),
    );
    t.add(
        "PerformerLM token id i64::MAX",
        Index,
        &["index 9223372036854775807"],
        || lm.forward(&array![[i64::MAX]].view(), &LmInputs::default()),
    );
    t.add(
        "PerformerLM mask of the wrong shape",
        Shape,
        &["mask [1, 4]", "(1, 5)"],
        || {
            let m = bools(1, 4);
            lm.forward(
                &toks(1, 5).view(),
                &LmInputs {
                    mask: Some(m.view()),
                    ..Default::default()
                },
            )
        },
    );
    t.add(
        "PerformerLM context without cross-attention",
        Invalid,
        &["`context` = given", "cross_attend = false"],
        || {
            lm.forward(
                &toks(1, 5).view(),
                &LmInputs {
                    context: Some(&ctx),
                    ..Default::default()
                },
            )
        },
    );
    t.add(
        "PerformerLM cross-attention without context",
        Invalid,
        &["`context` = None", "needs a context"],
        || dec.forward(&toks(1, 5).view(), &LmInputs::default()),
    );
    let dec_ctx = |c: Tensor, cm: Option<Array2<bool>>| {
        let dec = &dec;
        move || {
            dec.forward(
                &toks(1, 5).view(),
                &LmInputs {
                    context: Some(&c),
                    context_mask: cm.as_ref().map(|m| m.view()),
                    ..Default::default()
                },
            )
        }
    };
    t.add(
        "PerformerLM context of the wrong width",
        Shape,
        &["context [1, 7, 15]", "dim = 16"],
        dec_ctx(Tensor::randn(&[1, 7, 15]), None),
    );
    t.add(
        "PerformerLM context of another batch",
        Shape,
        &["context [2, 7, 16]", "b = 1"],
        dec_ctx(Tensor::randn(&[2, 7, 16]), None),
    );
    t.add(
        "PerformerLM context of rank 2",
        Shape,
        &["context [7, 16]"],
        dec_ctx(Tensor::randn(&[7, 16]), None),
    );
    t.add(
        "PerformerLM empty context",
        Invalid,
        &["`context` = shape [1, 0, 16]", "at least one position"],
        dec_ctx(Tensor::randn(&[1, 0, 16]), None),
    );
    t.add(
        "PerformerLM context_mask of the wrong shape",
        Shape,
        &["context_mask [1, 6]", "(1, 7)"],
        dec_ctx(Tensor::randn(&[1, 7, 16]), Some(bools(1, 6))),
    );

    t.add(
        "Performer x of rank 2",
        Shape,
        &["x [5, 16]", "dim = 16"],
        || perf.forward(&Tensor::randn(&[5, 16]), None, None, None, None),
    );
    t.add(
        "Performer x of the wrong width",
        Shape,
        &["x [1, 5, 15]", "dim = 16"],
        || perf.forward(&Tensor::randn(&[1, 5, 15]), None, None, None, None),
    );
    t.add(
        "Performer empty sequence",
        Invalid,
        &["`x` = shape [1, 0, 16]"],
        || perf.forward(&Tensor::randn(&[1, 0, 16]), None, None, None, None),
    );
    t.add(
        "Performer empty batch",
        Invalid,
        &["`x` = shape [0, 5, 16]"],
        || perf.forward(&Tensor::randn(&[0, 5, 16]), None, None, None, None),
    );
    t.add(
        "Performer mask of the wrong shape",
        Shape,
        &["mask [1, 4]", "(1, 5)"],
        || perf.forward(&x, Some(bools(1, 4).view()), None, None, None),
    );
    t.add(
        "Performer cross-attention without context",
        Invalid,
        &["`context` = None", "cross_attend needs a context"],
        || perf_x.forward(&x, None, None, None, None),
    );
    t.add(
        "Performer context without cross-attention",
        Invalid,
        &["`context` = given", "cross_attend = false"],
        || perf.forward(&x, None, None, Some(&ctx), None),
    );
    t.add(
        "Performer context of the wrong width",
        Shape,
        &["context [1, 7, 8]", "dim = 16"],
        || perf_x.forward(&x, None, None, Some(&Tensor::randn(&[1, 7, 8])), None),
    );
    t.add(
        "Performer context_mask of the wrong shape",
        Shape,
        &["context_mask [1, 3]", "(1, 7)"],
        || perf_x.forward(&x, None, None, Some(&ctx), Some(bools(1, 3).view())),
    );
    t.add(
        "Performer rotary table of the wrong shape",
        Shape,
        &["pos_emb [1, 5, 6]", "(1, n, dim_head) = (1, 5, 8)"],
        || perf.forward(&x, None, Some(&Tensor::randn(&[1, 5, 6])), None, None),
    );

    t.add(
        "SelfAttention given a context",
        Invalid,
        &["`context` = given", "should not receive context"],
        || {
            sa.forward(
                &x,
                &BlockInputs {
                    context: Some(&ctx),
                    ..Default::default()
                },
            )
        },
    );
    t.add(
        "SelfAttention x of the wrong width",
        Shape,
        &["dim = 16", "[1, 5, 15]"],
        || sa.forward(&Tensor::randn(&[1, 5, 15]), &BlockInputs::none()),
    );
    t.add(
        "SelfAttention x of rank 2",
        Shape,
        &["dim = 16", "[5, 16]"],
        || sa.forward(&Tensor::randn(&[5, 16]), &BlockInputs::none()),
    );
    t.add(
        "SelfAttention mask of the wrong shape",
        Shape,
        &["mask [1, 4]", "(1, 5)"],
        || {
            let m = bools(1, 4);
            sa.forward(
                &x,
                &BlockInputs {
                    mask: Some(m.view()),
                    ..Default::default()
                },
            )
        },
    );
    t.add(
        "SelfAttention empty sequence",
        Invalid,
        &["`x` = shape [1, 0, 16]"],
        || sa.forward(&Tensor::randn(&[1, 0, 16]), &BlockInputs::none()),
    );
    t.add(
        "CrossAttention without context",
        Invalid,
        &["`context` = None", "should receive context"],
        || ca.forward(&x, &BlockInputs::none()),
    );
    let ca_ctx = |c: Tensor, cm: Option<Array2<bool>>| {
        let (ca, x) = (&ca, &x);
        move || {
            ca.forward(
                x,
                &BlockInputs {
                    context: Some(&c),
                    context_mask: cm.as_ref().map(|m| m.view()),
                    ..Default::default()
                },
            )
        }
    };
    t.add(
        "CrossAttention context of the wrong width",
        Shape,
        &["context must be (b = 1, nc, dim = 16)", "[1, 7, 15]"],
        ca_ctx(Tensor::randn(&[1, 7, 15]), None),
    );
    t.add(
        "CrossAttention context of another batch",
        Shape,
        &["b = 1", "[2, 7, 16]"],
        ca_ctx(Tensor::randn(&[2, 7, 16]), None),
    );
    t.add(
        "CrossAttention context_mask of the wrong shape",
        Shape,
        &["context_mask [1, 6]", "(1, 7)"],
        ca_ctx(Tensor::randn(&[1, 7, 16]), Some(bools(1, 6))),
    );
    t.add(
        "CrossAttention empty context",
        Invalid,
        &["`context` = shape [1, 0, 16]", "at least one position"],
        ca_ctx(Tensor::randn(&[1, 0, 16]), None),
    );

    t.add(
        "FastAttention q of the wrong head size",
        Shape,
        &["`q` [1, 2, 5, 7]", "dim_heads = 8"],
        || {
            let (q, k, v) = qkv(&[1, 2, 5, 7], &[1, 2, 5, 8], &[1, 2, 5, 8]);
            fa.forward(&q, &k, &v)
        },
    );
    t.add(
        "FastAttention q of rank 1",
        Shape,
        &["`q` [8]", "(..., n, dim_heads = 8)"],
        || {
            let (q, k, v) = qkv(&[8], &[1, 2, 5, 8], &[1, 2, 5, 8]);
            fa.forward(&q, &k, &v)
        },
    );
    t.add(
        "FastAttention keys and values of different lengths",
        Shape,
        &["k [1, 2, 6, 8]", "v [1, 2, 5, 8]", "k and v of one length"],
        || {
            let (q, k, v) = qkv(&[1, 2, 5, 8], &[1, 2, 6, 8], &[1, 2, 5, 8]);
            fa.forward(&q, &k, &v)
        },
    );
    t.add(
        "FastAttention causal with fewer keys than queries",
        Shape,
        &["k [1, 2, 4, 8]", "(causal) q and k of one length"],
        || {
            let (q, k, v) = qkv(&[1, 2, 5, 8], &[1, 2, 4, 8], &[1, 2, 4, 8]);
            fac.forward(&q, &k, &v)
        },
    );
    t.add(
        "FastAttention q and k of different heads",
        Shape,
        &["q [1, 2, 5, 8]", "k [1, 3, 5, 8]", "equal leading axes"],
        || {
            let (q, k, v) = qkv(&[1, 2, 5, 8], &[1, 3, 5, 8], &[1, 3, 5, 8]);
            fa.forward(&q, &k, &v)
        },
    );
    t.add(
        "FastAttention no queries",
        Invalid,
        &["`q` = shape [1, 2, 0, 8]", "at least one"],
        || {
            let (q, k, v) = qkv(&[1, 2, 0, 8], &[1, 2, 5, 8], &[1, 2, 5, 8]);
            fa.forward(&q, &k, &v)
        },
    );
    t.add(
        "FastAttention no keys",
        Invalid,
        &["`k` = shape [1, 2, 0, 8]"],
        || {
            let (q, k, v) = qkv(&[1, 2, 5, 8], &[1, 2, 0, 8], &[1, 2, 0, 8]);
            fa.forward(&q, &k, &v)
        },
    );
    t.add(
        "FastAttention no heads",
        Invalid,
        &["`q` = shape [1, 0, 5, 8]"],
        || {
            let (q, k, v) = qkv(&[1, 0, 5, 8], &[1, 0, 5, 8], &[1, 0, 5, 8]);
            fac.forward(&q, &k, &v)
        },
    );
    t.add(
        "LocalAttention q, k, v of different shapes",
        Shape,
        &["must have one shape"],
        || {
            let (q, k, v) = qkv(&[1, 1, 5, 8], &[1, 1, 6, 8], &[1, 1, 5, 8]);
            la.forward(&q, &k, &v, None)
        },
    );
    t.add(
        "LocalAttention mask of the wrong shape",
        Shape,
        &["mask [1, 4]", "(1, 5)"],
        || {
            let (q, k, v) = qkv(&[1, 1, 5, 8], &[1, 1, 5, 8], &[1, 1, 5, 8]);
            la.forward(&q, &k, &v, Some(bools(1, 4).view()))
        },
    );
    t.add(
        "LocalAttention wrong head size",
        Shape,
        &["head size 6", "size 8"],
        || {
            let (q, k, v) = qkv(&[1, 1, 5, 6], &[1, 1, 5, 6], &[1, 1, 5, 6]);
            la.forward(&q, &k, &v, None)
        },
    );
    t.add(
        "LocalAttention q of rank 1",
        Shape,
        &["`q` must be (..., n, d)", "[8]"],
        || {
            let (q, k, v) = qkv(&[8], &[8], &[8]);
            la.forward(&q, &k, &v, None)
        },
    );
    t.add(
        "LocalAttention empty sequence",
        Invalid,
        &["`q` = shape [1, 1, 0, 8]"],
        || {
            let (q, k, v) = qkv(&[1, 1, 0, 8], &[1, 1, 0, 8], &[1, 1, 0, 8]);
            la.forward(&q, &k, &v, None)
        },
    );

    // ---------------------------------------------------------------- loss, generate, decode
    t.group("loss/generate/decode");
    t.add(
        "loss of a single token",
        Invalid,
        &["`sequence length` = 1", "at least 2"],
        || ar.loss(&toks(1, 1).view(), &SeqInputs::default()),
    );
    t.add(
        "loss of an empty batch",
        Invalid,
        &["`x` = shape [0, 4]"],
        || ar.loss(&toks(0, 5).view(), &SeqInputs::default()),
    );
    t.add(
        "loss with a target id >= num_tokens",
        Index,
        &["target token ids", "index 25", "size 20"],
        || ar.loss(&array![[1i64, 2, 3, 25]].view(), &SeqInputs::default()),
    );
    t.add(
        "loss with a negative input id",
        Index,
        &["token ids", "index -3"],
        || ar.loss(&array![[1i64, -3, 3, 4]].view(), &SeqInputs::default()),
    );
    t.add(
        "loss with a mask of the wrong shape",
        Shape,
        &["mask [1, 3]", "(1, 4)"],
        || {
            let m = bools(1, 3);
            ar.loss(
                &toks(1, 5).view(),
                &SeqInputs {
                    mask: Some(m.view()),
                    ..Default::default()
                },
            )
        },
    );
    t.add(
        "loss of a sequence longer than max_seq_len + 1",
        Invalid,
        &["`sequence length` = 33", "max_seq_len = 32"],
        || ar.loss(&toks(1, 34).view(), &SeqInputs::default()),
    );
    let generate = |start: Array2<i64>, opts: GenerateOptions| {
        let ar = &ar;
        move || ar.generate(&start.view(), 4, &opts, &SeqInputs::default())
    };
    t.add(
        "generate from an empty prompt",
        Invalid,
        &["`start_tokens` = shape [1, 0]", "at least one token"],
        generate(toks(1, 0), GenerateOptions::default()),
    );
    t.add(
        "generate for an empty batch",
        Invalid,
        &["`start_tokens` = shape [0, 3]"],
        generate(toks(0, 3), GenerateOptions::default()),
    );
    t.add(
        "generate at temperature 0",
        Invalid,
        &["`temperature` = 0", "positive and finite"],
        generate(
            toks(1, 3),
            GenerateOptions {
                temperature: 0.0,
                ..Default::default()
            },
        ),
    );
    t.add(
        "generate at temperature NaN",
        Invalid,
        &["`temperature` = NaN"],
        generate(
            toks(1, 3),
            GenerateOptions {
                temperature: f32::NAN,
                ..Default::default()
            },
        ),
    );
    t.add(
        "generate with a filter threshold above 1",
        Invalid,
        &["`filter_thres` = 1.5", "[0, 1]"],
        generate(
            toks(1, 3),
            GenerateOptions {
                filter: Filter::TopP { thres: 1.5 },
                ..Default::default()
            },
        ),
    );
    t.add(
        "generate with repetition penalty 0",
        Invalid,
        &["`repetition_penalty` = 0", "positive"],
        generate(
            toks(1, 3),
            GenerateOptions {
                repetition_penalty: 0.0,
                ..Default::default()
            },
        ),
    );
    t.add(
        "generate from a prompt with id >= num_tokens",
        Index,
        &["index 20", "size 20"],
        generate(array![[1i64, 20]], GenerateOptions::default()),
    );
    t.add(
        "generate with a mask of the wrong shape",
        Shape,
        &["mask [1, 2]", "(1, 3)"],
        || {
            let m = bools(1, 2);
            ar.generate(
                &toks(1, 3).view(),
                4,
                &gen_opts,
                &SeqInputs {
                    mask: Some(m.view()),
                    ..Default::default()
                },
            )
        },
    );
    t.add(
        "generate from a decoder without context",
        Invalid,
        &["`context` = None"],
        || ar_dec.generate(&toks(1, 3).view(), 4, &gen_opts, &SeqInputs::default()),
    );
    t.add(
        "generate from a decoder with a context of the wrong width",
        Shape,
        &["context [1, 7, 15]", "dim = 16"],
        || {
            let c = Tensor::randn(&[1, 7, 15]);
            ar_dec.generate(
                &toks(1, 3).view(),
                4,
                &gen_opts,
                &SeqInputs {
                    context: Some(&c),
                    ..Default::default()
                },
            )
        },
    );
    t.add(
        "decoding state of a non-causal model",
        Invalid,
        &["`causal` = false", "only causal models"],
        || lm_nc.decoding_state(1, None, None),
    );
    t.add(
        "decoding state for 0 sequences",
        Invalid,
        &["`batch` = 0", "positive"],
        || lm.decoding_state(0, None, None),
    );
    t.add(
        "decode another batch size",
        Shape,
        &["2 sequences for a state of 1"],
        || {
            let mut st = lm.decoding_state(1, None, None)?;
            lm.decode(&mut st, &toks(2, 3).view(), None)
        },
    );
    t.add(
        "decode past max_seq_len",
        Invalid,
        &["`position` = 33", "max_seq_len = 32"],
        || {
            let mut st = lm.decoding_state(1, None, None)?;
            lm.decode(&mut st, &toks(1, 32).view(), None)?;
            lm.step(&mut st, &[1])
        },
    );
    t.add(
        "decode two positions after the prompt",
        Invalid,
        &["`positions` = 2", "one position at a time"],
        || {
            let mut st = lm.decoding_state(1, None, None)?;
            lm.decode(&mut st, &toks(1, 3).view(), None)?;
            lm.decode(&mut st, &toks(1, 2).view(), None)
        },
    );
    t.add(
        "step with a token id >= num_tokens",
        Index,
        &["index 21", "size 20"],
        || {
            let mut st = lm.decoding_state(1, None, None)?;
            lm.decode(&mut st, &toks(1, 3).view(), None)?;
            lm.step(&mut st, &[21])
        },
    );
    t.add(
        "decode an empty prompt",
        Invalid,
        &["`x` = shape [1, 0]"],
        || {
            let mut st = lm.decoding_state(1, None, None)?;
            lm.decode(&mut st, &toks(1, 0).view(), None)
        },
    );
    t.add(
        "step with no tokens",
        Shape,
        &["0 sequences for a state of 1"],
        || {
            let mut st = lm.decoding_state(1, None, None)?;
            lm.step(&mut st, &[])
        },
    );
    t.add(
        "decode with a mask of the wrong shape",
        Shape,
        &["mask [1, 2]", "(1, 3)"],
        || {
            let mut st = lm.decoding_state(1, None, None)?;
            let m = bools(1, 2);
            lm.decode(&mut st, &toks(1, 3).view(), Some(m.view()))
        },
    );
    t.add(
        "decode a decoder without context",
        Invalid,
        &["`context` = None"],
        || {
            let mut st = dec.decoding_state(1, None, None)?;
            dec.decode(&mut st, &toks(1, 3).view(), None)
        },
    );
    t.add(
        "decode a decoder with a context of the wrong width",
        Shape,
        &["context [1, 7, 15]", "dim = 16"],
        || {
            let c = Tensor::randn(&[1, 7, 15]);
            let mut st = dec.decoding_state(1, Some(&c), None)?;
            dec.decode(&mut st, &toks(1, 3).view(), None)
        },
    );

    t.add(
        "encoder-decoder loss with a source id >= num_tokens",
        Index,
        &["token ids", "index 20", "size 20"],
        || {
            enc_dec.loss(
                &array![[1i64, 20, 3]].view(),
                &toks(1, 4).view(),
                None,
                None,
            )
        },
    );
    t.add(
        "encoder-decoder loss of a one-token target",
        Invalid,
        &["`sequence length` = 1", "at least 2"],
        || enc_dec.loss(&toks(1, 4).view(), &toks(1, 1).view(), None, None),
    );
    t.add(
        "encoder-decoder loss with an encoder mask of the wrong shape",
        Shape,
        &["mask [1, 3]", "(1, 4)"],
        || {
            let m = bools(1, 3);
            enc_dec.loss(&toks(1, 4).view(), &toks(1, 5).view(), Some(m.view()), None)
        },
    );
    t.add(
        "encoder-decoder loss of sources and targets of different batches",
        Shape,
        &["context [2, 4, 16]", "b = 1"],
        || enc_dec.loss(&toks(2, 4).view(), &toks(1, 5).view(), None, None),
    );
    t.add(
        "encoder-decoder generation from an empty source",
        Invalid,
        &["`x` = shape [1, 0]"],
        || enc_dec.generate(&toks(1, 0).view(), &toks(1, 1).view(), 3, None, &gen_opts),
    );

    // ---------------------------------------------------------------- config JSON
    t.group("config JSON");
    let parse = |v: Value| move || ModelConfig::from_json(&v);
    t.add(
        "config that is not an object",
        Invalid,
        &["`config` = [1,2]", "must be an object"],
        parse(json!([1, 2])),
    );
    t.add(
        "config without a class",
        Invalid,
        &["`model` = missing"],
        parse(json!({"kwargs": {}})),
    );
    t.add(
        "config with a numeric class",
        Invalid,
        &["`model` = 3", "class name"],
        parse(json!({"model": 3})),
    );
    t.add(
        "config with an unknown class",
        Invalid,
        &[
            "`model` = Transformer",
            "expected Performer, PerformerLM or PerformerEncDec",
        ],
        parse(json!({"model": "Transformer", "kwargs": {}})),
    );
    t.add(
        "config with a class name in the wrong case",
        Invalid,
        &["`model` = performerlm"],
        parse(json!({"model": "performerlm", "kwargs": {}})),
    );
    t.add(
        "config with an unknown top-level key",
        Invalid,
        &["`weights` = \"x.bin\"", "unknown key"],
        {
            let mut v = lm_json(json!({}));
            v["weights"] = json!("x.bin");
            parse(v)
        },
    );
    t.add(
        "config with an unknown keyword",
        Invalid,
        &["unknown field `dimm`"],
        parse(lm_json(json!({"dimm": 3}))),
    );
    t.add(
        "config with a string for an integer",
        Invalid,
        &["`num_tokens` = \"ten\"", "expected usize"],
        parse(lm_json(json!({"num_tokens": "ten"}))),
    );
    t.add(
        "config with a negative size",
        Invalid,
        &["`dim` = -4", "expected usize"],
        parse(lm_json(json!({"dim": -4}))),
    );
    t.add(
        "config with a fractional depth",
        Invalid,
        &["`depth` = 2.5"],
        parse(lm_json(json!({"depth": 2.5}))),
    );
    t.add(
        "config with an integer beyond usize",
        Invalid,
        &["`num_tokens` = 1e+30"],
        parse(lm_json(json!({"num_tokens": 1e30}))),
    );
    t.add(
        "config with null for a required size",
        Invalid,
        &["`heads` = null"],
        parse(json!({"model": "Performer", "kwargs": {"dim": 16, "depth": 1, "heads": null}})),
    );
    t.add(
        "config without a required keyword",
        Invalid,
        &["missing field `num_tokens`"],
        parse(json!({"model": "PerformerLM", "kwargs": {"max_seq_len": 8, "dim": 16, "depth": 1, "heads": 2}})),
    );
    t.add(
        "config with an unknown kernel",
        Invalid,
        &["`kernel_fn` = \"nope\"", "relu"],
        parse(lm_json(json!({"kernel_fn": "nope"}))),
    );
    t.add(
        "config with a string for local_attn_heads",
        Invalid,
        &["`local_attn_heads` = \"two\""],
        parse(lm_json(json!({"local_attn_heads": "two"}))),
    );
    t.add(
        "config with a negative redraw interval",
        Invalid,
        &["`feature_redraw_interval` = -1"],
        parse(lm_json(json!({"feature_redraw_interval": -1}))),
    );
    t.add(
        "config whose kwargs are a list",
        Invalid,
        &["`kwargs` = [1,2]", "must be an object"],
        parse(json!({"model": "PerformerLM", "kwargs": [1, 2]})),
    );
    t.add(
        "encoder-decoder config whose kwargs are a number",
        Invalid,
        &["`kwargs` = 3", "must be an object"],
        parse(json!({"model": "PerformerEncDec", "kwargs": 3})),
    );
    t.add(
        "encoder-decoder config without dim",
        Invalid,
        &["`dim` = missing", "dim is required"],
        parse(json!({"model": "PerformerEncDec", "kwargs": {"enc_num_tokens": 3}})),
    );
    t.add(
        "encoder-decoder config with an unprefixed keyword",
        Invalid,
        &["`depth` = given", "enc_ / dec_ prefixes"],
        parse(enc_dec_json(json!({"depth": 2}))),
    );
    t.add(
        "encoder-decoder config with enc_dim",
        Invalid,
        &["`enc_dim` = given", "set dim once"],
        parse(enc_dec_json(json!({"enc_dim": 8}))),
    );
    t.add(
        "encoder-decoder config with a mistyped encoder keyword",
        Invalid,
        &["`enc_num_tokens` = \"x\"", "expected usize"],
        parse(enc_dec_json(json!({"enc_num_tokens": "x"}))),
    );
    t.add(
        "encoder-decoder config with a mistyped ignore_index",
        Invalid,
        &["`ignore_index` = \"a\"", "expected i64"],
        parse(enc_dec_json(json!({"ignore_index": "a"}))),
    );
    t.add(
        "encoder-decoder config without a decoder keyword",
        Invalid,
        &["`dec_*`", "missing field `num_tokens`"],
        parse(json!({"model": "PerformerEncDec", "kwargs": {"dim": 16, "enc_num_tokens": 20, "enc_max_seq_len": 8, "enc_depth": 1, "enc_heads": 2, "dec_max_seq_len": 8, "dec_depth": 1, "dec_heads": 2}})),
    );
    t.add(
        "config that parses but describes an invalid model",
        Invalid,
        &["`dim` = 16", "divisible by heads = 3"],
        || AnyModel::build(&ModelConfig::from_json(&lm_json(json!({"heads": 3})))?),
    );

    // ---------------------------------------------------------------- run them all
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    let mut per_group: Vec<(&str, usize)> = Vec::new();
    for c in &t.cases {
        match per_group.last_mut() {
            Some((g, n)) if *g == c.group => *n += 1,
            _ => per_group.push((c.group, 1)),
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| (c.run)()));
        let problem = match outcome {
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Some(format!("PANICKED: {msg}"))
            }
            Ok(Ok(())) => Some("accepted".to_string()),
            Ok(Err(e)) => {
                let text = e.to_string();
                let missing: Vec<&&str> =
                    c.needles.iter().filter(|n| !text.contains(**n)).collect();
                if kind_of(&e) != Some(c.kind) {
                    Some(format!("expected {:?}, got {e:?}", c.kind))
                } else if !missing.is_empty() {
                    Some(format!("message `{text}` lacks {missing:?}"))
                } else {
                    None
                }
            }
        };
        if let Some(p) = problem {
            failures.push(format!("[{}] {}: {p}", c.group, c.name));
        }
    }
    std::panic::set_hook(quiet);
    for (g, n) in &per_group {
        println!("{g}: {n} cases");
    }
    println!("total: {} cases", t.cases.len());
    assert!(t.cases.len() >= 40);
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        t.cases.len(),
        failures.join("\n")
    );
}
