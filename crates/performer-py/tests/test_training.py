"""Training from Python: the wrapper's loss is performer-pytorch's (cross-entropy of the
shifted targets, ignore_index), Trainer steps lower it and resume exactly from saved state,
checkpoints round-trip, generation is seeded, and the GIL is released while Rust computes."""

import array
import math
import threading
import time

import numpy as np
import pytest

import performer_rs as pr

KW = dict(num_tokens=30, max_seq_len=32, dim=16, depth=2, heads=2, dim_head=8, causal=True)


def batch(seed=0, b=4, n=17):
    return np.random.default_rng(seed).integers(1, 30, (b, n))


def reference_loss(logits, targets, ignore_index):
    logits = logits.astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, targets[..., None].clip(0), -1)[..., 0]
    keep = targets != ignore_index
    return float(-(picked * keep).sum() / keep.sum())


@pytest.mark.parametrize("ignore_index", [0, 5])
def test_wrapper_loss_is_the_shifted_cross_entropy(ignore_index):
    model = pr.PerformerLM(**KW).eval()
    x = batch()
    x[0, 3] = 5  # a target that ignore_index=5 skips
    loss = pr.AutoregressiveWrapper(model, ignore_index=ignore_index)(x)
    want = reference_loss(model(x[:, :-1]), x[:, 1:], ignore_index)
    assert abs(loss.item() - want) <= 1e-5 * abs(want)


def test_loss_backward_fills_the_gradients():
    model = pr.PerformerLM(**KW)
    loss = pr.AutoregressiveWrapper(model)(batch())
    assert model.gradients() == {}
    loss.backward()
    grads = model.gradients()
    assert set(grads) == {n for n, _ in model.named_parameter_shapes()}
    assert all(np.isfinite(g).all() for g in grads.values())
    assert any(np.abs(g).max() > 0 for g in grads.values())


def test_trainer_lowers_the_loss():
    model = pr.PerformerLM(**KW)
    trainer = pr.Trainer(pr.AutoregressiveWrapper(model), lr=3e-3, clip=1.0, weight_decay=0.01)
    x = batch()
    losses = [trainer.step(x) for _ in range(30)]
    assert trainer.steps == 30
    assert losses[-1] < 0.7 * losses[0], losses
    assert model.training


def test_trainer_resumes_exactly(tmp_path):
    x1, x2 = batch(1), batch(2)
    ref_model = pr.PerformerLM(**KW)
    ref_model.fix_projection_matrices_()
    ref_model.save_pretrained(tmp_path / "init")
    ref = pr.Trainer(ref_model, lr=1e-3, clip=0.5)
    want = [ref.step(x) for x in (x1, x2, x1, x2)]

    model = pr.PerformerLM.from_pretrained(str(tmp_path / "init"))
    model.fix_projection_matrices_()
    trainer = pr.Trainer(model, lr=1e-3, clip=0.5)
    first = [trainer.step(x) for x in (x1, x2)]
    model.save_pretrained(str(tmp_path / "mid"))
    trainer.save(str(tmp_path / "mid" / "optimizer.safetensors"))

    resumed = pr.PerformerLM.from_pretrained(str(tmp_path / "mid"))
    resumed.fix_projection_matrices_()
    again = pr.Trainer(resumed, lr=1e-3, clip=0.5)
    again.load(str(tmp_path / "mid" / "optimizer.safetensors"))
    assert again.steps == 2
    rest = [again.step(x) for x in (x1, x2)]
    assert first + rest == want
    # Without the optimizer state the run goes elsewhere (the check above can fail).
    fresh = pr.PerformerLM.from_pretrained(str(tmp_path / "mid"))
    fresh.fix_projection_matrices_()
    cold = pr.Trainer(fresh, lr=1e-3, clip=0.5)
    assert [cold.step(x) for x in (x1, x2)] != rest


