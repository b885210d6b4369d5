#!/usr/bin/env python3
"""Generate the parity fixtures of performer-rs from performer-pytorch 1.1.4.

Usage:
    $PERFORMER_REF_PYTHON tools/gen_fixtures.py [OUT_DIR] [--only SUBSTRING ...]

OUT_DIR defaults to `fixtures/` at the repository root. The layout of each fixture directory is
the contract in FIXTURES.md (config.json, weights.safetensors, inputs.safetensors,
expected.safetensors). Core-op fixtures for the tensor crate go to OUT_DIR/ops/.

Everything is seeded from the fixture's name, so a rerun reproduces the same bytes on the same
torch build. `tools/check_fixtures.py` reloads every fixture and checks it against the reference.
"""

import argparse
import contextlib
import copy
import io
import json
import math
import os
import shutil
import sys
import warnings
import zlib

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from performer_pytorch import (  # noqa: E402
    CrossAttention,
    FastAttention,
    Performer,
    PerformerEncDec,
    PerformerLM,
    SelfAttention,
)
from performer_pytorch.performer_pytorch import PreScaleNorm, ReZero  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = ("fast_attention", "layers", "models")

KERNELS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}

MODELS = {
    "FastAttention": FastAttention,
    "SelfAttention": SelfAttention,
    "CrossAttention": CrossAttention,
    "Performer": Performer,
    "PerformerLM": PerformerLM,
    "PerformerEncDec": PerformerEncDec,
}


# ---------------------------------------------------------------------------------------------
# shared helpers (also used by check_fixtures.py)


def seed_of(name, salt=0):
    return (zlib.crc32(name.encode()) + salt) % (2**31)


def python_kwargs(kwargs):
    """JSON kwargs -> the constructor's Python kwargs (kernel names, tuples)."""
    kw = {}
    for key, val in kwargs.items():
        if key.endswith("kernel_fn"):
            val = KERNELS[val]()
        elif key.endswith("local_attn_heads") or key.endswith("axial_position_shape"):
            if isinstance(val, list):
                val = tuple(val)
        kw[key] = val
    return kw


def build_module(config):
    # the causal path prints a notice about fast_transformers on construction; keep stdout clean
    with contextlib.redirect_stdout(io.StringIO()):
        return MODELS[config["model"]](**python_kwargs(config["kwargs"]))


def run_forward(config, module, inputs):
    """Calls the module's forward the way the fixture contract describes."""
    model = config["model"]
    call = dict(config.get("call", {}))
    opt = {k: inputs[k] for k in ("mask", "context", "context_mask") if k in inputs}
    if model == "FastAttention":
        return module(inputs["q"], inputs["k"], inputs["v"])
    if model in ("SelfAttention", "CrossAttention", "Performer"):
        return module(inputs["x"], **opt, **call)
    if model == "PerformerLM":
        return module(inputs["x"], **opt, **call)
    if model == "PerformerEncDec":
        extra = {k: inputs[k] for k in ("enc_mask", "dec_mask") if k in inputs}
        return module(inputs["x"], inputs["y"], **extra, **call)
    raise ValueError(model)


def forward_backward(config, module, inputs, probe=None, probe_gen=None):
    """Runs the forward and the backward of sum(out * probe). Returns (out, probe, grads)."""
    inputs = {
        k: (v.detach().clone().requires_grad_(True) if v.is_floating_point() else v)
        for k, v in inputs.items()
    }
    module.train(bool(config["train"]))
    module.zero_grad(set_to_none=True)
    out = run_forward(config, module, inputs)
    if probe is None:
        if out.dim() == 0:
            probe = torch.tensor(1.0)
        else:
            probe = torch.randn(out.shape, generator=probe_gen)
    (out * probe).sum().backward()
    grads = {}
    for name, p in module.named_parameters():
        if p.grad is not None:
            grads["grad." + name] = p.grad.detach().clone()
    for name, v in inputs.items():
        if v.is_floating_point():
            grads["grad.input." + name] = v.grad.detach().clone()
    return out.detach().clone(), probe, grads


def state_dict_tensors(module):
    # clone every entry: the `proj_updater.instance.` aliases share storage with `net.`, and
    # safetensors refuses shared tensors
    sd = {}
    for k, v in module.state_dict().items():
        v = v.detach().clone().contiguous()
        if v.is_floating_point() and v.dtype != torch.float32:
            v = v.to(torch.float32)
        sd[k] = v
    return sd


# ---------------------------------------------------------------------------------------------
# input builders


def randn(*shape, scale=1.0):
    return lambda g: torch.randn(shape, generator=g) * scale


def tokens(b, n, num_tokens, zero_tail=None):
    """Integer tokens in [1, num_tokens); zero_tail[i] = how many trailing tokens of row i are 0."""

    def make(g):
        t = torch.randint(1, num_tokens, (b, n), generator=g, dtype=torch.int64)
        for i, z in enumerate(zero_tail or []):
            if z:
                t[i, n - z:] = 0
        return t

    return make


