"""Checkpoint input and output, in one namespace: `loading` (safe reading), `allowlist` (the global
policy), `pickle_scan` (inert scanning and bounds) and `writing` (atomic writes). See each module's
docstring for its rules."""

from __future__ import annotations

from .allowlist import check_allow_prefixes, ensure_cwd_importable, resolve_exact
from .loading import (
    CONTAINER_KEYS,
    Limits,
    LoadedCheckpoint,
    admitted_globals,
    file_kind,
    find_model,
    load_checkpoint,
    load_object,
    sha256_file,
)
from .writing import atomic_write, check_destination, replace_in_container, save_checkpoint, save_object

__all__ = [
    "CONTAINER_KEYS",
    "Limits",
    "LoadedCheckpoint",
    "admitted_globals",
    "atomic_write",
    "check_allow_prefixes",
    "check_destination",
    "ensure_cwd_importable",
    "file_kind",
    "find_model",
    "load_checkpoint",
    "load_object",
    "replace_in_container",
    "resolve_exact",
    "save_checkpoint",
    "save_object",
    "sha256_file",
]
