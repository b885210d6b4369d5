//! Without the `cuda` feature, selecting a device is a clear error and nothing changes.
#![cfg(not(feature = "cuda"))]

use performer_favor::{FastAttention, FastAttentionConfig};

#[test]
fn use_cuda_without_the_feature_is_an_error() {
    let fa = FastAttention::new(FastAttentionConfig::new(8)).unwrap();
    let err = fa.use_cuda(0).unwrap_err();
    assert!(err.to_string().contains("`cuda` feature"), "{err}");
    assert!(!fa.uses_cuda());
}
