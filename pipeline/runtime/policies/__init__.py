"""Eviction policies behind one interface (kvpress-style: one dataclass per file)."""

from __future__ import annotations

from pipeline.runtime.policies.base import Candidates, EvictionPolicy
from pipeline.runtime.policies.dms import DMSPolicy
from pipeline.runtime.policies.h2o import H2OPolicy
from pipeline.runtime.policies.kvzip import KVzipPolicy
from pipeline.runtime.policies.none import NoEviction
from pipeline.runtime.policies.tova import TOVAPolicy
from pipeline.runtime.policies.window import WindowPolicy

POLICY_NAMES = ("dms", "none", "window", "h2o", "tova", "kvzip")


def make_policy(name: str, cr: float = 8.0) -> EvictionPolicy:
    """A policy by name; `cr` is the target compression ratio of the fixed-budget baselines."""
    if name == "dms":
        return DMSPolicy()
    if name == "none":
        return NoEviction()
    if name == "window":
        return WindowPolicy(cr=cr)
    if name == "h2o":
        return H2OPolicy(cr=cr)
    if name == "tova":
        return TOVAPolicy(cr=cr)
    if name == "kvzip":
        return KVzipPolicy(cr=cr)
    raise ValueError(f"unknown eviction policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


__all__ = [
    "POLICY_NAMES",
    "Candidates",
    "DMSPolicy",
    "EvictionPolicy",
    "H2OPolicy",
    "KVzipPolicy",
    "NoEviction",
    "TOVAPolicy",
    "WindowPolicy",
    "make_policy",
]
