"""Type stubs of performer_rs's native classes. Knob descriptions follow performer-pytorch's
README; every keyword argument keeps performer-pytorch 1.1.4's name and default, and an
unknown name or a value of the wrong type raises an error naming it."""

from os import PathLike
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

ArrayLike = npt.ArrayLike
KernelFn = Union[str, Any]  # "relu", "gelu", ... or a torch.nn activation module
Filter = Union[str, Callable[..., Any], None]

class _Module:
    def train(self, mode: bool = True) -> "_Module":
        """Training mode (dropout on, projection redraws counted); returns the module."""
    def eval(self) -> "_Module":
        """Evaluation mode; returns the module."""
    @property
    def training(self) -> bool: ...
    def state_dict(self) -> Dict[str, np.ndarray]:
        """Parameters and buffers by performer-pytorch's names, the `proj_updater.instance.*`
        aliases included, as numpy arrays (float32; int64 redraw counters)."""
    def load_state_dict(
        self, state_dict: Dict[str, ArrayLike], strict: bool = True
    ) -> Tuple[List[str], List[str]]:
        """Loads numpy arrays or torch tensors by name; returns (missing_keys,
        unexpected_keys). With strict=True (the default) both must be empty."""
    def named_parameter_shapes(self) -> List[Tuple[str, List[int]]]: ...
    def num_parameters(self) -> int: ...

class PerformerLM(_Module):
    def __init__(
        self,
        *,
        num_tokens: int,
        max_seq_len: int,  # max sequence length
        dim: int,  # dimension
        depth: int,  # layers
        heads: int,  # heads
        dim_head: int = 64,
        local_attn_heads: Union[int, Sequence[int]] = 0,  # heads that are local attention (per layer with a list)
        local_window_size: int = 256,  # window size of local attention
        causal: bool = False,  # auto-regressive or not
        ff_mult: int = 4,
        nb_features: Optional[int] = None,  # number of random features; default d * log(d), d = dim_head
        feature_redraw_interval: int = 1000,  # how often to redraw the projection matrix
        reversible: bool = False,  # reversible layers, from the Reformer paper
        ff_chunks: int = 1,  # chunk the feedforward layer, from the Reformer paper
        ff_glu: bool = False,  # GLU variant of the feedforward
        emb_dropout: float = 0.0,  # embedding dropout
        ff_dropout: float = 0.0,  # feedforward dropout
        attn_dropout: float = 0.0,  # post-attention dropout
        generalized_attention: bool = False,  # generalized attention instead of the softmax approximation
        kernel_fn: KernelFn = "relu",  # the kernel of generalized attention
        use_scalenorm: bool = False,  # ScaleNorm, from 'Transformers without Tears'
        use_rezero: bool = False,  # ReZero, from 'ReZero is all you need'
        cross_attend: bool = False,
        no_projection: bool = False,
        tie_embed: bool = False,  # logits through the token embedding, like a GPT decoder
        rotary_position_emb: bool = True,  # rotary position embedding (relative positions)
        axial_position_emb: bool = False,
        axial_position_shape: Optional[Sequence[int]] = None,
        auto_check_redraw: bool = True,
        qkv_bias: bool = False,
        attn_out_bias: bool = False,
        shift_tokens: bool = False,
    ) -> None: ...
    def forward(
        self,
        x: ArrayLike,
        mask: Optional[ArrayLike] = None,
        return_encodings: bool = False,
        context: Optional[ArrayLike] = None,
        context_mask: Optional[ArrayLike] = None,
    ) -> np.ndarray:
        """Logits (b, n, num_tokens) of token ids x (b, n); (b, n, dim) encodings with
        return_encodings. mask (b, n) is a bool array, True where a token is real."""
    __call__ = forward
    def fix_projection_matrices_(self) -> None:
        """Fixes the projection matrices: the model outputs deterministically from now on."""
    def to_dtype(self, dtype: Any) -> "PerformerLM":
        """Stores the weight matrices as "bfloat16" (or torch.bfloat16) for inference, f32
        activations and sums (on a CPU with AVX-512 BF16 each activation is rounded to bf16
        as it enters a product with a weight), or "float32" back; returns the model.
        Optimizers refuse a bfloat16 model (ValueError)."""
    @property
    def dtype(self) -> str:
        """How the weight matrices are stored: "float32" or "bfloat16"."""
    @property
    def config(self) -> Dict[str, Any]: ...
    @property
    def max_seq_len(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    def gradients(self) -> Dict[str, np.ndarray]:
        """The gradients of the last Loss.backward() of a loss of this model, by name."""
    def save_pretrained(self, path: Union[str, PathLike]) -> None:
        """config.json (class and keyword arguments) and model.safetensors into path."""
    @staticmethod
    def from_pretrained(path: Union[str, PathLike]) -> "PerformerLM": ...

class Performer(_Module):
    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int = 64,
        local_attn_heads: Union[int, Sequence[int]] = 0,
        local_window_size: int = 256,
        causal: bool = False,
        ff_mult: int = 4,
        nb_features: Optional[int] = None,
        feature_redraw_interval: int = 1000,
        reversible: bool = False,
        ff_chunks: int = 1,
        generalized_attention: bool = False,
        kernel_fn: KernelFn = "relu",
        use_scalenorm: bool = False,
        use_rezero: bool = False,
        ff_glu: bool = False,
        ff_dropout: float = 0.0,
        attn_dropout: float = 0.0,
        cross_attend: bool = False,
        no_projection: bool = False,
        auto_check_redraw: bool = True,
        qkv_bias: bool = True,
        attn_out_bias: bool = True,
        shift_tokens: bool = False,
    ) -> None: ...
    def forward(
        self,
        x: ArrayLike,
        mask: Optional[ArrayLike] = None,
        context: Optional[ArrayLike] = None,
        context_mask: Optional[ArrayLike] = None,
    ) -> np.ndarray:
        """(b, n, dim) for float x (b, n, dim)."""
    __call__ = forward
    def fix_projection_matrices_(self) -> None: ...
    @property
    def config(self) -> Dict[str, Any]: ...
    def save_pretrained(self, path: Union[str, PathLike]) -> None: ...
    @staticmethod
    def from_pretrained(path: Union[str, PathLike]) -> "Performer": ...