def test_enc_dec_trainer_takes_pairs():
    model = pr.PerformerEncDec(dim=16, enc_num_tokens=20, enc_depth=1, enc_heads=2,
                               enc_max_seq_len=16, dec_num_tokens=20, dec_depth=1, dec_heads=2,
                               dec_max_seq_len=16)
    trainer = pr.Trainer(model, lr=3e-3)
    src = np.random.default_rng(0).integers(1, 20, (2, 16))
    losses = [trainer.step((src, src)) for _ in range(20)]
    assert losses[-1] < losses[0]
    with pytest.raises(TypeError, match="batch"):
        trainer.step(src)


@pytest.mark.parametrize("cls,kwargs,make_input", [
    (pr.PerformerLM, KW, lambda: batch()),
    (pr.Performer, dict(dim=16, depth=1, heads=2, dim_head=8, reversible=True),
     lambda: np.random.default_rng(0).standard_normal((2, 8, 16)).astype(np.float32)),
])
def test_save_and_load_pretrained(tmp_path, cls, kwargs, make_input):
    model = cls(**kwargs).eval()
    model.fix_projection_matrices_()
    model.save_pretrained(str(tmp_path))
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    back = cls.from_pretrained(str(tmp_path)).eval()
    x = make_input()
    np.testing.assert_array_equal(model(x), back(x))
    assert back.config == model.config
    with pytest.raises(ValueError, match="not a"):
        (pr.Performer if cls is pr.PerformerLM else pr.PerformerLM).from_pretrained(str(tmp_path))


def test_state_dict_round_trip_and_non_strict_load():
    a, b = pr.PerformerLM(**KW), pr.PerformerLM(**KW)
    state = a.state_dict()
    assert any("proj_updater.instance" in k for k in state)  # PyTorch's aliases
    assert state["performer.proj_updater.calls_since_last_redraw"].dtype == np.int64
    b.load_state_dict(state)
    x = batch()
    np.testing.assert_array_equal(a.eval()(x), b.eval()(x))
    partial = {"norm.weight": np.full(16, 2.0, np.float32), "bogus": np.zeros(1, np.float32)}
    missing, unexpected = b.load_state_dict(partial, strict=False)
    assert unexpected == ["bogus"] and "norm.bias" in missing
    assert (b.state_dict()["norm.weight"] == 2.0).all()


def test_generate_is_seeded_and_one_dimensional_starts_stay_so():
    wrapper = pr.AutoregressiveWrapper(pr.PerformerLM(**KW))
    start = batch(n=4)
    a = wrapper.generate(start, 10, seed=3)
    assert a.shape == (4, 10) and a.dtype == np.int64
    np.testing.assert_array_equal(a, wrapper.generate(start, 10, seed=3))
    assert (wrapper.generate(start, 10, seed=4) != a).any()
    one = wrapper.generate(start[0], 10, seed=3, filter_logits_fn=pr.top_p, filter_thres=0.5)
    assert one.shape == (10,)
    greedy = wrapper.generate(start, 5, filter_logits_fn="top_k", filter_thres=0.99)
    logits = wrapper.net.eval()(start)[:, -1]
    np.testing.assert_array_equal(greedy[:, 0], logits.argmax(-1))


def test_numpy_filters_keep_the_reference_counts():
    logits = np.random.default_rng(0).standard_normal((2, 20000)).astype(np.float32)
    # int((1 - 0.9) * 20000) = 1999 in Python floats
    assert (np.isfinite(pr.top_k(logits)).sum(-1) == 1999).all()
    kept = np.isfinite(pr.top_p(logits, 0.5)).sum(-1)
    assert (kept >= 1).all() and (kept < 20000).all()


