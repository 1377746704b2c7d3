"""``imgserve classify IMAGE...``: classify image files through a running gateway."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from clients.commands._common import (EXIT_OK, EXIT_USAGE, add_connection_args, check_target, positive_int,
                                      report_error)
from clients.sdk.client import ImageClient
from clients.sdk.errors import ImgserveError, InvalidArgument
from clients.sdk.images import read_path
from clients.types import ClassifyResult, Prediction


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imgserve classify",
        description="Classify image files with a model served by an imgserve gateway. "
                    "Exit status: 0 ok, 1 the request failed, 2 bad usage or unreadable file.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...); '-' reads stdin")
    p.add_argument("--model", "-m", required=True, help="model name (see 'imgserve models')")
    p.add_argument("--top-k", "-k", type=positive_int, default=5, help="classes per image (default 5)")
    p.add_argument("--ten-crop", action=argparse.BooleanOptionalAction, default=None,
                   help="10-crop test-time averaging (default: the model's setting)")
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="N",
                   help="images per request when classifying many files (default 32)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_connection_args(p)
    return p


def format_predictions(name: str, result: ClassifyResult, predictions: Sequence[Prediction]) -> str:
    """A small table for one image: rank, label, index, score."""
    crop = "on" if result.ten_crop else "off"
    width = max([5] + [len(p.label) for p in predictions])
    lines = [f"{name}  (model {result.model} v{result.version}, 10-crop {crop})",
             f"  {'rank':>4}  {'label':<{width}}  {'index':>5}  {'score':>8}"]
    lines += [f"  {rank:>4}  {p.label:<{width}}  {p.index:>5}  {p.score:8.4f}"
              for rank, p in enumerate(predictions, 1)]
    return "\n".join(lines)


def read_inputs(paths: Sequence[str]) -> list[bytes]:
    out = []
    for path in paths:
        data = sys.stdin.buffer.read() if path == "-" else read_path(path)
        if not data:
            raise InvalidArgument(f"{'stdin' if path == '-' else repr(path)} is empty")
        out.append(data)
    return out


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_target(parser, args)
    if args.images.count("-") > 1:
        parser.error("'-' (stdin) can be given only once")
    try:
        blobs = read_inputs(args.images)
    except InvalidArgument as exc:
        print(f"imgserve classify: {exc.message}", file=sys.stderr)
        return EXIT_USAGE

    records: list[dict] = []
    printed = 0
    try:
        with ImageClient(args.server, protocol=args.protocol, timeout=args.timeout) as client:
            for start in range(0, len(blobs), args.batch_size):
                names = args.images[start:start + args.batch_size]
                result = client.classify(blobs[start:start + args.batch_size], args.model,
                                         top_k=args.top_k, ten_crop=args.ten_crop)
                for name, preds in zip(names, result.predictions):
                    if args.json:
                        records.append({"image": name, "model": result.model, "version": result.version,
                                        "ten_crop": result.ten_crop,
                                        "predictions": [{"index": p.index, "label": p.label, "score": p.score}
                                                        for p in preds]})
                    else:
                        if printed:
                            print()
                        print(format_predictions(name, result, preds), flush=True)
                        printed += 1
    except ImgserveError as exc:
        return report_error("classify", exc, args.server)
    if args.json:
        json.dump(records, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return EXIT_OK
