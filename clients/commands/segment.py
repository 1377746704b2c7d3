"""``imgserve segment IMAGE...``: segment images through a running gateway, optionally overlaying the mask."""
from __future__ import annotations

import argparse
import sys

from clients.commands._common import (EXIT_OK, EXIT_USAGE, add_connection_args, check_target, client_options,
                                      compact_json, report_error)
from clients.commands.outputs import output_paths, read_inputs
from clients.draw import overlay_mask
from clients.sdk.client import ImageClient
from clients.sdk.errors import ImgserveError
from clients.types import ImageSegmentation


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imgserve segment",
        description="Segment images with a segmentation model served by an imgserve gateway: a class per pixel "
                    "at the original size. Exit status: 0 ok, 1 the request failed, 2 bad usage.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    p.add_argument("--model", "-m", required=True, help="a segmentation model (see 'imgserve models')")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="horizontal-flip test-time augmentation (default: the model's setting)")
    p.add_argument("--overlay", metavar="PATH",
                   help="write the image with its classes tinted: a file for one image, a directory for several")
    p.add_argument("--mask", metavar="PATH",
                   help="write the palette PNG mask (pixel = class index): a file or a directory, as --overlay")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_connection_args(p)
    return p


def format_segmentation(name: str, image: ImageSegmentation) -> str:
    lines = [f"{name}  ({image.width}x{image.height})"]
    width = max([5] + [len(c.label) for c in image.classes])
    lines.append(f"  {'label':<{width}}  {'index':>5}  {'pixels':>7}")
    lines += [f"  {c.label:<{width}}  {c.index:>5}  {100 * c.fraction:6.2f}%" for c in image.classes]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_target(parser, args)
    inputs = read_inputs(parser, args.images)
    names = [name for name, _ in inputs]
    overlays = output_paths(parser, args.overlay, names, "--overlay")
    masks = output_paths(parser, args.mask, names, "--mask")
    try:
        with ImageClient(args.server, **client_options(args)) as client:
            result = client.segment([data for _, data in inputs], args.model, tta=args.tta)
    except ImgserveError as exc:
        return report_error("segment", exc, args.server)
    if args.json:
        doc = result.to_dict()
        for entry, name in zip(doc["images"], names):
            entry["image"] = name
        print(compact_json(doc))
    else:
        print("\n\n".join(format_segmentation(name, image) for name, image in zip(names, result)))
    try:
        for (name, data), image, target in zip(inputs, result, overlays):
            overlay_mask(data, image.mask).save(target)
        for image, target in zip(result, masks):
            target.write_bytes(image.mask_png)
    except (OSError, ValueError) as exc:
        print(f"imgserve segment: cannot write an output picture: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK
