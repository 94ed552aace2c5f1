"""Shared fixtures: `user_env` (a throw-away user package, see user_code.py)."""

from user_code import user_env

__all__ = ["user_env"]
