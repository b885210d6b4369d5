"""performer_rs: the Performer (FAVOR+ linear attention) in Rust, with performer-pytorch's
classes and keyword arguments.

    from performer_rs import PerformerLM
    model = PerformerLM(num_tokens=256, max_seq_len=1024, dim=256, depth=4, heads=4, causal=True)
    logits = model(np.random.randint(0, 256, (1, 1024)))   # numpy (1, 1024, 256)

Inputs are anything numpy reads (numpy arrays, lists, CPU torch tensors); masks are bool
arrays; outputs are numpy arrays. The GIL is released while Rust computes. Errors raise
ValueError / TypeError / RuntimeError / OSError with the Rust message, which names the
argument.
"""

from ._native import (
    AutoregressiveWrapper,
    CrossAttention,
    FastAttention,
    Loss,
    Performer,
    PerformerEncDec,
    PerformerLM,
    SelfAttention,
    Trainer,
    bf16_products,
    set_bf16_products,
)
from .filters import top_k, top_p
from .interop import from_torch, to_torch_state_dict

__all__ = [
    "AutoregressiveWrapper",
    "CrossAttention",
    "FastAttention",
    "Loss",
    "Performer",
    "PerformerEncDec",
    "PerformerLM",
    "SelfAttention",
    "Trainer",
    "bf16_products",
    "from_torch",
    "set_bf16_products",
    "to_torch_state_dict",
    "top_k",
    "top_p",
]
