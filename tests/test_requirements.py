"""tests/requirements.py: a missing required tool or module skips locally and fails under CI."""
from __future__ import annotations

import sys

import pytest

from tests.requirements import require_module, require_tool, running_in_ci

MISSING_TOOL = "imgserve-no-such-tool-7f3a"
MISSING_MODULE = "imgserve_no_such_module_7f3a"


@pytest.mark.parametrize("value, expected", [("true", True), ("1", True), ("TRUE", True), ("yes", True),
                                             ("", False), ("false", False), ("0", False)])
def test_ci_is_recognised(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv("CI", value)
    assert running_in_ci() is expected


def test_present_tool_and_module_are_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert require_tool("sh").endswith("/sh")
    assert require_module("json") is sys.modules["json"]


@pytest.mark.parametrize("require, name", [(require_tool, MISSING_TOOL), (require_module, MISSING_MODULE)])
def test_missing_skips_locally(monkeypatch: pytest.MonkeyPatch, require, name: str) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="did NOT run"):
        require(name)


@pytest.mark.parametrize("require, name", [(require_tool, MISSING_TOOL), (require_module, MISSING_MODULE)])
def test_missing_fails_under_ci(monkeypatch: pytest.MonkeyPatch, require, name: str) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"{name}.*not a skip"):
        require(name, "install it")
