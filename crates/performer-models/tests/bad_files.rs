//! Bad files: truncated or corrupt safetensors, headers claiming absurd sizes or offsets,
//! unsupported or wrong dtypes, missing, extra and disagreeing keys, bad config.json files.
//! Each is a clear error, none panics, and parsing a hostile header never allocates more than
//! the file justifies (a counting allocator watches the largest request).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};

use ndarray::{ArrayD, IxDyn};
use performer_models::checkpoint::{
    load_state_dict_file, pytorch_state_dict, save_state_dict_file, strip_aliases, to_state,
};
use performer_models::fuzzing::{fuzz_checkpoint_seed, fuzz_lm_config};
use performer_models::*;
use performer_tensor::io::{
    TensorData, from_safetensors_bytes, load_safetensors, to_safetensors_bytes,
};
use performer_tensor::{Error, Module, StateValue};

/// The global allocator of this test binary: the system's, recording the largest single
/// request made by a thread while it is watched.
struct Watching;

thread_local! {
    static WATCHED: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = WATCHED.try_with(|w| {
        if w.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

// SAFETY: every method forwards to the system allocator with the caller's own arguments, so
// this allocator keeps GlobalAlloc's contract exactly as System does; it only records sizes.
unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        // SAFETY: the caller upholds GlobalAlloc's contract for these arguments.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        // SAFETY: the caller upholds GlobalAlloc's contract for these arguments.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new);
        // SAFETY: the caller upholds GlobalAlloc's contract for these arguments.
        unsafe { System.realloc(p, l, new) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: the caller upholds GlobalAlloc's contract for these arguments.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Watching = Watching;

/// Runs `f` and returns its result with the largest allocation it requested on this thread.
fn watched<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    WATCHED.with(|w| w.set(true));
    let r = f();
    WATCHED.with(|w| w.set(false));
    (r, LARGEST.with(|l| l.get()))
}

/// A safetensors file from a header text and data bytes.
fn raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Parses `bytes` under `catch_unwind` and the allocation watch; the parse must fail with a
/// message containing every needle, and allocate at most a small multiple of the file.
fn refuse(name: &str, bytes: &[u8], needles: &[&str]) -> usize {
    let (r, largest) = watched(|| catch_unwind(AssertUnwindSafe(|| from_safetensors_bytes(bytes))));
    let err = match r {
        Err(_) => panic!("{name}: panicked"),
        Ok(Ok(t)) => panic!("{name}: accepted {} tensors", t.len()),
        Ok(Err(e)) => e,
    };
    let text = err.to_string();
    for n in needles {
        assert!(text.contains(n), "{name}: `{text}` lacks `{n}`");
    }
    // The header is parsed into maps, strings and shape vectors (8 bytes per axis written as
    // 2 bytes, grown by doubling): a small multiple of the file, never what it claims.
    assert!(
        largest <= 16 * bytes.len() + 65536,
        "{name}: allocated {largest} bytes for a {}-byte file",
        bytes.len()
    );
    largest
}

#[test]
fn corrupt_safetensors_are_refused_without_panic_or_large_allocations() {
    let good = fuzz_checkpoint_seed();
    assert!(from_safetensors_bytes(&good).is_ok());
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut cases = 0;
    let mut case = |name: &str, bytes: Vec<u8>, needles: &[&str]| {
        refuse(name, &bytes, needles);
        cases += 1;
    };
    case("empty file", vec![], &["header too small"]);
    case("7 bytes", good[..7].to_vec(), &["header too small"]);
    case(
        "header cut short",
        good[..8 + n / 2].to_vec(),
        &["invalid header length"],
    );
    case(
        "data cut short",
        good[..good.len() - 1].to_vec(),
        &["incomplete metadata"],
    );
    case(
        "data with a byte too many",
        [&good[..], &[0]].concat(),
        &["incomplete metadata"],
    );
    let mut huge_len = good.clone();
    huge_len[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    case("header length u64::MAX", huge_len, &["header too large"]);
    let mut big_len = good.clone();
    big_len[..8].copy_from_slice(&99_999_999u64.to_le_bytes());
    case(
        "header length beyond the file",
        big_len,
        &["invalid header length"],
    );
    case(
        "header not UTF-8",
        [&1u64.to_le_bytes()[..], &[0xff]].concat(),
        &["invalid UTF-8 in header"],
    );
    case(
        "header not JSON",
        raw("{\"a\": ", &[]),
        &["invalid JSON in header"],
    );
    case(
        "header a JSON list",
        raw("[1, 2]", &[]),
        &["invalid JSON in header"],
    );
    case(
        "tensor of 2^40 floats in 16 bytes",
        raw(
            r#"{"a":{"dtype":"F32","shape":[1099511627776],"data_offsets":[0,4398046511104]}}"#,
            &[0; 16],
        ),
        &["incomplete metadata"],
    );
    case(
        "offsets past the end",
        raw(
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            &[0; 8],
        ),
        &["incomplete metadata"],
    );
    case(
        "offsets that do not match the shape",
        raw(
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}"#,
            &[0; 16],
        ),
        &["invalid shape, data type, or offset"],
    );
    case(
        "offsets with a gap",
        raw(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
            &[0; 12],
        ),
        &["invalid offset for tensor `b`"],
    );
    case(
        "overlapping offsets",
        raw(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            &[0; 12],
        ),
        &["invalid offset"],
    );
    case(
        "reversed offsets",
        raw(
            r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}"#,
            &[0; 4],
        ),
        &["invalid offset"],
    );
    case(
        "shape product overflowing usize",
        raw(
            r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}}"#,
            &[],
        ),
        &["overflow"],
    );
    case(
        "empty tensor of an unaddressable shape",
        raw(
            r#"{"a":{"dtype":"F32","shape":[0,1099511627776,1099511627776],"data_offsets":[0,0]}}"#,
            &[],
        ),
        &[
            "tensor `a`",
            "[0, 1099511627776, 1099511627776]",
            "more elements than an array can address",
        ],
    );
    let many_axes = format!(
        r#"{{"a":{{"dtype":"F32","shape":[{}],"data_offsets":[0,4]}}}}"#,
        vec!["1"; 1000].join(",")
    );
    case(
        "1000 axes",
        raw(&many_axes, &[0; 4]),
        &["tensor `a`", "rank 1000", "64 axes"],
    );
    case(
        "unsupported dtype",
        raw(
            r#"{"a":{"dtype":"I16","shape":[2],"data_offsets":[0,4]}}"#,
            &[0; 4],
        ),
        &["tensor `a`", "unsupported dtype I16"],
    );
    case(
        "unknown dtype name",
        raw(
            r#"{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#,
            &[0; 16],
        ),
        &["invalid JSON in header"],
    );
    case(
        "sub-byte dtype",
        raw(
            r#"{"a":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}"#,
            &[0; 1],
        ),
        &["unsupported dtype F4"],
    );
    case(
        "bool holding 2",
        raw(
            r#"{"a":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}}"#,
            &[1, 2],
        ),
        &["tensor `a`", "bytes other than 0 and 1"],
    );
    case(
        "metadata that is not strings",
        raw(r#"{"__metadata__":{"a":1}}"#, &[]),
        &["invalid JSON in header"],
    );
    case(
        "negative shape",
        raw(
            r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            &[0; 4],
        ),
        &["invalid JSON in header"],
    );
    // Corrupt every byte of the header in turn: never a panic.
    let mut refused = 0;
    for i in 8..8 + n {
        for flip in [0x01u8, 0x20, 0x80] {
            let mut b = good.clone();
            b[i] ^= flip;
            let r = catch_unwind(AssertUnwindSafe(|| from_safetensors_bytes(&b)))
                .unwrap_or_else(|_| panic!("byte {i} ^ {flip:#x}: panicked"));
            refused += usize::from(r.is_err());
        }
    }
    assert!(refused > 0);
    println!(
        "{cases} corrupt files refused; {} header bit flips, {refused} refused",
        3 * n
    );
}

#[test]
fn float_encodings_load_and_bad_dtypes_are_named() {
    // float16, bfloat16 and float64 weights load as float32.
    let one = |dtype: &str, bytes: &[u8]| {
        let width = bytes.len() / 2;
        let h = format!(
            r#"{{"w":{{"dtype":"{dtype}","shape":[2],"data_offsets":[0,{}]}}}}"#,
            2 * width
        );
        from_safetensors_bytes(&raw(&h, bytes)).unwrap()["w"].clone()
    };
    let expect = TensorData::F32(ArrayD::from_shape_vec(IxDyn(&[2]), vec![1.0, -2.0]).unwrap());
    assert_eq!(one("F16", &[0x00, 0x3c, 0x00, 0xc0]), expect);
    assert_eq!(one("BF16", &[0x80, 0x3f, 0x00, 0xc0]), expect);
    let f64s: Vec<u8> = [1.0f64, -2.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(one("F64", &f64s), expect);

    performer_tensor::rng::manual_seed(3);
    let lm = PerformerLM::new(fuzz_lm_config()).unwrap();
    let state = pytorch_state_dict(&lm);
    let file = |edit: &dyn Fn(&mut BTreeMap<String, TensorData>)| {
        let mut t: BTreeMap<String, TensorData> = state
            .clone()
            .into_iter()
            .map(|(k, v)| (k, v.into()))
            .collect();
        edit(&mut t);
        to_safetensors_bytes(&t, None).unwrap()
    };
    let load = |bytes: Vec<u8>| -> performer_tensor::Result<()> {
        let state = strip_aliases(to_state(from_safetensors_bytes(&bytes)?)?)?;
        lm.load_state_dict(&state)
    };
    let expect_err = |name: &str, r: performer_tensor::Result<()>, needles: &[&str]| {
        let text = match r {
            Ok(()) => panic!("{name}: accepted"),
            Err(e) => e.to_string(),
        };
        for n in needles {
            assert!(text.contains(n), "{name}: `{text}` lacks `{n}`");
        }
    };
    let w = "token_emb.weight".to_string();
    let counter = "performer.proj_updater.calls_since_last_redraw".to_string();
    assert!(load(file(&|_| {})).is_ok());
    expect_err(
        "parameter stored as int64",
        load(file(&|t| {
            let shape = t[&w].shape().to_vec();
            t.insert(w.clone(), TensorData::I64(ArrayD::zeros(IxDyn(&shape))));
        })),
        &["`token_emb.weight` has the wrong dtype"],
    );
    expect_err(
        "parameter stored as bool",
        load(file(&|t| {
            let shape = t[&w].shape().to_vec();
            t.insert(
                w.clone(),
                TensorData::Bool(ArrayD::from_elem(IxDyn(&shape), false)),
            );
        })),
        &["`token_emb.weight` is a bool tensor"],
    );
    expect_err(
        "int64 counter stored as float",
        load(file(&|t| {
            t.insert(counter.clone(), TensorData::F32(ArrayD::zeros(IxDyn(&[]))));
        })),
        &["`performer.proj_updater.calls_since_last_redraw` has the wrong dtype"],
    );
    expect_err(
        "missing key",
        load(file(&|t| {
            t.remove("norm.bias");
        })),
        &["missing keys: norm.bias"],
    );
    expect_err(
        "extra key",
        load(file(&|t| {
            t.insert(
                "norm.scale".into(),
                TensorData::F32(ArrayD::zeros(IxDyn(&[4]))),
            );
        })),
        &["unexpected keys: norm.scale"],
    );
    expect_err(
        "wrong shape",
        load(file(&|t| {
            t.insert(w.clone(), TensorData::F32(ArrayD::zeros(IxDyn(&[5, 3]))));
        })),
        &["`token_emb.weight` has shape [5, 3] in the file, [5, 4] in the model"],
    );
    let alias = state
        .keys()
        .find(|k| k.contains("proj_updater.instance."))
        .expect("aliases")
        .clone();
    expect_err(
        "alias that disagrees",
        load(file(&|t| {
            let shape = t[&alias].shape().to_vec();
            t.insert(
                alias.clone(),
                TensorData::F32(ArrayD::from_elem(IxDyn(&shape), 7.0)),
            );
        })),
        &["differs from", &alias],
    );
    // An alias alone stands for its original; a NaN weight and its alias still agree.
    let original = alias.replacen("proj_updater.instance.", "net.", 1);
    assert!(
        load(file(&|t| {
            t.remove(&original);
        }))
        .is_ok()
    );
    assert!(
        load(file(&|t| {
            for k in [&original, &alias] {
                let shape = t[k].shape().to_vec();
                t.insert(
                    k.clone(),
                    TensorData::F32(ArrayD::from_elem(IxDyn(&shape), f32::NAN)),
                );
            }
        }))
        .is_ok()
    );
    // A state that loads partly changes nothing: a bad key leaves the model as it was.
    let before = lm.state_dict();
    let _ = load(file(&|t| {
        t.insert(w.clone(), TensorData::F32(ArrayD::zeros(IxDyn(&[5, 4]))));
        t.remove("norm.bias");
    }));
    assert_eq!(
        format!("{:?}", lm.state_dict().keys()),
        format!("{:?}", before.keys())
    );
    let same = lm
        .state_dict()
        .iter()
        .zip(&before)
        .all(|((_, a), (_, b))| match (a, b) {
            (StateValue::F32(x), StateValue::F32(y)) => x
                .iter()
                .zip(y.iter())
                .all(|(p, q)| p.to_bits() == q.to_bits()),
            (x, y) => x == y,
        });
    assert!(same, "a refused state dict changed the model");
}

#[test]
fn bad_checkpoint_directories_name_the_file() {
    let dir = std::env::temp_dir().join(format!("performer-bad-files-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    performer_tensor::rng::manual_seed(4);
    let config = ModelConfig::PerformerLM(fuzz_lm_config());
    let lm = PerformerLM::new(fuzz_lm_config()).unwrap();
    let err = |r: performer_tensor::Result<(ModelConfig, AnyModel)>| match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e,
    };

    // No directory at all.
    let e = err(load_pretrained(dir.join("missing")));
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert!(e.to_string().contains("config.json"), "{e}");

    save_pretrained(&dir, &lm, &config).unwrap();
    assert!(load_pretrained(&dir).is_ok());
    let weights = dir.join("model.safetensors");
    let cfg = dir.join("config.json");
    let good_weights = std::fs::read(&weights).unwrap();
    let good_cfg = std::fs::read(&cfg).unwrap();

    // config.json that is not JSON, or is JSON of the wrong form.
    std::fs::write(&cfg, b"{\"model\": \"PerformerLM\", ").unwrap();
    let e = err(load_pretrained(&dir));
    assert!(
        matches!(e, Error::Format { .. }) && e.to_string().contains("invalid JSON"),
        "{e}"
    );
    std::fs::write(
        &cfg,
        br#"{"model": "PerformerLM", "kwargs": {"num_tokens": "5"}}"#,
    )
    .unwrap();
    let e = err(load_pretrained(&dir));
    assert!(e.to_string().contains("`num_tokens` = \"5\""), "{e}");

    // A config far bigger than the weights file: refused before anything is built.
    let huge = ModelConfig::PerformerLM(PerformerLMConfig {
        num_tokens: 1 << 30,
        dim: 1 << 12,
        ..fuzz_lm_config()
    });
    std::fs::write(&cfg, huge.to_json().to_string()).unwrap();
    let (r, largest) = watched(|| load_pretrained(&dir));
    let e = err(r);
    assert!(matches!(e, Error::Format { .. }), "{e}");
    assert!(e.to_string().contains("cannot hold"), "{e}");
    assert!(
        largest < 1 << 20,
        "allocated {largest} bytes before refusing"
    );

    // A config of another class than the weights.
    let other = ModelConfig::Performer(PerformerConfig {
        dim: 4,
        depth: 1,
        heads: 1,
        nb_features: Some(3),
        ..Default::default()
    });
    std::fs::write(&cfg, other.to_json().to_string()).unwrap();
    let e = err(load_pretrained(&dir));
    assert!(
        matches!(e, Error::StateDict(_)) && e.to_string().contains("missing keys"),
        "{e}"
    );
    std::fs::write(&cfg, &good_cfg).unwrap();

    // Truncated weights: the error names the file.
    std::fs::write(&weights, &good_weights[..good_weights.len() / 2]).unwrap();
    let e = err(load_pretrained(&dir));
    assert!(matches!(e, Error::Format { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
    assert!(e.to_string().contains("invalid safetensors file"), "{e}");
    // No weights at all.
    std::fs::remove_file(&weights).unwrap();
    let e = err(load_pretrained(&dir));
    assert!(
        matches!(e, Error::Io { .. }) && e.to_string().contains("model.safetensors"),
        "{e}"
    );
    // A directory where the file should be.
    std::fs::create_dir_all(&weights).unwrap();
    assert!(load_safetensors(&weights).is_err());
    assert!(load_state_dict_file(&lm, &weights).is_err());
    std::fs::remove_dir_all(&weights).unwrap();
    // A save leaves no temporary file behind.
    save_state_dict_file(&lm, &weights).unwrap();
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