def mask(n, rows):
    """rows: per batch row a tuple (end_pad, holes, start_pad): False for the last `end_pad`
    positions, the positions in `holes` and the first `start_pad` positions."""

    def make(_g):
        m = torch.ones(len(rows), n, dtype=torch.bool)
        for i, row in enumerate(rows):
            end_pad, holes = row[0], row[1]
            start_pad = row[2] if len(row) > 2 else 0
            if end_pad:
                m[i, n - end_pad:] = False
            for h in holes:
                m[i, h] = False
            if start_pad:
                m[i, :start_pad] = False
        return m

    return make


# ---------------------------------------------------------------------------------------------
# fixture definitions


def fa(name, desc, n, d=8, b=2, h=2, **kwargs):
    kw = {"dim_heads": d, **kwargs}
    return dict(
        group="fast_attention", name=name, desc=desc, model="FastAttention", kwargs=kw,
        inputs={"q": randn(b, h, n, d), "k": randn(b, h, n, d), "v": randn(b, h, n, d)},
    )


def fixture(group, name, desc, model, kwargs, inputs, train=False, call=None):
    return dict(group=group, name=name, desc=desc, model=model, kwargs=kwargs, inputs=inputs,
                train=train, call=call or {})


def fixtures():
    F = []

    # --- FastAttention -----------------------------------------------------------------------
    F += [
        fa("softmax_noncausal", "softmax kernel, non-causal, nb_features 12 (not a multiple of dim_heads 8), n 13",
           13, nb_features=12),
        fa("softmax_causal", "softmax kernel, causal (noncuda path), default nb_features (16), n 19",
           19, causal=True),
        fa("softmax_ortho1", "softmax kernel, ortho_scaling 1, nb_features 20 (2 full blocks + 4 rows), n 11",
           11, nb_features=20, ortho_scaling=1),
        fa("softmax_causal_d16", "softmax kernel, causal, dim_heads 16, nb_features 20, h 3, n 17",
           17, d=16, h=3, nb_features=20, causal=True),
        fa("generalized_relu", "generalized attention, relu kernel, nb_features 12, non-causal, n 14",
           14, generalized_attention=True, kernel_fn="relu", nb_features=12),
        fa("generalized_gelu_ortho1", "generalized attention, gelu kernel, ortho_scaling 1, nb_features 10, n 9",
           9, generalized_attention=True, kernel_fn="gelu", nb_features=10, ortho_scaling=1),
        fa("generalized_softplus_causal", "generalized attention, softplus kernel, causal, nb_features 12, n 16",
           16, generalized_attention=True, kernel_fn="softplus", nb_features=12, causal=True),
        fa("generalized_relu_causal", "generalized attention, relu kernel, causal, default nb_features, n 15",
           15, generalized_attention=True, kernel_fn="relu", causal=True),
        fa("generalized_elu", "generalized attention, elu kernel, non-causal, nb_features 11, n 12",
           12, generalized_attention=True, kernel_fn="elu", nb_features=11),
        fa("generalized_sigmoid_causal", "generalized attention, sigmoid kernel, causal, nb_features 9, n 10",
           10, generalized_attention=True, kernel_fn="sigmoid", nb_features=9, causal=True),
        fa("generalized_tanh", "generalized attention, tanh kernel (can go negative), non-causal, nb_features 12, n 10",
           10, generalized_attention=True, kernel_fn="tanh", nb_features=12),
        fa("generalized_silu_causal", "generalized attention, silu kernel, causal, nb_features 13, n 12",
           12, generalized_attention=True, kernel_fn="silu", nb_features=13, causal=True),
        fa("no_projection", "no_projection, non-causal (q softmax over features, k softmax over sequence), n 13",
           13, no_projection=True),
        fa("no_projection_causal", "no_projection, causal (q softmax, k = exp(k)), n 14",
           14, no_projection=True, causal=True),
    ]

    # --- layers ------------------------------------------------------------------------------
    L = "layers"
    F += [
        fixture(L, "self_attn_local_mask",
                "SelfAttention non-causal, 2 of 4 heads local, window 8, n 30 (4 windows, autopad 2), padding mask, qkv_bias + attn_out_bias, nb_features 12",
                "SelfAttention",
                dict(dim=32, heads=4, dim_head=8, local_heads=2, local_window_size=8, nb_features=12,
                     qkv_bias=True, attn_out_bias=True),
                {"x": randn(2, 30, 32), "mask": mask(30, [(0, []), (7, [11])])}),
        fixture(L, "self_attn_local_causal_mask",
                "SelfAttention causal, 1 of 4 heads local, window 8, n 30, padding mask, no biases at all",
                "SelfAttention",
                dict(dim=32, heads=4, dim_head=8, local_heads=1, local_window_size=8, causal=True,
                     qkv_bias=False, attn_out_bias=False),
                {"x": randn(2, 30, 32), "mask": mask(30, [(4, [3]), (9, [])])}),
        fixture(L, "self_attn_local_nomask",
                "SelfAttention non-causal, 2 of 4 heads local, window 8, n 27, no mask: autopadded zero keys are attended",
                "SelfAttention",
                dict(dim=32, heads=4, dim_head=8, local_heads=2, local_window_size=8, nb_features=12,
                     qkv_bias=True, attn_out_bias=False),
                {"x": randn(2, 27, 32)}),
        fixture(L, "self_attn_local_causal_nomask",
                "SelfAttention causal, dim 24, 2 of 3 heads local, window 6, n 20 (autopad 4), no mask, train mode",
                "SelfAttention",
                dict(dim=24, heads=3, dim_head=8, local_heads=2, local_window_size=6, causal=True,
                     nb_features=10),
                {"x": randn(2, 20, 24)}, train=True),
        fixture(L, "self_attn_global_mask_generalized",
                "SelfAttention, no local heads, generalized relu kernel, dim 16 heads 4 dim_head 6 (inner 24 != dim), padding mask",
                "SelfAttention",
                dict(dim=16, heads=4, dim_head=6, generalized_attention=True, kernel_fn="relu",
                     nb_features=10, qkv_bias=True),
                {"x": randn(2, 17, 16), "mask": mask(17, [(5, [2]), (0, [8])])}),
        fixture(L, "self_attn_causal_mask_global",
                "SelfAttention causal softmax kernel, no local heads, padding mask (masks v only), nb_features 12",
                "SelfAttention",
                dict(dim=24, heads=3, dim_head=8, causal=True, nb_features=12),
                {"x": randn(2, 15, 24), "mask": mask(15, [(0, [4]), (6, [])])}),
        fixture(L, "self_attn_local_fully_masked",
                "SelfAttention non-causal, 2 of 4 heads local, window 8, n 40, row 1 padded from 13: whole local rows masked -> uniform over all 24 keys incl. the -1 look-around pad values",
                "SelfAttention",
                dict(dim=32, heads=4, dim_head=8, local_heads=2, local_window_size=8, nb_features=12,
                     qkv_bias=True),
                {"x": randn(2, 40, 32), "mask": mask(40, [(0, [20]), (27, [])])}),
        fixture(L, "self_attn_all_local_causal_fully_masked",
                "SelfAttention causal, all heads local (no global heads), window 8, n 37 (autopad 3), row 0 left-padded 9, row 1 padded from 15: fully masked local rows",
                "SelfAttention",
                dict(dim=16, heads=2, dim_head=8, local_heads=2, local_window_size=8, causal=True,
                     qkv_bias=True),
                {"x": randn(2, 37, 16), "mask": mask(37, [(0, [], 9), (22, [])])}),
        fixture(L, "cross_attn_context_mask",
                "CrossAttention, n 12 queries, context n 17 with context_mask, qkv_bias, nb_features 12",
                "CrossAttention",
                dict(dim=32, heads=4, dim_head=8, nb_features=12, qkv_bias=True),
                {"x": randn(2, 12, 32), "context": randn(2, 17, 32),
                 "context_mask": mask(17, [(3, [5]), (0, [])])}),
        fixture(L, "cross_attn_generalized_nomask",
                "CrossAttention, generalized softplus kernel, no context_mask, no attn_out_bias, context n 9",
                "CrossAttention",
                dict(dim=16, heads=2, dim_head=8, generalized_attention=True, kernel_fn="softplus",
                     nb_features=12, attn_out_bias=False),
                {"x": randn(2, 11, 16), "context": randn(2, 9, 16)}),
        fixture(L, "cross_attn_no_projection",
                "CrossAttention, no_projection, context_mask, train mode",
                "CrossAttention",
                dict(dim=16, heads=2, dim_head=8, no_projection=True),
                {"x": randn(2, 10, 16), "context": randn(2, 13, 16),
                 "context_mask": mask(13, [(0, [0]), (4, [])])}, train=True),
    ]

    # --- models: Performer -------------------------------------------------------------------
    M = "models"
    F += [
        fixture(M, "performer_plain",
                "Performer defaults (PreLayerNorm, qkv_bias True by Performer default), depth 2, nb_features 12, n 16, no mask",
                "Performer",
                dict(dim=24, depth=2, heads=4, dim_head=8, nb_features=12, ff_mult=2),
                {"x": randn(2, 16, 24)}),
        fixture(M, "performer_reversible_noncausal",
                "Performer reversible + use_rezero + ff_glu + ff_chunks 3 + shift_tokens (-1,0,1 on dim 32: 10+10+10 shifted, 2 kept) + local_attn_heads (1,0) window 8, n 21, padding mask, train mode (the reference cannot backprop a reversible net in eval mode)",
                "Performer",
                dict(dim=32, depth=2, heads=4, dim_head=8, local_attn_heads=[1, 0], local_window_size=8,
                     reversible=True, use_rezero=True, ff_glu=True, ff_chunks=3, shift_tokens=True,
                     nb_features=12, ff_mult=2),
                {"x": randn(2, 21, 32), "mask": mask(21, [(0, [6]), (5, [])])}, train=True),
        fixture(M, "performer_reversible_causal",
                "Performer causal reversible + use_rezero + ff_glu + ff_chunks 2 + shift_tokens (0,1) + local_attn_heads (2,1) window 8, n 21, padding mask, train mode",
                "Performer",
                dict(dim=24, depth=2, heads=4, dim_head=8, local_attn_heads=[2, 1], local_window_size=8,
                     causal=True, reversible=True, use_rezero=True, ff_glu=True, ff_chunks=2,
                     shift_tokens=True, ff_mult=2),
                {"x": randn(2, 21, 24), "mask": mask(21, [(3, []), (0, [10])])}, train=True),
        fixture(M, "performer_scalenorm_cross",
                "Performer use_scalenorm + cross_attend (context + context_mask), padding mask, non-causal, nb_features 12",
                "Performer",
                dict(dim=24, depth=2, heads=4, dim_head=8, use_scalenorm=True, cross_attend=True,
                     nb_features=12, ff_mult=2),
                {"x": randn(2, 12, 24), "mask": mask(12, [(0, [3]), (4, [])]),
                 "context": randn(2, 14, 24), "context_mask": mask(14, [(5, []), (0, [1])])}),
        fixture(M, "performer_generalized_causal",
                "Performer causal, generalized attention with sigmoid kernel_fn, nb_features 10, no biases on qkv",
                "Performer",
                dict(dim=16, depth=2, heads=2, dim_head=8, causal=True, generalized_attention=True,
                     kernel_fn="sigmoid", nb_features=10, qkv_bias=False, ff_mult=2),
                {"x": randn(2, 14, 16)}),
        fixture(M, "performer_rezero_shift_causal",
                "Performer sequential (not reversible), causal, use_rezero, ff_glu, shift_tokens (0,1) on dim 24 (12+12), local_attn_heads 1 window 6, n 17, mask",
                "Performer",
                dict(dim=24, depth=2, heads=3, dim_head=8, causal=True, use_rezero=True, ff_glu=True,
                     shift_tokens=True, local_attn_heads=1, local_window_size=6, nb_features=12,
                     ff_mult=2),
                {"x": randn(2, 17, 24), "mask": mask(17, [(0, []), (6, [2])])}),
    ]

    # --- models: PerformerLM -----------------------------------------------------------------
    lm_base = dict(num_tokens=23, max_seq_len=40, dim=16, depth=2, heads=4, dim_head=8, ff_mult=2)
    F += [
        fixture(M, "lm_causal",
                "PerformerLM causal, rotary (default), default nb_features, n 24",
                "PerformerLM", dict(lm_base, causal=True),
                {"x": tokens(2, 24, 23)}),
        fixture(M, "lm_noncausal_local_mask_bias",
                "PerformerLM non-causal, local_attn_heads (2,1) window 8, n 30, padding mask, qkv_bias + attn_out_bias, nb_features 12",
                "PerformerLM",
                dict(lm_base, local_attn_heads=[2, 1], local_window_size=8, qkv_bias=True,
                     attn_out_bias=True, nb_features=12),
                {"x": tokens(2, 30, 23), "mask": mask(30, [(0, [17]), (8, [4])])}),
        fixture(M, "lm_tie_embed_axial_shape",
                "PerformerLM causal, tie_embed, rotary off, axial_position_emb with axial_position_shape (4, 10), n 26",
                "PerformerLM",
                dict(lm_base, causal=True, tie_embed=True, rotary_position_emb=False,
                     axial_position_emb=True, axial_position_shape=[4, 10], nb_features=12),
                {"x": tokens(2, 26, 23)}),
        fixture(M, "lm_axial_default_shape",
                "PerformerLM non-causal, rotary off, axial_position_emb with the default shape (ceil(40/64), 64) = (1, 64), padding mask",
                "PerformerLM",
                dict(lm_base, rotary_position_emb=False, axial_position_emb=True, nb_features=12),
                {"x": tokens(2, 19, 23), "mask": mask(19, [(4, []), (0, [0])])}),
        fixture(M, "lm_absolute_pos",
                "PerformerLM causal, rotary off, axial off -> AbsolutePositionalEmbedding (learned), n 22",
                "PerformerLM",
                dict(lm_base, causal=True, rotary_position_emb=False, nb_features=12),
                {"x": tokens(2, 22, 23)}),
        fixture(M, "lm_generalized_mask",
                "PerformerLM non-causal, generalized attention with softplus kernel_fn, nb_features 12, padding mask",
                "PerformerLM",
                dict(lm_base, generalized_attention=True, kernel_fn="softplus", nb_features=12),
                {"x": tokens(2, 18, 23), "mask": mask(18, [(0, []), (5, [9])])}),
        fixture(M, "lm_generalized_causal_relu",
                "PerformerLM causal, generalized attention with the default relu kernel, nb_features 10",
                "PerformerLM",
                dict(lm_base, causal=True, generalized_attention=True, nb_features=10),
                {"x": tokens(2, 16, 23)}),
        fixture(M, "lm_reversible_shift_scalenorm",
                "PerformerLM causal, reversible + shift_tokens + use_scalenorm, local_attn_heads (1,2) window 8, n 21, train mode",
                "PerformerLM",
                dict(lm_base, causal=True, reversible=True, shift_tokens=True, use_scalenorm=True,
                     local_attn_heads=[1, 2], local_window_size=8, nb_features=12),
                {"x": tokens(2, 21, 23)}, train=True),
        fixture(M, "lm_local_default_window",
                "PerformerLM non-causal, local_attn_heads (1,0) with the default window 256 (n 20 autopadded to 256, zero keys attended), no mask",
                "PerformerLM",
                dict(lm_base, local_attn_heads=[1, 0], nb_features=12),
                {"x": tokens(2, 20, 23)}),
        fixture(M, "lm_return_encodings",
                "PerformerLM non-causal, call return_encodings=true (to_out gets no gradient), ff_glu, ff_chunks 2, padding mask",
                "PerformerLM",
                dict(lm_base, ff_glu=True, ff_chunks=2, nb_features=12),
                {"x": tokens(2, 17, 23), "mask": mask(17, [(0, [5]), (3, [])])},
                call={"return_encodings": True}),
        fixture(M, "lm_no_projection_causal",
                "PerformerLM causal, no_projection, n 20",
                "PerformerLM", dict(lm_base, causal=True, no_projection=True),
                {"x": tokens(2, 20, 23)}),
        fixture(M, "lm_no_projection_mask",
                "PerformerLM non-causal, no_projection, padding mask, local_attn_heads 1 window 8, n 19",
                "PerformerLM",
                dict(lm_base, no_projection=True, local_attn_heads=1, local_window_size=8),
                {"x": tokens(2, 19, 23), "mask": mask(19, [(6, []), (0, [12])])}),
        fixture(M, "lm_train_rezero",
                "PerformerLM causal in train mode (projection counter 0 -> 1, no redraw), use_rezero, qkv_bias, nb_features 12",
                "PerformerLM",
                dict(lm_base, causal=True, use_rezero=True, qkv_bias=True, nb_features=12),
                {"x": tokens(2, 18, 23)}, train=True),
        fixture(M, "lm_kitchen_sink",
                "PerformerLM non-causal: reversible, shift_tokens, ff_glu, ff_chunks 2, tie_embed, qkv_bias + attn_out_bias, local_attn_heads (1,0,2) window 8, generalized sigmoid kernel, nb_features 12, depth 3, dim 16 with 4 heads x 8 (inner 32), shift on 5+5+5 (1 kept), padding mask, train mode",
                "PerformerLM",
                dict(lm_base, depth=3, reversible=True, shift_tokens=True, ff_glu=True, ff_chunks=2,
                     tie_embed=True, qkv_bias=True, attn_out_bias=True, local_attn_heads=[1, 0, 2],
                     local_window_size=8, generalized_attention=True, kernel_fn="sigmoid",
                     nb_features=12),
                {"x": tokens(2, 27, 23), "mask": mask(27, [(0, [3]), (10, [])])}, train=True),
    ]

    # --- models: PerformerEncDec -------------------------------------------------------------
    ed_base = dict(
        dim=16,
        enc_num_tokens=19, enc_depth=1, enc_heads=2, enc_dim_head=8, enc_max_seq_len=20,
        enc_nb_features=12, enc_ff_mult=2,
        dec_num_tokens=17, dec_depth=2, dec_heads=4, dec_dim_head=8, dec_max_seq_len=24,
        dec_nb_features=12, dec_ff_mult=2,
    )
    F += [
        fixture(M, "encdec_masks",
                "PerformerEncDec loss with enc_mask (also the decoder's context_mask) and dec_mask (trimmed to n-1), y with ignore_index 0 targets",
                "PerformerEncDec", dict(ed_base),
                {"x": tokens(2, 15, 19), "y": tokens(2, 18, 17, zero_tail=[0, 5]),
                 "enc_mask": mask(15, [(0, [7]), (4, [])]),
                 "dec_mask": mask(18, [(0, []), (5, [])])}),
        fixture(M, "encdec_tie_token_embeds",
                "PerformerEncDec tie_token_embeds (one shared token_emb: grad under enc.token_emb.weight), encoder local heads window 8, enc_mask only, dec reversible, train mode",
                "PerformerEncDec",
                dict(ed_base, enc_num_tokens=17, tie_token_embeds=True, enc_local_attn_heads=1,
                     enc_local_window_size=8, dec_reversible=True),
                {"x": tokens(2, 13, 17), "y": tokens(2, 12, 17, zero_tail=[2, 0]),
                 "enc_mask": mask(13, [(3, []), (0, [6])])}, train=True),
        fixture(M, "encdec_no_projection_train",
                "PerformerEncDec no_projection (top-level kwarg), ignore_index 1, train mode, dec generalized relu, no masks",
                "PerformerEncDec",
                dict(ed_base, no_projection=True, ignore_index=1, dec_generalized_attention=True),
                {"x": tokens(2, 11, 19), "y": tokens(2, 14, 17)}, train=True),
    ]
    return F


