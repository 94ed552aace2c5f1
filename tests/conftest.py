"""Shared fixtures: `user_env` (a throw-away user package, see user_code.py) and `one_thread`."""

from collections.abc import Iterator

import pytest
import torch
from user_code import user_env

__all__ = ["one_thread", "user_env"]


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny float64 convs are ~1000× slower with several intra-op threads on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
