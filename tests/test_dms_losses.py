"""Loss and schedule values at known points; reproducible noise."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.dms.losses import chunked_kl, compression_loss
from pipeline.dms.schedule import noise_generator, scheduled_cr, scheduled_fraction


def test_chunked_kl_equals_full_vocabulary_kl_student_to_teacher():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 37), torch.randn(2, 5, 37)
    # KL(student || teacher) = sum p_s (log p_s - log p_t); F.kl_div(input=log p_t, target=log p_s).
    want = F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1), log_target=True, reduction="none").sum(-1)
    assert chunked_kl(s, t, vocab_chunk=8).item() == pytest.approx(want.mean().item(), rel=1e-5)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert chunked_kl(s, t, mask, vocab_chunk=5).item() == pytest.approx(want[mask].mean().item(), rel=1e-5)
    assert chunked_kl(s, s).item() == pytest.approx(0.0, abs=1e-6)


def test_compression_loss_is_one_sided():
    hard = torch.zeros(2, 2, 1, 10)  # [L, B, H, T]
    hard[:, 0, :, :5] = 1  # sequence 0 evicts half, sequence 1 nothing
    assert compression_loss(hard, 0.75).item() == pytest.approx(((0.75 - 0.5) + 0.75) / 2)
    assert compression_loss(hard, 0.0).item() == 0.0  # too much eviction is never penalised
    hard[:] = 1
    assert compression_loss(hard, 0.875).item() == 0.0


def test_linear_cr_schedule_and_target_fraction():
    assert scheduled_cr(0, 100, 16) == 1.0
    assert scheduled_cr(50, 100, 16) == 8.5
    assert scheduled_cr(100, 100, 16) == 16.0 and scheduled_cr(150, 100, 16) == 16.0
    assert scheduled_fraction(100, 100, 8) == pytest.approx(0.875)
    assert scheduled_fraction(0, 100, 8) == 0.0
    assert math.isclose(scheduled_cr(34, 510, 16), 1 + 15 * 34 / 510)


def test_noise_seeding_is_reproducible_and_distinct():
    a = torch.rand(4, generator=noise_generator(0, 0, 5, 0))
    assert torch.equal(a, torch.rand(4, generator=noise_generator(0, 0, 5, 0)))
    assert not torch.equal(a, torch.rand(4, generator=noise_generator(0, 0, 6, 0)))
    assert not torch.equal(a, torch.rand(4, generator=noise_generator(0, 1, 5, 0)))
    assert not torch.equal(a, torch.rand(4, generator=noise_generator(0, 0, 5, 1)))


def test_logit_clip_keeps_saturated_decisions_trainable():
    """Without a clip, a logit far past 0 gets no gradient from any noise sample (the head is dead);
    clipped, the samples the noise flips still carry gradient back to the raw logit."""
    from dms_core.rule import gumbel_sigmoid

    def grad(clip):
        logit = torch.full((20000,), -50.0, requires_grad=True)
        _, hard = gumbel_sigmoid(logit, 0.1, torch.Generator().manual_seed(0), clip=clip)
        hard.sum().backward()
        return logit.grad

    assert float(grad(None).abs().sum()) == 0.0
    clipped = grad(5.0)
    assert float(clipped.sum()) > 0  # pushed towards eviction, as d(hard)/d(logit) >= 0
    # About sigmoid(-5) = 0.7% of samples flip; those are the ones with a gradient.
    assert 0.002 < float((clipped > 1e-3).float().mean()) < 0.02


def test_logit_clip_leaves_in_range_logits_and_noise_unchanged():
    from dms_core.rule import gumbel_sigmoid

    logit = torch.linspace(-4.0, 4.0, 101)
    plain = gumbel_sigmoid(logit, 0.1, torch.Generator().manual_seed(3))
    clipped = gumbel_sigmoid(logit, 0.1, torch.Generator().manual_seed(3), clip=5.0)
    for a, b in zip(plain, clipped, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