# ---------------------------------------------------------------------------------------------
# generation


def perturb_(module, g):
    """Moves every parameter away from its initial value, so that a wrong gradient or a wrong
    parameter mapping shows: norms, biases and gains get noise; ReZero / ScaleNorm gains get a
    magnitude where their branch matters."""
    with torch.no_grad():
        for _, p in module.named_parameters():
            scale = 0.1 if p.dim() <= 1 else 0.02
            p.add_(torch.randn(p.shape, generator=g) * scale)
        for m in module.modules():
            if isinstance(m, ReZero):
                m.g.copy_(0.3 + 0.6 * torch.rand((), generator=g))
            elif isinstance(m, PreScaleNorm):
                m.g.copy_(2.0 + 2.0 * torch.rand(m.g.shape, generator=g))


def generate_fixture(spec, out_dir):
    name = spec["name"]
    config = {"model": spec["model"], "kwargs": spec["kwargs"], "train": spec.get("train", False),
              "call": spec.get("call", {})}
    torch.manual_seed(seed_of(name))
    module = build_module(config)
    g = torch.Generator().manual_seed(seed_of(name, 1))
    perturb_(module, g)
    weights = state_dict_tensors(module)  # before the forward: train mode bumps the counter
    module64 = copy.deepcopy(module).double()

    gi = torch.Generator().manual_seed(seed_of(name, 2))
    inputs = {k: make(gi) for k, make in spec["inputs"].items()}
    gp = torch.Generator().manual_seed(seed_of(name, 3))
    out, probe, grads = forward_backward(config, module, inputs, probe_gen=gp)
    assert torch.isfinite(out).all(), name
    for k, v in grads.items():
        assert torch.isfinite(v).all(), (name, k)

    # conditioning: the same computation in float64; a fixture whose float32 reference is far
    # from float64 would make the Rust comparison a test of rounding, not of the model
    inputs64 = {k: (v.double() if v.dtype == torch.float32 else v) for k, v in inputs.items()}
    out64, _, grads64 = forward_backward(config, module64, inputs64, probe=probe.double())
    fwd_err = rel_err(out, out64)
    grad_err = max([rel_err(grads[k], grads64[k]) for k in grads] or [0.0])
    assert set(grads) == set(grads64), name

    d = os.path.join(out_dir, spec["group"], name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    save_file(weights, os.path.join(d, "weights.safetensors"))
    save_file({**{k: v.contiguous() for k, v in inputs.items()}, "probe": probe.contiguous()},
              os.path.join(d, "inputs.safetensors"))
    save_file({"out": out.contiguous(), **{k: v.contiguous() for k, v in grads.items()}},
              os.path.join(d, "expected.safetensors"))
    return d, out, fwd_err, grad_err


def rel_err(a, ref):
    a, ref = a.double(), ref.double()
    m = ref.abs().max().item()
    e = (a - ref).abs().max().item()
    return e / m if m > 0 else e


# ---------------------------------------------------------------------------------------------
# core-op fixtures for performer-tensor

OPS_README = """# Core-op fixtures (performer-tensor)

Generated by `tools/gen_fixtures.py` with torch {torch_version} (float32, CPU). One safetensors
file per case; hyper-parameters are also stored in each file's safetensors metadata, as a JSON
string under the key `hyperparameters`.
`probe` is a random tensor of the output's shape; `grad_*` is the gradient of `sum(out * probe)`
(for losses, of the loss itself). Activations also carry `deriv` = d out / d x element-wise.

| file | tensors | notes |
|---|---|---|
| `softmax_last.safetensors` | `x` (2,5,7), `out`, `probe`, `grad_x` | softmax over dim -1 |
| `softmax_mid.safetensors` | `x` (2,5,7), `out`, `probe`, `grad_x` | softmax over dim 1 (a middle axis) |
| `log_softmax_last.safetensors` | `x` (3,9), `out`, `probe`, `grad_x` | log_softmax over dim -1 |
| `log_softmax_mid.safetensors` | `x` (2,6,4), `out`, `probe`, `grad_x` | log_softmax over dim 1 |
| `cross_entropy_ignore0.safetensors` | `logits` (2,7,6) = b x c x n, `target` (2,6) int64, `ignore_index` int64 scalar (0), `loss` scalar, `grad_logits` | `F.cross_entropy(logits, target, ignore_index=0)`, mean over non-ignored targets (3 of 12 ignored); the AutoregressiveWrapper's form |
| `cross_entropy_default.safetensors` | `logits` (3,5,4), `target` (3,4), `ignore_index` (-100), `loss`, `grad_logits` | default ignore_index -100, one -100 target, class 0 present |
| `layer_norm.safetensors` | `x` (2,3,8), `weight` (8), `bias` (8), `out`, `probe`, `grad_x`, `grad_weight`, `grad_bias` | `F.layer_norm` over the last dim, eps 1e-5 (biased variance) |
| `gelu.safetensors` | `x` (64), `out`, `probe`, `grad_x`, `deriv` | exact erf form (`nn.GELU()` default), x in [-8, 8] plus 0 |
| `elu.safetensors` | same | alpha 1; x includes 0 (torch derivative at 0 is 1) |
| `softplus.safetensors` | same | beta 1, threshold 20: x > 20 returns x (x includes 20.5, 25, 30, -30) |
| `silu.safetensors` | same | x * sigmoid(x) |
| `relu.safetensors` | same | derivative at exactly 0 is 0 |
| `sigmoid.safetensors` | same | |
| `tanh.safetensors` | same | |
| `adam.safetensors` | `param0` (3,4), `grad1..3`, `param1..3`, `exp_avg1..3`, `exp_avg_sq1..3` | `torch.optim.Adam(lr=1e-3)`, betas (0.9, 0.999), eps 1e-8; step t uses `grad{{t}}` and yields `param{{t}}` |
| `adam_wd.safetensors` | same | Adam with weight_decay 0.1 (L2 added to the gradient before the moments) |
| `adamw.safetensors` | same | `torch.optim.AdamW(lr=1e-3, weight_decay=0.01)`: decoupled decay p *= 1 - lr*wd before the Adam update |
| `sgd_momentum.safetensors` | `param0`, `grad1..3`, `param1..3`, `momentum_buffer1..3` | `torch.optim.SGD(lr=0.1, momentum=0.9)`, dampening 0, no nesterov: buf1 = grad1, then buf = 0.9 buf + grad |
"""


def gen_ops(out_dir):
    d = os.path.join(out_dir, "ops")
    os.makedirs(d, exist_ok=True)
    g = torch.Generator().manual_seed(1234)

    def rn(*shape, scale=1.0):
        return torch.randn(shape, generator=g) * scale

    def save(name, tensors, **meta):
        # one metadata key holding sorted JSON: safetensors writes a metadata map in hash order,
        # which would make reruns differ byte-wise
        meta = dict(meta, torch=torch.__version__)
        save_file({k: v.detach().contiguous() for k, v in tensors.items()},
                  os.path.join(d, name + ".safetensors"),
                  metadata={"hyperparameters": json.dumps(meta, sort_keys=True)})

    def unary(name, fn, x, **meta):
        x = x.clone().requires_grad_(True)
        out = fn(x)
        probe = rn(*out.shape)
        (gx,) = torch.autograd.grad((out * probe).sum(), x)
        x2 = x.detach().clone().requires_grad_(True)
        (deriv,) = torch.autograd.grad(fn(x2).sum(), x2)
        tensors = {"x": x, "out": out, "probe": probe, "grad_x": gx}
        if meta.pop("with_deriv", False):
            tensors["deriv"] = deriv
        save(name, tensors, **meta)

    unary("softmax_last", lambda t: t.softmax(dim=-1), rn(2, 5, 7, scale=2.0), op="softmax", dim=-1)
    unary("softmax_mid", lambda t: t.softmax(dim=1), rn(2, 5, 7, scale=2.0), op="softmax", dim=1)
    unary("log_softmax_last", lambda t: t.log_softmax(dim=-1), rn(3, 9, scale=2.0),
          op="log_softmax", dim=-1)
    unary("log_softmax_mid", lambda t: t.log_softmax(dim=1), rn(2, 6, 4, scale=2.0),
          op="log_softmax", dim=1)

    # cross entropy, logits b x c x n as torch takes them
    def ce(name, b, c, n, ignore_index, ignored):
        logits = rn(b, c, n, scale=2.0).requires_grad_(True)
        target = torch.randint(0, c, (b, n), generator=g, dtype=torch.int64)
        if ignore_index >= 0:
            # make sure only the chosen positions carry the ignored class
            target[target == ignore_index] = (ignore_index + 1) % c
        for (i, j) in ignored:
            target[i, j] = ignore_index
        if ignore_index < 0:
            target[0, 0] = 0  # class 0 present and counted
        loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index)
        (gl,) = torch.autograd.grad(loss, logits)
        save(name, {"logits": logits, "target": target,
                    "ignore_index": torch.tensor(ignore_index, dtype=torch.int64),
                    "loss": loss, "grad_logits": gl},
             op="cross_entropy", ignore_index=ignore_index, reduction="mean")

    ce("cross_entropy_ignore0", 2, 7, 6, 0, [(0, 5), (1, 4), (1, 5)])
    ce("cross_entropy_default", 3, 5, 4, -100, [(2, 1)])

    # layer norm
    x = rn(2, 3, 8, scale=1.5).add(0.7).requires_grad_(True)
    w = (1.0 + rn(8, scale=0.3)).requires_grad_(True)
    b = rn(8, scale=0.3).requires_grad_(True)
    out = torch.nn.functional.layer_norm(x, (8,), w, b, eps=1e-5)
    probe = rn(*out.shape)
    gx, gw, gb = torch.autograd.grad((out * probe).sum(), (x, w, b))
    save("layer_norm", {"x": x, "weight": w, "bias": b, "out": out, "probe": probe,
                        "grad_x": gx, "grad_weight": gw, "grad_bias": gb},
         op="layer_norm", eps=1e-5, normalized_shape="last dim")

    act_x = torch.cat([torch.linspace(-8, 8, 57), torch.tensor([0.0, -0.5, 0.5, 1e-3, -1e-3, 3.0, -3.0])])
    unary("gelu", nn.GELU(), act_x, op="gelu", approximate="none", with_deriv=True)
    unary("elu", nn.ELU(), act_x, op="elu", alpha=1.0, with_deriv=True)
    sp_x = torch.cat([act_x[:-7], torch.tensor([0.0, 19.5, 20.5, 25.0, 30.0, -30.0, -20.5])])
    unary("softplus", nn.Softplus(), sp_x, op="softplus", beta=1.0, threshold=20.0, with_deriv=True)
    unary("silu", nn.SiLU(), act_x, op="silu", with_deriv=True)
    unary("relu", nn.ReLU(), act_x, op="relu", with_deriv=True)
    unary("sigmoid", nn.Sigmoid(), act_x, op="sigmoid", with_deriv=True)
    unary("tanh", nn.Tanh(), act_x, op="tanh", with_deriv=True)

    # optimizers
    def optim_case(name, make_opt, state_keys, **meta):
        p0 = rn(3, 4)
        grads = [rn(3, 4) for _ in range(3)]
        p = nn.Parameter(p0.clone())
        opt = make_opt([p])
        tensors = {"param0": p0}
        for t, gr in enumerate(grads, 1):
            p.grad = gr.clone()
            opt.step()
            tensors[f"grad{t}"] = gr
            tensors[f"param{t}"] = p.detach().clone()
            st = opt.state[p]
            for sk in state_keys:
                tensors[f"{sk}{t}"] = st[sk].detach().clone()
        save(name, tensors, **meta)

    optim_case("adam", lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=False),
               ["exp_avg", "exp_avg_sq"], optimizer="Adam", lr=1e-3, betas="(0.9, 0.999)",
               eps=1e-8, weight_decay=0.0)
    optim_case("adam_wd", lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.1, foreach=False),
               ["exp_avg", "exp_avg_sq"], optimizer="Adam", lr=1e-3, betas="(0.9, 0.999)",
               eps=1e-8, weight_decay=0.1)
    optim_case("adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=False),
               ["exp_avg", "exp_avg_sq"], optimizer="AdamW", lr=1e-3, betas="(0.9, 0.999)",
               eps=1e-8, weight_decay=0.01)
    optim_case("sgd_momentum", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False),
               ["momentum_buffer"], optimizer="SGD", lr=0.1, momentum=0.9, dampening=0.0,
               nesterov=False)

    with open(os.path.join(d, "README.md"), "w") as f:
        f.write(OPS_README.format(torch_version=torch.__version__))