class Loss:
    """A scalar loss: float(loss), loss.item(), and loss.backward(), which stores the
    gradients in the model's gradients()."""
    def item(self) -> float: ...
    def __float__(self) -> float: ...
    def backward(self) -> None: ...

class PerformerEncDec(_Module):
    def __init__(self, *, dim: int, ignore_index: int = 0, pad_value: int = 0,
                 tie_token_embeds: bool = False, no_projection: bool = False,
                 **enc_dec_kwargs: Any) -> None:
        """enc_* and dec_* keyword arguments are PerformerLM's, for the encoder and the
        decoder (the decoder is always causal and cross-attending)."""
    def forward(self, x: ArrayLike, y: ArrayLike, enc_mask: Optional[ArrayLike] = None,
                dec_mask: Optional[ArrayLike] = None) -> Loss:
        """The decoder's next-token loss on targets y given the source x."""
    __call__ = forward
    def generate(self, seq_in: ArrayLike, seq_out_start: ArrayLike, seq_len: int,
                 enc_mask: Optional[ArrayLike] = None, eos_token: Optional[int] = None,
                 temperature: float = 1.0, filter_logits_fn: Filter = None,
                 filter_thres: float = 0.9, repetition_penalty: float = 1.0,
                 repetition_penalty_ctx: int = 32, seed: Optional[int] = None) -> np.ndarray: ...
    def fix_projection_matrices_(self) -> None: ...
    @property
    def config(self) -> Dict[str, Any]: ...
    def gradients(self) -> Dict[str, np.ndarray]: ...
    def save_pretrained(self, path: Union[str, PathLike]) -> None: ...
    @staticmethod
    def from_pretrained(path: Union[str, PathLike]) -> "PerformerEncDec": ...

class SelfAttention(_Module):
    def __init__(self, *, dim: int, causal: bool = False, heads: int = 8, dim_head: int = 64,
                 local_heads: int = 0, local_window_size: int = 256,
                 nb_features: Optional[int] = None, feature_redraw_interval: int = 1000,
                 generalized_attention: bool = False, kernel_fn: KernelFn = "relu",
                 dropout: float = 0.0, no_projection: bool = False, qkv_bias: bool = False,
                 attn_out_bias: bool = True) -> None: ...
    def __call__(self, x: ArrayLike, mask: Optional[ArrayLike] = None,
                 context: None = None, context_mask: Optional[ArrayLike] = None) -> np.ndarray:
        """(b, n, dim) for x (b, n, dim), attention in linear time."""

