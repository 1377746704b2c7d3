"""serving/ and clients/ never import torch: checked at run time in a fresh interpreter and statically."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.requirements import running_in_ci

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("serving", "clients")

# Runs in a fresh interpreter: import every module under serving/ and clients/, run
# `imgserve classify --help`, then report which modules were skipped and whether torch got in.
PROBE = r"""
import contextlib, importlib, io, json, sys
from pathlib import Path
root = Path(sys.argv[1])
sys.path.insert(0, str(root))
# modules that can only be imported where their host provides a module: reason
HOSTED = {"triton_python_backend_utils": "runs inside Triton's python backend stub"}
imported, skipped = [], {}
for package in ("serving", "clients"):
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        try:
            importlib.import_module(name)
            imported.append(name)
        except ModuleNotFoundError as exc:
            if exc.name in HOSTED:
                skipped[name] = HOSTED[exc.name]
            elif name == "serving.backends.triton" and (exc.name or "").startswith("tritonclient"):
                skipped[name] = "tritonclient is not installed"
            else:
                raise
from clients import cli
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = cli.main(["classify", "--help"])
    except SystemExit as exc:
        code = exc.code
print(json.dumps({"imported": imported, "skipped": skipped, "help_code": code, "help": out.getvalue(),
                  "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "torchvision")))}))
"""


def test_no_module_of_serving_or_clients_pulls_in_torch() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE, str(ROOT)], capture_output=True, text=True, timeout=300,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    imported = set(report["imported"])
    # the walk really covered the gateway and the client
    for must in ("serving.app", "serving.cli", "serving.dataplane", "serving.transports.http",
                 "serving.transports.grpc_v2", "serving.backends.onnxruntime", "clients.cli"):
        assert must in imported, f"{must} was not imported"
    # tritonclient is optional for a bare install, but CI installs it: there every module must import
    allowed = {"serving.triton_onnx_backend.model"} | (set() if running_in_ci() else {"serving.backends.triton"})
    assert set(report["skipped"]) <= allowed, report["skipped"]
    assert report["help_code"] in (0, None) and "usage" in report["help"].lower()
    assert report["torch"] == [], f"torch was imported: {report['torch'][:5]}"


IMPORT_TORCH = re.compile(r"^\s*(import\s+torch\b|from\s+torch\b|import\s+torchvision\b|from\s+torchvision\b)|"
                          r"(import_module|__import__)\(\s*['\"]torch", re.M)


def test_no_torch_import_statement_in_sources() -> None:
    offenders = []
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 10
    for path in files:
        for match in IMPORT_TORCH.finditer(path.read_text(encoding="utf-8")):
            line = path.read_text(encoding="utf-8")[:match.start()].count("\n") + 1
            offenders.append(f"{path.relative_to(ROOT)}:{line}: {match.group(0).strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_static_check_would_catch_an_import(tmp_path: Path) -> None:
    for text in ("import torch\n", "    from torch import nn\n", "import torchvision.models\n",
                 "m = importlib.import_module('torch')\n"):
        assert IMPORT_TORCH.search(text), text
    for text in ("# torch is not allowed\n", "import torchserve_client\n", "x = 'import torch'\n"):
        assert not IMPORT_TORCH.search(text), text
