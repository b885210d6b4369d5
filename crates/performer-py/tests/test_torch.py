"""Interop with a real performer-pytorch 1.1.4 (run in the reference environment by
scripts/test-python.sh; skipped elsewhere unless PERFORMER_REF_REQUIRE=1): modules moved with
`from_torch` give the reference's outputs within 1e-4 of its largest magnitude, weights moved
back with `to_torch_state_dict` load strictly into performer-pytorch and give ours, and torch
tensors are accepted as inputs."""

import os

import numpy as np
import pytest

import performer_rs as pr
from conftest import relative_error

if os.environ.get("PERFORMER_REF_REQUIRE") == "1":
    import performer_pytorch as pp
    import torch
else:
    torch = pytest.importorskip("torch")
    pp = pytest.importorskip("performer_pytorch")

TOLERANCE = 1e-4

LM_CONFIGS = {
    "causal_default": dict(num_tokens=64, max_seq_len=64, dim=32, depth=2, heads=4, dim_head=8,
                           causal=True),
    "kitchen_sink": dict(num_tokens=64, max_seq_len=64, dim=32, depth=2, heads=4, dim_head=8,
                         causal=True, local_attn_heads=(2, 1), local_window_size=16,
                         reversible=True, ff_glu=True, ff_chunks=2, shift_tokens=True,
                         use_scalenorm=True, nb_features=24, qkv_bias=True),
    "noncausal_axial_rezero": dict(num_tokens=64, max_seq_len=64, dim=32, depth=1, heads=2,
                                   dim_head=16, rotary_position_emb=False,
                                   axial_position_emb=True, axial_position_shape=(8, 8),
                                   use_rezero=True, ff_mult=2),
    "absolute_tied_generalized": dict(num_tokens=64, max_seq_len=64, dim=32, depth=1, heads=2,
                                      rotary_position_emb=False, tie_embed=True,
                                      generalized_attention=True, kernel_fn=torch.nn.GELU(),
                                      causal=True, attn_out_bias=True),
}


def torch_lm(kwargs, seed=0):
    torch.manual_seed(seed)
    model = pp.PerformerLM(**kwargs)
    # ReZero starts at 1e-3 and ScaleNorm at 1: move them so a wrong one shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".g"):
                p.uniform_(0.3, 0.9)
    return model.eval()


@pytest.mark.parametrize("name", LM_CONFIGS)
def test_from_torch_lm_logits_match(name):
    ref = torch_lm(LM_CONFIGS[name])
    ours = pr.from_torch(ref)
    assert not ours.training
    x = torch.randint(0, 64, (2, 64))
    mask = torch.ones_like(x).bool()
    mask[1, 50:] = False
    with torch.no_grad():
        want = ref(x, mask=mask).numpy()
    got = ours(x.numpy(), mask=mask.numpy())
    assert relative_error(got, want) <= TOLERANCE


def test_from_torch_reads_the_knobs_back():
    ref = torch_lm(LM_CONFIGS["kitchen_sink"])
    config = pr.from_torch(ref).config
    for k, v in LM_CONFIGS["kitchen_sink"].items():
        assert config[k] == (list(v) if isinstance(v, tuple) else v), k


def test_from_torch_with_kwargs_overrides_what_is_read():
    ref = torch_lm(LM_CONFIGS["causal_default"])
    # A wrong override is an error (the weights load strictly), not a different model.
    with pytest.raises(RuntimeError, match="heads|shape|missing|unexpected"):
        pr.from_torch(ref, depth=3)


def test_to_torch_state_dict_loads_into_performer_pytorch():
    kwargs = LM_CONFIGS["kitchen_sink"]
    ours = pr.PerformerLM(**kwargs).eval()
    ref = torch_lm(kwargs, seed=1)
    ref.load_state_dict(pr.to_torch_state_dict(ours))
    x = np.random.default_rng(0).integers(0, 64, (2, 64))
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    assert relative_error(ours(x), want) <= TOLERANCE


def test_weights_survive_a_round_trip_through_torch():
    ours = pr.PerformerLM(**LM_CONFIGS["causal_default"])
    ref = torch_lm(LM_CONFIGS["causal_default"], seed=2)
    ref.load_state_dict(pr.to_torch_state_dict(ours))
    back = pr.from_torch(ref)
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_other_classes_from_torch():
    torch.manual_seed(3)
    x = torch.randn(2, 32, 32)
    context = torch.randn(2, 16, 32)
    cases = [
        (pp.Performer(dim=32, depth=2, heads=4, dim_head=8, causal=True, ff_glu=True), (x,), {}),
        (pp.SelfAttention(dim=32, heads=4, dim_head=8, local_heads=2, local_window_size=16,
                          causal=True), (x,), {}),
        (pp.CrossAttention(dim=32, heads=4, dim_head=8), (x,), {"context": context}),
    ]
    for ref, args, kw in cases:
        ref.eval()
        ours = pr.from_torch(ref)
        with torch.no_grad():
            want = ref(*args, **kw).numpy()
        got = ours(*[a.numpy() for a in args], **{k: v.numpy() for k, v in kw.items()})
        assert relative_error(got, want) <= TOLERANCE, type(ref).__name__
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    ref = pp.FastAttention(dim_heads=16, nb_features=32, causal=True)
    with torch.no_grad():
        want = ref(q, k, v).numpy()
    # torch tensors go in as they are (the array protocol).
    assert relative_error(pr.from_torch(ref)(q, k, v), want) <= TOLERANCE


def test_enc_dec_and_wrapper_from_torch():
    torch.manual_seed(4)
    ref = pp.PerformerEncDec(dim=32, enc_num_tokens=20, enc_depth=1, enc_heads=2,
                             enc_max_seq_len=16, dec_num_tokens=20, dec_depth=1, dec_heads=2,
                             dec_max_seq_len=16, tie_token_embeds=True).eval()
    ours = pr.from_torch(ref)
    src, tgt = torch.randint(1, 20, (2, 16)), torch.randint(1, 20, (2, 16))
    with torch.no_grad():
        want = ref(src, tgt).item()
    assert abs(ours(src, tgt).item() - want) <= TOLERANCE * abs(want)
    wrapper = pp.AutoregressiveWrapper(torch_lm(LM_CONFIGS["causal_default"]), ignore_index=-1)
    ours = pr.from_torch(wrapper)
    assert ours.ignore_index == -1
    x = torch.randint(0, 64, (2, 32))
    with torch.no_grad():
        want = wrapper(x).item()
    assert abs(ours(x).item() - want) <= TOLERANCE * abs(want)


def test_nn_module_kernel_fn_is_accepted():
    m = pr.PerformerLM(num_tokens=10, max_seq_len=8, dim=16, depth=1, heads=2,
                       generalized_attention=True, kernel_fn=torch.nn.ReLU())
    assert m.config["kernel_fn"] == "relu"
