"""Bad inputs raise Python exceptions (ValueError / TypeError / RuntimeError) whose message
names the argument, never a crash of the interpreter."""

import numpy as np
import pytest

import performer_rs as pr

LM = dict(num_tokens=50, max_seq_len=32, dim=16, depth=1, heads=2, dim_head=8, causal=True)


def lm():
    return pr.PerformerLM(**LM)


def tokens(n=8, b=2):
    return np.random.default_rng(0).integers(0, 50, (b, n))


def trainer_with_lr(lr):
    return pr.Trainer(lm(), lr=lr)


CASES = [
    # (name, call, exception, words the message must contain)
    ("unknown kwarg", lambda: pr.PerformerLM(**LM, dimm=3), ValueError, ["dimm"]),
    ("mistyped kwarg", lambda: pr.PerformerLM(**{**LM, "dim": "ten"}), ValueError, ["dim"]),
    ("non-JSON kwarg", lambda: pr.PerformerLM(**{**LM, "dim": object()}), TypeError, ["dim"]),
    ("unknown kernel_fn", lambda: pr.PerformerLM(**LM, kernel_fn="mish"), ValueError,
     ["kernel_fn"]),
    ("bad attention kwarg", lambda: pr.SelfAttention(dim=16, hedas=2), ValueError, ["hedas"]),
    ("bad FastAttention kwarg", lambda: pr.FastAttention(dim_heads=8, causall=True), ValueError,
     ["causall"]),
    ("float token ids", lambda: lm()(tokens().astype(np.float32)), TypeError, ["x", "integer"]),
    ("string input", lambda: lm()("hello"), TypeError, ["x"]),
    ("token ids of rank 1", lambda: lm()(np.arange(8)), ValueError, ["x", "2 dimensions"]),
    ("token id out of range", lambda: lm()(tokens() + 50), ValueError, ["token ids", "50"]),
    ("negative token id", lambda: lm()(-tokens() - 1), ValueError, ["token ids"]),
    ("sequence longer than max_seq_len", lambda: lm()(tokens(n=40)), ValueError, ["40"]),
    ("int mask", lambda: lm()(tokens(), mask=np.ones((2, 8), dtype=np.int64)), TypeError,
     ["mask", "bool"]),
    ("mask of the wrong shape", lambda: lm()(tokens(), mask=np.ones((2, 5), dtype=bool)),
     ValueError, ["mask"]),
    ("Performer x of the wrong width",
     lambda: pr.Performer(dim=16, depth=1, heads=2, dim_head=8)(np.zeros((1, 4, 12), np.float32)),
     ValueError, ["12"]),
    ("FastAttention q of rank 3",
     lambda: pr.FastAttention(dim_heads=8)(*(np.zeros((1, 4, 8), np.float32),) * 3), ValueError,
     ["q", "4 dimensions"]),
    ("int q", lambda: pr.FastAttention(dim_heads=8)(*(np.zeros((1, 2, 4, 8), np.int32),) * 3),
     TypeError, ["q", "float"]),
    ("SelfAttention given a context",
     lambda: pr.SelfAttention(dim=16, heads=2)(np.zeros((1, 4, 16), np.float32),
                                               context=np.zeros((1, 4, 16), np.float32)),
     ValueError, ["context"]),
    ("EncDec float targets",
     lambda: pr.PerformerEncDec(dim=16, enc_num_tokens=10, enc_depth=1, enc_heads=2,
                                enc_max_seq_len=8, dec_num_tokens=10, dec_depth=1, dec_heads=2,
                                dec_max_seq_len=8)(np.zeros((1, 4), np.int64),
                                                   np.zeros((1, 4), np.float32)),
     TypeError, ["y"]),
    ("generate temperature 0",
     lambda: pr.AutoregressiveWrapper(lm()).generate(tokens(2), 4, temperature=0.0), ValueError,
     ["temperature"]),
    ("generate with an unknown filter",
     lambda: pr.AutoregressiveWrapper(lm()).generate(tokens(2), 4, filter_logits_fn=np.sort),
     ValueError, ["filter_logits_fn"]),
    ("generate filter_thres above 1",
     lambda: pr.AutoregressiveWrapper(lm()).generate(tokens(2), 4, filter_thres=1.5), ValueError,
     ["filter_thres"]),
    ("loss of one token", lambda: pr.AutoregressiveWrapper(lm())(tokens(n=1)), ValueError,
     ["sequence length"]),
    ("state dict with a key missing",
     lambda: lm().load_state_dict({k: v for k, v in list(lm().state_dict().items())[1:]}),
     RuntimeError, ["missing keys"]),
    ("state dict with a bool array",
     lambda: lm().load_state_dict({**lm().state_dict(), "norm.weight": np.ones(16, bool)}),
     TypeError, ["norm.weight"]),
    ("state dict of the wrong shape",
     lambda: lm().load_state_dict({**lm().state_dict(), "norm.weight": np.ones(3, np.float32)}),
     RuntimeError, ["norm.weight"]),
    ("state dict not a dict", lambda: lm().load_state_dict([1, 2]), TypeError, ["state_dict"]),
    ("Trainer lr 0", lambda: trainer_with_lr(0.0), ValueError, ["lr"]),
    ("Trainer of a layer", lambda: pr.Trainer(pr.SelfAttention(dim=16, heads=2)), TypeError,
     ["model"]),
    ("Trainer optimizer name", lambda: pr.Trainer(lm(), optimizer="sgd"), ValueError,
     ["optimizer"]),
    ("from_pretrained of a missing directory",
     lambda: pr.PerformerLM.from_pretrained("/nonexistent/performer_rs"), OSError,
     ["config.json"]),
]


@pytest.mark.parametrize("call,exc,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"


def test_at_least_ten_kinds():
    assert len(CASES) >= 10
