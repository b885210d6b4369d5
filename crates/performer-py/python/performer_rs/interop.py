"""Moving models between performer-pytorch and performer_rs.

`from_torch(module)` rebuilds a performer-pytorch module (PerformerLM, Performer,
PerformerEncDec, SelfAttention, CrossAttention, FastAttention or AutoregressiveWrapper) here:
performer-pytorch keeps no record of its constructor's keyword arguments, so they are read back
from the module's submodules and shapes (every knob of the README: heads, dim_head, local
heads per layer, window size, feature count, kernel, reversible, ff_chunks, GLU, norms, shift
tokens, position embeddings, dropouts, biases, redraw interval, ...). Keyword arguments given to
`from_torch(module, **kwargs)` take precedence over what is read back, for a module built in a
way this reader does not know. The weights then load strictly by name, so a wrong guess is an
error, never a silently different model.

`to_torch_state_dict(model)` is the reverse: a state dict of torch tensors that the
performer-pytorch module of the same arguments loads with `load_state_dict`.
"""

from collections import OrderedDict

from . import _native

_KERNELS = {"relu", "gelu", "elu", "softplus", "sigmoid", "tanh", "silu"}


def _name(m):
    return type(m).__name__


def _find(module, class_names):
    return [m for m in module.modules() if _name(m) in class_names]


def _kernel(fast_attention):
    name = _name(fast_attention.kernel_fn).lower()
    if name not in _KERNELS:
        raise ValueError(f"from_torch: kernel_fn {_name(fast_attention.kernel_fn)} has no Rust "
                         f"counterpart (one of {sorted(_KERNELS)})")
    return name


def _fast_attention_kwargs(fa):
    return dict(dim_heads=fa.dim_heads, nb_features=fa.nb_features,
                ortho_scaling=fa.ortho_scaling, causal=fa.causal,
                generalized_attention=fa.generalized_attention, kernel_fn=_kernel(fa),
                no_projection=fa.no_projection)


def _attention_kwargs(a):
    fa = a.fast_attention
    dim_head = a.to_q.out_features // a.heads
    kw = dict(dim=a.to_q.in_features, causal=fa.causal, heads=a.heads, dim_head=dim_head,
              local_heads=a.heads - a.global_heads, nb_features=fa.nb_features,
              generalized_attention=fa.generalized_attention, kernel_fn=_kernel(fa),
              dropout=a.dropout.p, no_projection=fa.no_projection,
              qkv_bias=a.to_q.bias is not None, attn_out_bias=a.to_out.bias is not None)
    if a.local_attn is not None:
        kw["local_window_size"] = a.local_attn.window_size
    return kw


def _performer_kwargs(p):
    """Performer(...)'s keyword arguments, read from its layers."""
    selfs = _find(p.net, {"SelfAttention"})
    if not selfs:
        raise ValueError("from_torch: found no SelfAttention layer in the Performer")
    a = _attention_kwargs(selfs[0])
    local = [s.heads - s.global_heads for s in selfs]
    ff = _find(p.net, {"FeedForward"})[0]
    chunks = _find(p.net, {"Chunk"})
    windows = [s.local_attn.window_size for s in selfs if s.local_attn is not None]
    kw = dict(
        dim=a["dim"], depth=len(selfs), heads=a["heads"], dim_head=a["dim_head"],
        local_attn_heads=local[0] if len(set(local)) == 1 else local,
        causal=a["causal"], ff_mult=ff.w2.in_features // a["dim"],
        nb_features=a["nb_features"],
        reversible=_name(p.net) == "ReversibleSequence",
        ff_chunks=chunks[0].chunks if chunks else 1,
        generalized_attention=a["generalized_attention"], kernel_fn=a["kernel_fn"],
        use_scalenorm=bool(_find(p.net, {"PreScaleNorm"})),
        use_rezero=bool(_find(p.net, {"ReZero"})),
        ff_glu=ff.glu, ff_dropout=ff.dropout.p, attn_dropout=a["dropout"],
        cross_attend=bool(_find(p.net, {"CrossAttention"})),
        no_projection=a["no_projection"], auto_check_redraw=p.auto_check_redraw,
        qkv_bias=a["qkv_bias"], attn_out_bias=a["attn_out_bias"],
        shift_tokens=bool(_find(p.net, {"PreShiftTokens"})),
    )
    if windows:
        kw["local_window_size"] = windows[0]
    interval = p.proj_updater.feature_redraw_interval
    if interval is not None:
        kw["feature_redraw_interval"] = interval
    return kw, interval is None


def _lm_kwargs(lm):
    kw, fixed = _performer_kwargs(lm.performer)
    pos = _name(lm.pos_emb)
    kw.update(
        num_tokens=lm.token_emb.num_embeddings, max_seq_len=lm.max_seq_len,
        emb_dropout=lm.dropout.p, tie_embed=lm.to_out is None,
        rotary_position_emb=pos == "FixedPositionalEmbedding",
        axial_position_emb=pos == "AxialPositionalEmbedding",
    )
    if pos == "AxialPositionalEmbedding":
        kw["axial_position_shape"] = list(lm.pos_emb.shape)
    return kw, fixed


def _enc_dec_kwargs(ed):
    enc, enc_fixed = _lm_kwargs(ed.enc)
    dec, dec_fixed = _lm_kwargs(ed.dec.net)
    kw = dict(dim=enc.pop("dim"), no_projection=enc.pop("no_projection"),
              ignore_index=ed.dec.ignore_index, pad_value=ed.dec.pad_value,
              tie_token_embeds=ed.enc.token_emb is ed.dec.net.token_emb)
    for k in ("dim", "no_projection", "causal", "cross_attend"):
        dec.pop(k)
    kw.update({f"enc_{k}": v for k, v in enc.items()})
    kw.update({f"dec_{k}": v for k, v in dec.items()})
    return kw, enc_fixed or dec_fixed


def _numpy_state(module):
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def from_torch(module, **kwargs):
    """The performer_rs model of a performer-pytorch `module`, with its weights and mode
    (training or eval, fixed projections). `kwargs` override the constructor arguments read
    back from the module."""
    name = _name(module)
    fixed = False
    if name == "AutoregressiveWrapper":
        net = from_torch(module.net, **kwargs)
        return _native.AutoregressiveWrapper(net, ignore_index=module.ignore_index,
                                             pad_value=module.pad_value)
    if name == "PerformerLM":
        read, fixed = _lm_kwargs(module)
    elif name == "Performer":
        read, fixed = _performer_kwargs(module)
    elif name == "PerformerEncDec":
        read, fixed = _enc_dec_kwargs(module)
    elif name in ("SelfAttention", "CrossAttention"):
        read = _attention_kwargs(module)
    elif name == "FastAttention":
        read = _fast_attention_kwargs(module)
    else:
        raise TypeError(f"from_torch: `module` must be a performer-pytorch PerformerLM, Performer, "
                        f"PerformerEncDec, SelfAttention, CrossAttention, FastAttention or "
                        f"AutoregressiveWrapper, not {name}")
    read.update(kwargs)
    model = getattr(_native, name)(**read)
    model.load_state_dict(_numpy_state(module))
    model.train(module.training)
    if fixed:
        model.fix_projection_matrices_()
    return model


def to_torch_state_dict(model):
    """`model.state_dict()` as torch tensors (an OrderedDict, the aliases PyTorch lists
    included), for `torch_module.load_state_dict(...)`. Needs torch."""
    import torch

    return OrderedDict((k, torch.from_numpy(v.copy())) for k, v in model.state_dict().items())
