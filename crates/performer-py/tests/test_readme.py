"""The seed README's Python snippets (performer-pytorch's README, ../shared/seed) with
`performer_pytorch` replaced by `performer_rs`, `torch.randint` / `torch.ones_like` /
`torch.randn` by numpy, `.cuda()` dropped and `kernel_fn = nn.ReLU()` written
`kernel_fn = "relu"`; otherwise as written, at their sizes, checked for the shapes their
comments give.

Two keyword arguments of the README are not performer-pytorch 1.1.4's own names:
`PerformerLM(tie_embedding = False)` (1.1.4 says `tie_embed`; it raises TypeError there) and
`PerformerEncDec(tie_token_embed = True)` (1.1.4 says `tie_token_embeds`; it silently drops
the misspelled one there). performer_rs refuses unknown names, naming them (tested below), so
the snippets here use the real names."""

import numpy as np
import pytest

import performer_rs


def test_performer_lm_snippet():
    from performer_rs import PerformerLM

    model = PerformerLM(
        num_tokens = 20000,
        max_seq_len = 2048,             # max sequence length
        dim = 512,                      # dimension
        depth = 12,                     # layers
        heads = 8,                      # heads
        causal = False,                 # auto-regressive or not
        nb_features = 256,              # number of random features, if not set, will default to (d * log(d)), where d is the dimension of each head
        feature_redraw_interval = 1000, # how frequently to redraw the projection matrix, the more frequent, the slower the training
        generalized_attention = False,  # defaults to softmax approximation, but can be set to True for generalized attention
        kernel_fn = "relu",             # the kernel function to be used, if generalized attention is turned on, defaults to Relu
        reversible = True,              # reversible layers, from Reformer paper
        ff_chunks = 10,                 # chunk feedforward layer, from Reformer paper
        use_scalenorm = False,          # use scale norm, from 'Transformers without Tears' paper
        use_rezero = False,             # use rezero, from 'Rezero is all you need' paper
        tie_embed = False,              # multiply final embeddings with token weights for logits, like gpt decoder
        ff_glu = True,                  # use GLU variant for feedforward
        emb_dropout = 0.1,              # embedding dropout
        ff_dropout = 0.1,               # feedforward dropout
        attn_dropout = 0.1,             # post-attn dropout
        local_attn_heads = 4,           # 4 heads are local attention, 4 others are global performers
        local_window_size = 256,        # window size of local attention
        rotary_position_emb = True      # use rotary positional embedding, which endows linear attention with relative positional encoding with no learned parameters. should always be turned on unless if you want to go back to old absolute positional encoding
    )

    x = np.random.randint(0, 20000, (1, 2048))
    mask = np.ones_like(x).astype(bool)

    out = model(x, mask = mask) # (1, 2048, 20000)
    assert out.shape == (1, 2048, 20000)

    # "Advanced": fixed projections give a deterministic model
    model.eval()
    model.fix_projection_matrices_()
    np.testing.assert_array_equal(model(x[:, :64]), model(x[:, :64]))


def test_performer_snippet():
    from performer_rs import Performer

    model = Performer(
        dim = 512,
        depth = 1,
        heads = 8,
        causal = True
    )

    x = np.random.randn(1, 2048, 512)
    assert model(x).shape == (1, 2048, 512) # (1, 2048, 512)


def test_enc_dec_snippet():
    from performer_rs import PerformerEncDec

    SRC_SEQ_LEN = 4096
    TGT_SEQ_LEN = 4096
    GENERATE_LEN = 512

    enc_dec = PerformerEncDec(
        dim = 512,
        tie_token_embeds = True,
        enc_num_tokens = 20000,
        enc_depth = 6,
        enc_heads = 8,
        enc_max_seq_len = SRC_SEQ_LEN,
        dec_num_tokens = 20000,
        dec_depth = 6,
        dec_heads = 8,
        dec_max_seq_len = TGT_SEQ_LEN
    )

    src = np.random.randint(0, 20000, (1, SRC_SEQ_LEN))
    tgt = np.random.randint(0, 20000, (1, TGT_SEQ_LEN))
    src_mask = np.ones_like(src).astype(bool)
    tgt_mask = np.ones_like(src).astype(bool)

    # train
    enc_dec.train()
    loss = enc_dec(src, tgt, enc_mask = src_mask, dec_mask = tgt_mask)
    loss.backward()
    assert np.isfinite(float(loss))
    assert "enc.token_emb.weight" in enc_dec.gradients()

    # generate
    generate_in = np.random.randint(0, 20000, (1, SRC_SEQ_LEN)).astype(np.int64)
    generate_out_prime = np.array([[0.]]).astype(np.int64) # prime with <bos> token
    samples = enc_dec.generate(generate_in, generate_out_prime, seq_len = GENERATE_LEN, eos_token = 1) # assume 1 is id of stop token
    print(samples.shape) # (1, <= GENERATE_LEN) decode the tokens
    assert samples.shape[0] == 1 and 1 <= samples.shape[1] <= GENERATE_LEN


def test_self_attention_snippet():
    from performer_rs import SelfAttention

    attn = SelfAttention(
        dim = 512,
        heads = 8,
        causal = False
    )

    x = np.random.randn(1, 1024, 512)
    assert attn(x).shape == (1, 1024, 512) # (1, 1024, 512)


def test_cross_attention_snippet():
    from performer_rs import CrossAttention

    attn = CrossAttention(
        dim = 512,
        heads = 8
    )

    x = np.random.randn(1, 1024, 512)
    context = np.random.randn(1, 512, 512)

    assert attn(x, context = context).shape == (1, 1024, 512) # (1, 1024, 512)


def test_fast_attention_snippet():
    from performer_rs import FastAttention

    # queries / keys / values with heads already split and transposed to first dimension
    # 8 heads, dimension of head is 64, sequence length of 512
    q = np.random.randn(1, 8, 512, 64)
    k = np.random.randn(1, 8, 512, 64)
    v = np.random.randn(1, 8, 512, 64)

    attn_fn = FastAttention(
        dim_heads = 64,
        nb_features = 256,
        causal = False
    )

    out = attn_fn(q, k, v) # (1, 8, 512, 64)
    assert out.shape == (1, 8, 512, 64)


@pytest.mark.parametrize("cls,kwargs,name", [
    (performer_rs.PerformerLM, dict(num_tokens=10, max_seq_len=8, dim=8, depth=1, heads=1,
                                    tie_embedding=False), "tie_embedding"),
    (performer_rs.PerformerEncDec, dict(dim=8, tie_token_embed=True, enc_num_tokens=10,
                                        enc_depth=1, enc_heads=1, enc_max_seq_len=8,
                                        dec_num_tokens=10, dec_depth=1, dec_heads=1,
                                        dec_max_seq_len=8), "tie_token_embed"),
])
def test_the_readmes_misspelled_arguments_are_refused(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)