class CrossAttention(_Module):
    def __init__(self, *, dim: int, causal: bool = False, heads: int = 8, dim_head: int = 64,
                 nb_features: Optional[int] = None, generalized_attention: bool = False,
                 kernel_fn: KernelFn = "relu", dropout: float = 0.0,
                 no_projection: bool = False, qkv_bias: bool = False,
                 attn_out_bias: bool = True, **kwargs: Any) -> None: ...
    def __call__(self, x: ArrayLike, context: Optional[ArrayLike] = None,
                 mask: Optional[ArrayLike] = None,
                 context_mask: Optional[ArrayLike] = None) -> np.ndarray:
        """(b, n, dim): x (b, n, dim) attending to context (b, nc, dim)."""

class FastAttention(_Module):
    def __init__(self, *, dim_heads: int, nb_features: Optional[int] = None,
                 ortho_scaling: int = 0, causal: bool = False,
                 generalized_attention: bool = False, kernel_fn: KernelFn = "relu",
                 no_projection: bool = False) -> None: ...
    def __call__(self, q: ArrayLike, k: ArrayLike, v: ArrayLike) -> np.ndarray:
        """(b, h, n, d): queries, keys and values with the heads split."""
    def redraw_projection_matrix(self) -> None: ...

class AutoregressiveWrapper(_Module):
    def __init__(self, net: PerformerLM, ignore_index: int = 0, pad_value: int = 0) -> None: ...
    @property
    def net(self) -> PerformerLM: ...
    @property
    def ignore_index(self) -> int: ...
    @property
    def pad_value(self) -> int: ...
    @property
    def max_seq_len(self) -> int: ...
    def forward(self, x: ArrayLike, mask: Optional[ArrayLike] = None,
                context: Optional[ArrayLike] = None,
                context_mask: Optional[ArrayLike] = None) -> Loss:
        """Cross-entropy of predicting x[:, 1:] from x[:, :-1]."""
    __call__ = forward
    def generate(self, start_tokens: ArrayLike, seq_len: int, eos_token: Optional[int] = None,
                 temperature: float = 1.0, filter_logits_fn: Filter = None,
                 filter_thres: float = 0.9, repetition_penalty: float = 1.0,
                 repetition_penalty_ctx: int = 32, mask: Optional[ArrayLike] = None,
                 context: Optional[ArrayLike] = None, context_mask: Optional[ArrayLike] = None,
                 seed: Optional[int] = None) -> np.ndarray:
        """Up to seq_len sampled tokens after start_tokens (b, t) or (t,). filter_logits_fn is
        top_k (None, the default) or top_p; seed makes the sampling reproducible."""

class Trainer:
    def __init__(self, model: Union[PerformerLM, AutoregressiveWrapper, PerformerEncDec],
                 lr: float = 1e-3, clip: Optional[float] = None, weight_decay: float = 0.0,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 optimizer: str = "adamw") -> None:
        """Adam or AdamW (optimizer="adam"/"adamw") over every parameter of model; clip is
        the maximum gradient norm."""
    def step(self, batch: Any, mask: Optional[ArrayLike] = None) -> float:
        """Forward, backward, clipping and the update in Rust; returns the loss. batch is
        token ids (b, n), or a (source, target) tuple for a PerformerEncDec."""
    lr: float
    @property
    def steps(self) -> int: ...
    def save(self, path: Union[str, PathLike]) -> None:
        """The optimizer's state (moments, step count) as safetensors."""
    def load(self, path: Union[str, PathLike]) -> None: ...


def set_bf16_products(mode: str) -> str:
    """Sets how a bfloat16 model's products run for calls from this Python thread and returns
    the previous mode: "native" (the default: on a CPU with AVX-512 BF16 its bf16 dot
    products, each activation rounded to bf16 as it enters a product with a weight; elsewhere
    the same as "widened") or "widened" (weights widened to float32: exactly a float32 model
    with the same rounded weights). Another name raises ValueError."""

def bf16_products() -> str:
    """This Python thread's mode for bfloat16 products: "native" or "widened"."""
