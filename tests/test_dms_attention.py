"""Training attention: the soft mask against a naive (query, key) loop, flex vs reference, window edge."""

import math

import torch

from pipeline.dms.attention import flex_attention_dms, hard_attention, reference_attention


def _naive(q, k, v, key_logit, window, scale):
    """Loop over every (query, key) pair: score + log(1 - sigmoid(l_k)) beyond the window only."""
    b, hq, t, d = q.shape
    g = hq // k.shape[1]
    out = torch.zeros_like(q, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for i in range(t):
                scores = []
                for j in range(i + 1):
                    s = float(q[bi, h, i] @ k[bi, h // g, j]) * scale
                    if i - j > window:
                        s += math.log(1 - torch.sigmoid(key_logit[bi, h // g, j].double()).item())
                    scores.append(s)
                w = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
                out[bi, h, i] = (w[:, None] * v[bi, h // g, : i + 1].double()).sum(0)
    return out


def test_mask_matches_naive_pair_loop():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 1, 9, 8), torch.randn(1, 1, 9, 8)
    logit = torch.randn(1, 1, 9) * 2
    got = reference_attention(q, k, v, logit, 3, 8**-0.5)
    torch.testing.assert_close(got.double(), _naive(q, k, v, logit, 3, 8**-0.5), atol=1e-5, rtol=1e-5)


def test_flex_agrees_with_reference_values_and_gradients():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 32, 16), torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
    logit = (torch.randn(1, 2, 32) * 3).requires_grad_()
    ref = reference_attention(q, k, v, logit, 8, 0.25, query_block=12)
    ref.pow(2).sum().backward()
    g_ref, logit.grad = logit.grad.clone(), None
    flex = flex_attention_dms(q, k, v, logit, 8, 0.25, compile=False)  # eager: CPU without inductor
    flex.pow(2).sum().backward()
    torch.testing.assert_close(flex, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logit.grad, g_ref, atol=1e-4, rtol=1e-4)


def test_window_boundary_leaves_w_plus_one_keys_visible():
    t, w = 20, 4
    q = torch.zeros(1, 1, t, t)
    k = torch.zeros(1, 1, t, t)
    v = torch.eye(t)[None, None]  # output row = the attention weights over keys
    evict_all = torch.full((1, 1, t), 1e4)
    weights = reference_attention(q, k, v, evict_all, w, 1.0)[0, 0]
    visible = (weights > 1e-6).sum(-1)
    assert visible.tolist() == [min(i + 1, w + 1) for i in range(t)]
    # The oldest visible key is exactly q - w (delayed eviction: w more steps after its decision).
    assert weights[10, 10 - w] > 0 and weights[10, 10 - w - 1] < 1e-6


def test_no_logit_is_plain_causal_attention():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 1, 9, 8), torch.randn(1, 1, 9, 8)
    keep_all = torch.full((1, 1, 9), -1e4)
    want = _naive(q, k, v, keep_all, 3, 8**-0.5)
    torch.testing.assert_close(
        reference_attention(q, k, v, None, 3, 8**-0.5).double(), want, atol=1e-5, rtol=1e-5
    )


def test_hard_attention_equals_soft_mask_with_saturated_decisions():
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 4, 40, 8), torch.randn(2, 2, 40, 8), torch.randn(2, 2, 40, 8)
    evicted = torch.rand(2, 2, 40) < 0.6
    evicted[..., -1] = False
    saturated = torch.where(evicted, 1e4, -1e4)
    want = reference_attention(q, k, v, saturated, 5, 8**-0.5)
    torch.testing.assert_close(hard_attention(q, k, v, evicted, 5, 8**-0.5), want, atol=1e-5, rtol=1e-5)
