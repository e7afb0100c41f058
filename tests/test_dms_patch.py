"""Model patching: base logits reproduced when nothing is evicted, shift by one, gradients, errors."""

import pytest
import torch
from tiny_models import tiny_model
from transformers import MistralConfig

from dms_core.config import DmsConfig
from pipeline.dms.losses import compression_loss
from pipeline.dms.patch import (
    UnsupportedModelError,
    check_architecture,
    dms_mode,
    patch_model,
    warm_start_borrowed,
)

SHAPE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, head_dim=8, vocab_size=50,
             tie_word_embeddings=False, initializer_range=0.02)


def tiny(family="qwen3", seed=0):
    return tiny_model(family, seed=seed, **SHAPE)


def ids(t=24, seed=0):
    return torch.randint(0, 50, (2, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_no_eviction_reproduces_base_logits(family):
    base = tiny(family)
    x = ids()
    want = base(x, use_cache=False).logits
    adapter = patch_model(tiny(family), DmsConfig(window_size=4, separate_alpha=True))
    with dms_mode(adapter, "hard") as rec:  # zero-initialised adapter: logit -5, nothing evicted
        got = adapter(x, use_cache=False).logits
    assert rec.stacked().sum() == 0
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    borrowed = patch_model(tiny(family), DmsConfig(window_size=4, separate_alpha=False))
    with dms_mode(borrowed, "teacher"):
        torch.testing.assert_close(borrowed(x, use_cache=False).logits, want, atol=1e-5, rtol=1e-5)
    with dms_mode(borrowed, "hard"):  # channel zeroed: the borrowed model is no longer the base model
        assert not torch.allclose(borrowed(x, use_cache=False).logits, want, atol=1e-4)


def test_shift_by_one_decision_at_t_evicts_key_t_minus_1():
    model = patch_model(tiny(), DmsConfig(window_size=2, separate_alpha=True, alpha_per="head"))
    attn = model.model.layers[0].self_attn
    torch.nn.init.normal_(attn.dms_proj_alpha.weight, std=0.2)
    seen = {}  # the decoder layer's residual-stream input: what the adapter reads (random norms tell)
    layer = model.model.layers[0]
    layer.register_forward_pre_hook(
        lambda m, a, kw: seen.update(h=a[0] if a else kw["hidden_states"]), with_kwargs=True
    )
    with dms_mode(model, "hard") as rec:
        model(ids(), use_cache=False)
    raw = (attn.dms_proj_alpha(attn.dms_proj_alpha_norm(seen["h"])) * 100 - 5).transpose(1, 2)  # [B, H, T]
    decided = rec.hard[0]
    assert torch.equal(decided[..., :-1], (raw[..., 1:] > 0).float())
    assert decided[..., -1].sum() == 0  # the last key has no decision yet: kept
    assert 0 < decided.sum() < decided.numel()


def test_per_layer_decisions_shared_by_heads():
    model = patch_model(tiny(), DmsConfig(window_size=2, separate_alpha=False, alpha_per="layer"))
    with dms_mode(model, "hard") as rec:
        model(ids(), use_cache=False)
    for hard in rec.hard:
        assert torch.equal(hard[:, 0], hard[:, 1])


@pytest.mark.parametrize("separate", [True, False])
def test_straight_through_gradients_reach_decision_parameters(separate):
    model = patch_model(tiny(), DmsConfig(window_size=2, separate_alpha=separate))
    gen = torch.Generator().manual_seed(0)
    with dms_mode(model, "train", generator=gen) as rec:
        model(ids(), use_cache=False)
    compression_loss(rec.stacked(), target_frac=0.9).backward()  # only the decisions feed this loss
    attn = model.model.layers[0].self_attn
    grad = attn.dms_proj_alpha.weight.grad if separate else attn.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("clip", [None, 5.0])
def test_logit_clip_revives_a_saturated_adapter(clip):
    """Adapter logits pushed to about -45 on every token: without the clip no gradient reaches the adapter
    (the dead-head failure); dms_mode's logit_clip lets the noise flip some decisions, which carry it."""
    # Zero-initialised adapters: the logit is -initial_alpha_offset on every token.
    model = patch_model(tiny(), DmsConfig(window_size=2, separate_alpha=True, initial_alpha_offset=45.0))
    gen = torch.Generator().manual_seed(0)
    with dms_mode(model, "train", generator=gen, logit_clip=clip) as rec:
        model(torch.randint(0, 50, (8, 256), generator=torch.Generator().manual_seed(1)), use_cache=False)
    compression_loss(rec.stacked(), target_frac=0.9).backward()
    grad = sum(float(layer.self_attn.dms_proj_alpha.weight.grad.abs().sum()) for layer in model.model.layers)
    assert (grad > 0) == (clip is not None)
    assert model.dms_runtime.logit_clip is None  # restored on exit


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_warm_start_puts_borrowed_logits_at_the_no_eviction_value(family):
    """Before training: every borrowed decision logit is exactly -offset (nothing evicted), and the model
    is the borrowed model with eviction off (Llama: exactly; Qwen3's q_norm after q_proj no longer counts
    the zeroed channel in its RMS, so that head's other channels move a little)."""
    x = ids(t=40)
    model = patch_model(tiny(family), DmsConfig(window_size=4, separate_alpha=False))
    with dms_mode(model, "hard") as rec:
        model(x, use_cache=False)
    assert (torch.stack(rec.logits) > 0).any()  # random q_proj: the borrowed channel evicts
    c = model.config
    assert warm_start_borrowed(model) == c.num_hidden_layers * c.num_key_value_heads  # a row per KV head
    with dms_mode(model, "hard") as rec:
        got = model(x, use_cache=False).logits
    logits = torch.stack(rec.logits)
    assert torch.equal(logits, torch.full_like(logits, -5.0)) and rec.stacked().sum() == 0
    off = DmsConfig(window_size=4, separate_alpha=False, disable_eviction=True)
    no_eviction = patch_model(tiny(family), off)
    with dms_mode(no_eviction, "hard"):
        want = no_eviction(x, use_cache=False).logits
    if family == "llama":
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        # head_dim 8 here: the RMS loses 1 of 8 channels (Qwen3's real heads: 1 of 128).
        assert 0 < (got - want).abs().max() < 0.1 * want.abs().max()


def test_warm_start_is_for_borrowed_decisions_only():
    with pytest.raises(ValueError, match="adapter"):
        warm_start_borrowed(patch_model(tiny(), DmsConfig(window_size=4, separate_alpha=True)))


def test_unsupported_architecture_is_a_clear_error():
    cfg = MistralConfig(**SHAPE, architectures=["MistralForCausalLM"])
    with pytest.raises(UnsupportedModelError, match="MistralForCausalLM.*supported are"):
        check_architecture(cfg)
