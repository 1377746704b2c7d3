"""Regenerate the imgserve.v1 Python stubs (committed; tests check they are current)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "clients" / "proto"
PROTO = PROTO_ROOT / "imgserve" / "v1" / "imgserve.proto"


def generate(out_dir: Path) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for the proto into out_dir/imgserve/v1."""
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    rc = protoc.main([
        "protoc", f"-I{PROTO_ROOT}", f"-I{include}",
        f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
        str(PROTO),
    ])
    if rc != 0:
        raise RuntimeError(f"protoc failed with {rc}")
    grpc_file = out_dir / "imgserve" / "v1" / "imgserve_pb2_grpc.py"
    # protoc writes absolute imports; the stubs live inside the clients package.
    text = re.sub(r"^from imgserve\.v1 import", "from . import", grpc_file.read_text(), flags=re.M)
    grpc_file.write_text(text)
    return sorted((out_dir / "imgserve" / "v1").glob("imgserve_pb2*"))


if __name__ == "__main__":
    files = generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT)
    print("\n".join(str(f) for f in files))
