"""``imgserve detect IMAGE...``: detect objects through a running gateway, optionally drawing them."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clients.commands._common import (EXIT_OK, EXIT_USAGE, add_connection_args, check_target, client_options,
                                      compact_json, positive_int, report_error)
from clients.commands.outputs import output_paths, read_inputs
from clients.draw import draw_detections
from clients.sdk.client import ImageClient
from clients.sdk.errors import ImgserveError
from clients.types import ImageDetections


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imgserve detect",
        description="Detect objects with a detection model served by an imgserve gateway. Boxes are in the "
                    "original image's pixels (x1, y1, x2, y2). Exit status: 0 ok, 1 the request failed, 2 bad usage.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    p.add_argument("--model", "-m", required=True, help="a detection model (see 'imgserve models')")
    p.add_argument("--score-threshold", type=float, default=None, metavar="T",
                   help="drop detections scoring below T, in [0, 1] (default: the model's)")
    p.add_argument("--max-detections", type=positive_int, default=None, metavar="N",
                   help="at most N detections per image (default: the model's K)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="horizontal-flip test-time augmentation (default: the model's setting)")
    p.add_argument("--draw", metavar="PATH",
                   help="write the image with its boxes drawn: a file for one image, a directory for several")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_connection_args(p)
    return p


def format_detections(name: str, image: ImageDetections) -> str:
    lines = [f"{name}  ({image.width}x{image.height}, {len(image)} detections)"]
    if image.detections:
        width = max(5, *(len(d.label) for d in image.detections))
        lines.append(f"  {'label':<{width}}  {'score':>6}  {'x1':>7} {'y1':>7} {'x2':>7} {'y2':>7}")
        lines += [f"  {d.label:<{width}}  {d.score:6.3f}  " + " ".join(f"{v:7.1f}" for v in d.box)
                  for d in image.detections]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_target(parser, args)
    inputs = read_inputs(parser, args.images)
    targets = output_paths(parser, args.draw, [name for name, _ in inputs], "--draw")
    try:
        with ImageClient(args.server, **client_options(args)) as client:
            result = client.detect([data for _, data in inputs], args.model, score_threshold=args.score_threshold,
                                   max_detections=args.max_detections, tta=args.tta)
    except ImgserveError as exc:
        return report_error("detect", exc, args.server)
    if args.json:
        doc = result.to_dict()
        for entry, (name, _) in zip(doc["images"], inputs):
            entry["image"] = name
        print(compact_json(doc))
    else:
        print("\n\n".join(format_detections(name, image) for (name, _), image in zip(inputs, result)))
    for (name, data), image, target in zip(inputs, result, targets):
        try:
            draw_detections(data, image.detections).save(target)
        except (OSError, ValueError) as exc:
            print(f"imgserve detect: cannot draw {name} to {target}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    return EXIT_OK