def test_the_gil_is_released_during_compute():
    # A thread that held the GIL inside a native call would stop this loop for the whole call:
    # not one iteration could run between the call's start and its end. With the GIL released
    # the loop runs through the call. The check counts the loop's iterations inside the middle
    # half of each call (timestamps, not durations), so a loaded machine that runs the loop
    # slowly or the call slowly changes the count, not the verdict: held gives zero.
    model = pr.PerformerLM(num_tokens=64, max_seq_len=4096, dim=64, depth=2, heads=4,
                           dim_head=16, causal=True)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    model(rng.integers(0, 64, (1, 4096)))
    one = time.perf_counter() - t0
    # Size the batch so that a call lasts about 0.2 s here, whatever the machine's speed.
    batch = min(64, max(2, math.ceil(0.2 / max(one, 1e-3))))
    x = rng.integers(0, 64, (batch, 4096))
    done = threading.Event()
    calls = []

    def work():
        for _ in range(2):
            start = time.perf_counter()
            model(x)
            calls.append((start, time.perf_counter()))
        done.set()

    ticks = array.array("d")
    worker = threading.Thread(target=work)
    worker.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
    worker.join()
    assert len(calls) == 2
    for start, end in calls:
        quarter = (end - start) / 4
        inside = sum(1 for t in ticks if start + quarter < t < end - quarter)
        assert inside > 0, (
            f"the loop never ran during the middle half of a {end - start:.3f} s call "
            f"({len(ticks)} iterations in all): the call held the GIL"
        )


def test_attention_layers_take_their_first_argument_positionally():
    # as torch's constructors: SelfAttention(dim, ...), FastAttention(dim_heads, ...)
    x = np.zeros((1, 4, 32), np.float32)
    assert pr.SelfAttention(32, heads=4)(x).shape == (1, 4, 32)
    assert pr.CrossAttention(32, heads=4)(x, context=x).shape == (1, 4, 32)
    q = np.zeros((1, 2, 4, 8), np.float32)
    assert pr.FastAttention(8, nb_features=16)(q, q, q).shape == (1, 2, 4, 8)
    assert pr.SelfAttention(32, heads=4).state_dict().keys() == \
        pr.SelfAttention(dim=32, heads=4).state_dict().keys()


def test_bfloat16_weights_for_inference():
    model = pr.PerformerLM(**KW).eval()
    x = batch()
    ref = model(x)
    assert model.dtype == "float32"
    assert model.to_dtype("bfloat16") is model and model.dtype == "bfloat16"
    low = model(x)
    # weights rounded to bf16 (8 significant bits), activations and sums in f32 (on a CPU
    # with AVX-512 BF16, activations rounded to bf16 where they enter a product too)
    rel = np.abs(low - ref).max() / np.abs(ref).max()
    assert 0 < rel < 1e-2, rel
    with pytest.raises(Exception, match=r"inference only.*to_dtype.*Python: \"float32\""):
        pr.Trainer(pr.AutoregressiveWrapper(model), lr=1e-3).step(x)
    with pytest.raises(Exception, match="bfloat16"):
        model.to_dtype("float16")
    rounded = model.state_dict()
    model.to_dtype("float32")
    assert model.dtype == "float32"
    widened = model.state_dict()  # widening back is exact: the rounded weights, unchanged
    assert widened.keys() == rounded.keys()
    for name, value in rounded.items():
        np.testing.assert_array_equal(widened[name], value, err_msg=name)
    back = model(x)
    assert np.abs(back - low).max() / np.abs(ref).max() < 1e-2


def test_widened_bfloat16_products_are_the_float32_model_with_the_rounded_weights():
    model = pr.PerformerLM(**KW).eval().to_dtype("bfloat16")
    x = batch()
    assert pr.bf16_products() == "native"
    assert pr.set_bf16_products("widened") == "native"
    try:
        assert pr.bf16_products() == "widened"
        low = model(x)
        model.to_dtype("float32")
        np.testing.assert_array_equal(model(x), low)  # widening back is exact
    finally:
        assert pr.set_bf16_products("native") == "widened"
    with pytest.raises(ValueError, match=r"set_bf16_products: `mode` must be \"native\" or"):
        pr.set_bf16_products("fast")
    assert pr.bf16_products() == "native"

