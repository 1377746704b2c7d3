"""``imgserve models``: list the models a gateway serves."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from clients.commands._common import EXIT_OK, add_connection_args, check_target, report_error
from clients.sdk.client import ImageClient
from clients.sdk.errors import ImgserveError
from clients.types import ModelInfo

_COLUMNS = ("name", "version", "task", "classes", "input", "10-crop", "max batch", "ready")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgserve models",
                                description="List the models an imgserve gateway serves. "
                                            "Exit status: 0 ok, 1 the request failed, 2 bad usage.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_connection_args(p, timeout_default=10.0)
    return p


def format_models(models: Sequence[ModelInfo]) -> str:
    """One row per model; input is resize -> crop x crop x channels."""
    rows = [[m.name, m.version, m.task, str(m.num_classes), f"{m.resize}->{m.crop}x{m.crop}x{m.channels}",
             "yes" if m.ten_crop_default else "no", str(m.max_batch_size), "yes" if m.ready else "NO"]
            for m in models]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(_COLUMNS)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [list(_COLUMNS), *rows])


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_target(parser, args)
    try:
        with ImageClient(args.server, protocol=args.protocol, timeout=args.timeout) as client:
            models = client.models()
    except ImgserveError as exc:
        return report_error("models", exc, args.server)
    if args.json:
        json.dump([m.to_dict() for m in models], sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif models:
        print(format_models(models))
    else:
        print("the gateway serves no models")
    return EXIT_OK
