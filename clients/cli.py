"""The ``imgserve`` command.

Client subcommands live in the clients package. Server and training
subcommands are forwarded to ``serving.cli`` / ``export.cli``, imported only
when used, so ``imgserve classify`` never imports onnxruntime or torch.
"""
from __future__ import annotations

import importlib
import sys

from clients.version import installed_version

# subcommand -> module with main(argv) -> int, and a one-line summary
COMMANDS: dict[str, tuple[str, str]] = {
    "classify": ("clients.commands.classify", "classify images through a running gateway"),
    "detect": ("clients.commands.detect", "detect objects through a running gateway (--draw boxes)"),
    "segment": ("clients.commands.segment", "segment images through a running gateway (--overlay masks)"),
    "models": ("clients.commands.models", "list the models a gateway serves"),
    "bench": ("clients.commands.bench", "closed-loop load generator with a concurrency sweep"),
    "serve": ("serving.cli", "start the gateway (gRPC + HTTP/JSON + /metrics)"),
    "triton-local": ("serving.triton_local", "run a real Triton server over a model repository"),
    "build-repo": ("export.build_repo", "train and export the default model repository"),
    "train": ("export.train", "train a registered classifier, detector or segmenter"),
    "export": ("export.export_cli", "export a registered model (random, file or torchvision weights)"),
    "wrap-onnx": ("export.wrap_onnx", "wrap an existing ONNX classifier into the model repository format"),
    "eval": ("export.evaluation.cli", "score a detector (COCO mAP) or segmenter (mIoU) on held-out data"),
    "make-dataset": ("export.data.make_dataset", "generate a learnable dataset: shapes (ImageFolder) or scenes (COCO + VOC masks)"),
}


def usage() -> str:
    lines = ["usage: imgserve [--version] COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<14} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Run 'imgserve COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # like git and kubectl: no command is a usage error, so scripts notice
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"imgserve {installed_version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"imgserve: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = "export" if module_name.startswith("export") else "serve"
        print(f"imgserve {name}: needs the '{extra}' extra (pip install 'imgserve[{extra}]'): {exc}",
              file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