def write_index(out_dir, specs):
    lines = [
        "# Parity fixtures",
        "",
        "Generated by `tools/gen_fixtures.py` from performer-pytorch 1.1.4 "
        f"(torch {torch.__version__}, CPU, float32). Layout: `/work/shared/FIXTURES.md` "
        "(`<group>/<name>/{config.json,weights,inputs,expected}.safetensors`).",
        "Core-op fixtures for the tensor crate are in `ops/` (see `ops/README.md`); they are not",
        "fixture directories.",
        "",
    ]
    for group in GROUPS:
        lines += [f"## {group}", "", "| fixture | model | train | covers |", "|---|---|---|---|"]
        for s in specs:
            if s["group"] == group:
                lines.append(f"| `{group}/{s['name']}` | {s['model']} | "
                             f"{str(s.get('train', False)).lower()} | {s['desc']} |")
        lines.append("")
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", nargs="?", default=os.path.join(REPO_ROOT, "fixtures"))
    ap.add_argument("--only", nargs="*", default=None,
                    help="generate only fixtures whose group/name contains one of these")
    ap.add_argument("--no-ops", action="store_true", help="skip the core-op fixtures")
    args = ap.parse_args(argv)

    specs = fixtures()
    names = [s["name"] for s in specs]
    assert len(names) == len(set(names)), "duplicate fixture names"
    selected = [s for s in specs
                if not args.only or any(o in f"{s['group']}/{s['name']}" for o in args.only)]

    os.makedirs(args.out_dir, exist_ok=True)
    if not args.only:
        # start from a clean slate so renamed fixtures don't linger
        for group in GROUPS + ("ops",):
            shutil.rmtree(os.path.join(args.out_dir, group), ignore_errors=True)

    for s in selected:
        d, out, fe, ge = generate_fixture(s, args.out_dir)
        flag = "  <-- ill-conditioned" if fe > 5e-6 or ge > 2e-5 else ""
        print(f"{s['group']}/{s['name']}: out {tuple(out.shape)} max|out| {out.abs().max():.4g}"
              f" f32-vs-f64 fwd {fe:.1e} grad {ge:.1e}{flag}")
    if not args.no_ops and not args.only:
        gen_ops(args.out_dir)
        print("ops/: written")
    if not args.only:
        write_index(args.out_dir, specs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
