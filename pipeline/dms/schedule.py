"""The compression-ratio schedule and reproducible noise seeds (docs/dms.md section 3)."""

from __future__ import annotations

import torch

from dms_core import rule


def scheduled_cr(step: int, total_steps: int, final_cr: float, initial_cr: float = 1.0) -> float:
    """CR rises linearly from `initial_cr` at step 0 to `final_cr` at `total_steps` (then holds)."""
    if total_steps <= 0:
        return final_cr
    frac = min(max(step / total_steps, 0.0), 1.0)
    return initial_cr + (final_cr - initial_cr) * frac


def scheduled_fraction(step: int, total_steps: int, final_cr: float, initial_cr: float = 1.0) -> float:
    """The eviction fraction the loss asks for at `step`: 1 - 1/CR."""
    return rule.target_fraction(scheduled_cr(step, total_steps, final_cr, initial_cr))


def noise_generator(
    seed: int, rank: int, step: int, micro_step: int, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A generator for the Gumbel noise of one (process, step, micro-step): a resumed run draws the
    same noise as an uninterrupted one."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + rank * 10_007 + step) * 131 + micro_step)
    return g
