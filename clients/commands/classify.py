"""``imgserve classify IMAGE...``: classify image files through a running gateway.

Every file gets its own answer: a result for each good one, a line naming each
bad one. The gateway rejects a whole request for its first undecodable image,
so when a batch is refused for one image the batch is retried one file per
request, which costs extra requests only on the failure path. Errors that are
about the request rather than a file (unknown model, unreachable gateway) end
the command with one line.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from clients.commands._common import (EXIT_OK, EXIT_REQUEST_FAILED, EXIT_USAGE, add_connection_args, check_target,
                                      client_options, compact_json, positive_int, report_error)
from clients.sdk.client import ImageClient
from clients.sdk.errors import ImgserveError
from clients.types import ClassifyResult, Prediction

STDIN = "-"
# The gateway names the failing image by its position in the request: "image 3: not a recognised ...".
_IMAGE_ERROR = re.compile(r"^image (\d+): ")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imgserve classify",
        description="Classify image files with a model served by an imgserve gateway. Prints a result for every "
                    "good file and one line on stderr for every bad one. Exit status: 0 every file classified, "
                    "1 a request or a file failed on the server, 2 bad usage or an unreadable local file.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...); '-' reads stdin")
    p.add_argument("--model", "-m", required=True, help="model name (see 'imgserve models')")
    p.add_argument("--top-k", "-k", type=positive_int, default=5, help="classes per image (default 5)")
    p.add_argument("--ten-crop", action=argparse.BooleanOptionalAction, default=None,
                   help="10-crop test-time averaging (default: the model's setting)")
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="N",
                   help="images per request when classifying many files (default 32)")
    p.add_argument("--json", action="store_true",
                   help="print one compact JSON array (a record per file: predictions, or an error) instead of tables")
    add_connection_args(p)
    return p


@dataclass(frozen=True)
class ImageFile:
    """One command-line argument and its bytes (None when it could not be read)."""

    position: int
    name: str
    data: bytes | None
    read_error: str | None = None


def format_predictions(name: str, result: ClassifyResult, predictions: Sequence[Prediction]) -> str:
    """A small table for one image: rank, label, index, score."""
    crop = "on" if result.ten_crop else "off"
    width = max([5] + [len(p.label) for p in predictions])
    lines = [f"{name}  (model {result.model} v{result.version}, 10-crop {crop})",
             f"  {'rank':>4}  {'label':<{width}}  {'index':>5}  {'score':>8}"]
    lines += [f"  {rank:>4}  {p.label:<{width}}  {p.index:>5}  {p.score:8.4f}"
              for rank, p in enumerate(predictions, 1)]
    return "\n".join(lines)


def read_files(paths: Sequence[str]) -> list[ImageFile]:
    """Read every argument; an unreadable or empty one is kept with its reason, not raised."""
    files = []
    for position, path in enumerate(paths):
        try:
            data = sys.stdin.buffer.read() if path == STDIN else Path(path).read_bytes()
        except OSError as exc:  # the line names the file already
            files.append(ImageFile(position, path, None, f"cannot read image file: {exc.strerror or exc}"))
            continue
        if not data:
            files.append(ImageFile(position, path, None, "the file is empty"))
        else:
            files.append(ImageFile(position, path, data))
    return files


def failing_image(exc: ImgserveError) -> int | None:
    """The request position of the image the gateway refused, when the error is about one image."""
    match = _IMAGE_ERROR.match(exc.message) if exc.code == "INVALID_ARGUMENT" else None
    return int(match.group(1)) if match else None


class Printer:
    """Writes results as they arrive (tables) or collects them (JSON); errors always go to stderr."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.records: list[tuple[int, dict[str, object]]] = []  # (position on the command line, record)
        self.printed = 0

    def result(self, file: ImageFile, result: ClassifyResult, predictions: Sequence[Prediction]) -> None:
        if self.as_json:
            self.records.append((file.position, {"image": file.name, "model": result.model, "version": result.version,
                                 "ten_crop": result.ten_crop,
                                 "predictions": [{"index": p.index, "label": p.label, "score": p.score}
                                                 for p in predictions]}))
            return
        if self.printed:
            print()
        print(format_predictions(file.name, result, predictions), flush=True)
        self.printed += 1

    def file_error(self, file: ImageFile, code: str, message: str) -> None:
        """One line on stderr; in JSON mode also a record, so the array has an entry per file."""
        shown = "stdin" if file.name == STDIN else file.name
        print(f"imgserve classify: {shown}: {code}: {message}", file=sys.stderr, flush=True)
        if self.as_json:
            self.records.append((file.position, {"image": file.name, "error": {"code": code, "message": message}}))

    def finish(self) -> None:
        if self.as_json and self.records:
            print(compact_json([record for _, record in sorted(self.records, key=lambda r: r[0])]))


def classify_chunk(client: ImageClient, chunk: Sequence[ImageFile], args: argparse.Namespace,
                   out: Printer) -> bool:
    """Classify one request's worth of files; True when every file got a result.

    A refusal that names one image is retried file by file so each file gets its own answer;
    any other error is about the request and propagates.
    """
    try:
        result = client.classify([f.data for f in chunk], args.model, top_k=args.top_k, ten_crop=args.ten_crop)
    except ImgserveError as exc:
        if failing_image(exc) is None:
            raise
        if len(chunk) == 1:
            out.file_error(chunk[0], exc.code, _IMAGE_ERROR.sub("", exc.message, count=1))
            return False
        return all([classify_chunk(client, [f], args, out) for f in chunk])
    for file, predictions in zip(chunk, result.predictions):
        out.result(file, result, predictions)
    return True


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_target(parser, args)
    if args.images.count(STDIN) > 1:
        parser.error("'-' (stdin) can be given only once")
    files = read_files(args.images)
    out = Printer(args.json)
    unreadable = [f for f in files if f.data is None]
    for f in unreadable:
        out.file_error(f, "INVALID_ARGUMENT", f.read_error or "unreadable")
    readable = [f for f in files if f.data is not None]
    all_ok = True
    try:
        if readable:
            with ImageClient(args.server, **client_options(args)) as client:
                for start in range(0, len(readable), args.batch_size):
                    all_ok &= classify_chunk(client, readable[start:start + args.batch_size], args, out)
    except ImgserveError as exc:
        out.finish()
        return report_error("classify", exc, args.server)
    out.finish()
    if unreadable:
        return EXIT_USAGE
    return EXIT_OK if all_ok else EXIT_REQUEST_FAILED
