"""Bounds on numbers given as options, shared by the command line and the API (no torch: the CLI imports it)."""

from __future__ import annotations

from typing import Any

MAX_SEQ_LEN = 2**32  # report --seq-len: a context of 4G tokens; beyond, FLOP counts overflow a float when shown
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes a 64-bit seed: a larger one is an OverflowError


def seed_ok(seed: Any) -> bool:
    """A seed torch takes: an integer (not a bool) from 0 to 2**64 - 1."""
    return isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED
