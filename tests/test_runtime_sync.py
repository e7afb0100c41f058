"""The decode step has no host synchronisation: what makes it fast on a GPU (and capturable in a CUDA
graph) is checked here on CPU, two ways:

- run under a TorchFunctionMode that fails on every tensor -> Python value conversion (`.item()`,
  `.tolist()`, `bool/int/float(tensor)`, `.numpy()`, `.cpu()`), which on a GPU each wait for the device;
- traced whole by torch.compile(fullgraph=True), which refuses any data-dependent Python control flow.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_hf
from torch.overrides import TorchFunctionMode

from pipeline.runtime.engine import Engine

LIMITS = dict(max_batch_size=4, max_input_len=32, max_output_len=32, kv_block_size=4, kv_pool_tokens=512)
SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"}


class NoHostSync(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS:
            raise AssertionError(f"host synchronisation in the decode step: Tensor.{name}")
        # .to("cpu") spelled out (a .to(other.device) follows the data, wherever it is)
        targets = [*args[1:], *(kwargs or {}).values()]
        if name == "to" and any(isinstance(a, str) and a.startswith("cpu") for a in targets):
            raise AssertionError("host synchronisation in the decode step: .to('cpu')")
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("sync") / "m", dms="adapter", window=8, block=4)


def _engine_in_decode(model_dir, policy: str) -> Engine:
    engine = Engine.from_hf(model_dir, policy=policy, limits=LIMITS)
    for n in (12, 7, 20):
        engine.submit(list(range(1, n + 1)), max_tokens=16, ignore_eos=True)
    while engine.last_step_kind != "decode":
        engine.step()
    return engine


def _step_inputs(engine: Engine):
    seqs = engine.runner.slots
    tokens = torch.tensor([s.token_ids[s.num_cached] for s in seqs])
    pos = torch.tensor([s.num_cached for s in seqs])
    engine.runner.sync()
    engine.streams.reserve(engine.streams.num_rows(len(seqs)))
    return tokens, pos, engine.streams.widths(engine.streams.num_rows(len(seqs)))


@pytest.mark.parametrize("policy", ["dms", "none", "window", "h2o", "tova"])
def test_decode_step_never_waits_for_the_device(model_dir, policy):
    engine = _engine_in_decode(model_dir, policy)
    tokens, pos, widths = _step_inputs(engine)
    with torch.inference_mode(), NoHostSync():
        logits, grows = engine.runner.decode_step(tokens, pos, widths)
    assert logits.shape == (3, 96) and grows.shape == (2, 3 * 2)


def test_the_check_catches_a_sync(model_dir):
    with pytest.raises(AssertionError, match="item"), NoHostSync():
        torch.ones(2).sum().item()


@pytest.mark.parametrize("policy", ["dms", "none"])
def test_decode_step_compiles_as_one_graph(model_dir, policy):
    """fullgraph=True: a graph break (a sync, a Python branch on a tensor) is an error, not a fallback."""
    torch._dynamo.reset()
    engine = _engine_in_decode(model_dir, policy)
    tokens, pos, widths = _step_inputs(engine)
    step = torch.compile(engine.runner.decode_step, fullgraph=True, backend="eager", dynamic=False)
    with torch.inference_mode():
        logits, _ = step(tokens, pos, widths)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("policy", ["dms", "none"])
def test_padded_full_width_step_equals_the_exact_one(model_dir, policy):
    """What a CUDA graph replays (pipeline.runtime.cuda_graphs): the batch padded to its bucket with
    free slots, every block-table column read. Same logits and same streams as the exact step."""
    exact, padded = _engine_in_decode(model_dir, policy), _engine_in_decode(model_dir, policy)
    for _ in range(6):  # a few steps, so rings fill and DMS reuses slots
        tokens, pos, widths = _step_inputs(exact)
        _step_inputs(padded)
        with torch.inference_mode():
            want, want_grows = exact.runner.decode_step(tokens, pos, widths)
            st = padded.streams
            st.lens[:, 3 * 2 :] = 0  # slot 3 is free: the decoder resets it before every replay
            got, got_grows = padded.runner.decode_step(
                torch.cat([tokens, torch.zeros(1, dtype=torch.long)]),
                torch.cat([pos, torch.zeros(1, dtype=torch.long)]),
                (st.max_blocks,) * st.num_layers,
            )
        torch.testing.assert_close(got[:3], want, atol=1e-5, rtol=0)
        assert torch.equal(got_grows[:, :6], want_grows)
        assert torch.equal(padded.streams.lens[:, :6], exact.streams.lens[:, :6])
        for engine, logits in ((exact, want), (padded, got[:3])):
            runner = engine.runner
            runner._pending = (engine.streams.lens[:, :6], want_grows, 6)
            tokens = runner.finish_step(logits.argmax(-1))
            for seq, token in zip(runner.slots, tokens, strict=True):
                seq.num_cached += 1
                seq.token_ids.append(token)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_matches_eager(model_dir):
    prompts = [list(range(1, n + 1)) for n in (12, 7, 20)]
    eager = Engine.from_hf(model_dir, limits=LIMITS, device="cuda", cuda_graphs=False)
    graphs = Engine.from_hf(model_dir, limits=LIMITS, device="cuda")
    assert graphs.cuda_graphs and not eager.cuda_graphs
    want = [c.token_ids for c in eager.generate(prompts, max_tokens=16, ignore_eos=True)]
    assert [c.token_ids for c in graphs.generate(prompts, max_tokens=16, ignore_eos=True)] == want
    assert graphs.pool_stats()["blocks_used"] == 0


@pytest.mark.parametrize("policy, runs", [("dms", True), ("none", False), ("window", False), ("h2o", False)])
def test_only_a_policy_that_reads_decisions_runs_the_adapter(model_dir, policy, runs):
    """A baseline served from a DMS checkpoint skips the adapter's norm and projection every layer."""
    engine = _engine_in_decode(model_dir, policy)
    calls = []
    hooks = [layer.self_attn.dms_proj_alpha.register_forward_hook(lambda *a: calls.append(1))
             for layer in engine.runner.model.layers]  # fmt: skip
    tokens, pos, widths = _step_inputs(engine)
    with torch.inference_mode():
        engine.runner.decode_step(tokens, pos, widths)
    for hook in hooks:
        hook.remove()
    assert (len(calls) == len(engine.runner.model.layers)) if runs else not calls
