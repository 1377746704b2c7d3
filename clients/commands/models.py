"""``imgserve models``: list the models a gateway serves."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from clients.commands._common import (EXIT_OK, add_connection_args, check_target, client_options, compact_json,
                                      report_error)
from clients.sdk.client import ImageClient
from clients.sdk.errors import ImgserveError
from clients.types import ModelInfo

_COLUMNS = ("name", "version", "task", "classes", "input", "tta", "max batch", "ready", "description")
CHANNEL_NAMES = {1: "grey", 3: "RGB"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgserve models",
                                description="List the models an imgserve gateway serves. "
                                            "Exit status: 0 ok, 1 the request failed, 2 bad usage.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_connection_args(p, timeout_default=10.0)
    return p


def input_summary(model: ModelInfo) -> str:
    """``36->32x32 RGB``: the shorter side is resized to 36, the model sees 32x32 RGB crops of it;
    ``letterbox 128x128 RGB``: the whole image is fitted into 128x128 (detectors, segmenters)."""
    channels = CHANNEL_NAMES.get(model.channels, f"{model.channels}ch")
    if model.geometry == "letterbox":
        return f"letterbox {model.crop}x{model.crop} {channels}"
    return f"{model.resize}->{model.crop}x{model.crop} {channels}"


def format_models(models: Sequence[ModelInfo]) -> str:
    """One row per model: what a caller needs to know before sending it images."""
    rows = [[m.name, m.version, m.task, str(m.num_classes), input_summary(m),
             "yes" if m.ten_crop_default else "no", str(m.max_batch_size), "yes" if m.ready else "NO",
             m.description or "-"]
            for m in models]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(_COLUMNS)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [list(_COLUMNS), *rows])


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_target(parser, args)
    try:
        with ImageClient(args.server, **client_options(args)) as client:
            models = client.models()
    except ImgserveError as exc:
        return report_error("models", exc, args.server)
    if args.json:
        print(compact_json([m.to_dict() for m in models]))
    elif models:
        print(format_models(models))
    else:
        print("the gateway serves no models")
    return EXIT_OK
