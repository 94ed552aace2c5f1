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


@pytest.fixture(autouse=True, scope="session")
def reports_follow_the_schema() -> Iterator[None]:
    """Every report a test makes in this process (to_dict: --json, --report, safetensors metadata)
    is validated against the JSON Schema shipped in the package."""
    try:
        import jsonschema
    except ImportError:  # the dev extra is not installed: nothing to check with
        yield
        return
    from repfuse import report

    validator = jsonschema.Draft202012Validator(report.schema())
    original = report.to_dict

    def checked(*args, **kwargs):
        d = original(*args, **kwargs)
        validator.validate(d)
        return d

    report.to_dict = checked
    yield
    report.to_dict = original
