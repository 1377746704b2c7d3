"""The committed imgserve.v1 stubs are exactly what scripts/gen_proto.py generates from the .proto."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "clients" / "proto" / "imgserve" / "v1"
EXPECTED = ("imgserve_pb2.py", "imgserve_pb2.pyi", "imgserve_pb2_grpc.py")


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_stub_is_current(tmp_path: Path, name: str) -> None:
    generated = {p.name: p for p in load_generator().generate(tmp_path)}
    assert sorted(generated) == sorted(EXPECTED)
    fresh, committed = generated[name].read_bytes(), (COMMITTED / name).read_bytes()
    assert fresh == committed, f"{name} is stale: run `make proto` (scripts/gen_proto.py) and commit the result"


def test_generated_grpc_stub_imports_inside_the_package(tmp_path: Path) -> None:
    text = (COMMITTED / "imgserve_pb2_grpc.py").read_text()
    assert "from . import imgserve_pb2" in text and "from imgserve.v1" not in text
