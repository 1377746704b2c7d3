"""``imgserve bench``: closed-loop load generator with a concurrency sweep (see clients/bench.py)."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from clients import bench
from clients.commands._common import (EXIT_OK, EXIT_USAGE, add_connection_args, check_target,
                                      client_options, non_negative_float,
                                      positive_float, positive_int, report_error)
from clients.sdk.errors import ImgserveError
from clients.sdk.wire import parse_target


def concurrency_list(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,4,16, got {text!r}") from None
    if not levels or any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError(f"concurrency levels must be integers >= 1, got {text!r}")
    return levels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imgserve bench",
        description="Closed-loop load test: for each concurrency level, that many workers send classify "
                    "requests back to back for --duration seconds (after --warmup). Prints a table; "
                    "optionally writes JSON and a PNG plot. Exit status: 0 ok (even with request errors, "
                    "which are reported), 1 the preflight request failed, 2 bad usage.")
    add_connection_args(p, timeout_default=30.0)
    p.add_argument("--model", "-m", required=True, help="model name")
    p.add_argument("--images", nargs="+", metavar="PATH",
                   help="image files and/or directories (searched recursively); default: random-noise "
                        "images at the model's input size")
    p.add_argument("--concurrency", "-c", type=concurrency_list, default=(1, 4, 16, 32), metavar="N[,N...]",
                   help="concurrency levels to sweep (default 1,4,16,32)")
    p.add_argument("--duration", "-d", type=positive_float, default=10.0, metavar="S",
                   help="measured seconds per level (default 10)")
    p.add_argument("--warmup", type=non_negative_float, default=2.0, metavar="S",
                   help="unrecorded seconds before each level (default 2)")
    p.add_argument("--batch", "-b", type=positive_int, default=1, metavar="N", help="images per request (default 1)")
    p.add_argument("--ten-crop", action=argparse.BooleanOptionalAction, default=None,
                   help="10-crop averaging on every request (default: the model's setting)")
    p.add_argument("--top-k", type=positive_int, default=1, help="classes per image in each answer (default 1)")
    p.add_argument("--label", default="", help="free-form tag stored in the JSON and the plot title, e.g. the backend")
    p.add_argument("--json", dest="json_out", type=Path, metavar="OUT", help="write the full report as JSON here")
    p.add_argument("--plot", type=Path, metavar="OUT.png", help="write throughput/latency plots (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument("--compare", action="store_true",
                   help="instead: the interleaved raw-ORT / gateway / Triton / gateway->Triton comparison, which "
                        "starts its own servers (see 'imgserve bench --compare --help'; needs the serve and "
                        "triton extras)")
    return p


# `imgserve bench --compare` runs here: it starts servers and ONNX Runtime itself, so it is a
# serving-side tool, imported by name only when asked for (clients/ never imports serving/)
COMPARE_MODULE = "serving.compare.cli"


def main(argv: list[str]) -> int:
    if "--compare" in argv:
        import importlib

        try:
            compare = importlib.import_module(COMPARE_MODULE)
        except ImportError as exc:
            print(f"imgserve bench --compare: needs the 'serve' and 'triton' extras "
                  f"(pip install 'imgserve[serve,triton]'): {exc}", file=sys.stderr)
            return EXIT_USAGE
        return int(compare.main(argv) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    check_target(parser, args)
    endpoint = parse_target(args.server, args.protocol)
    config = bench.BenchConfig(
        server=args.server, model=args.model, protocol=args.protocol, concurrency=args.concurrency,
        duration_s=args.duration, warmup_s=args.warmup, batch=args.batch, ten_crop=args.ten_crop,
        top_k=args.top_k, timeout_s=args.timeout, label=args.label)

    images, source = None, ""
    if args.images:
        try:
            files = bench.find_images(args.images)
            images = [f.read_bytes() for f in files]
        except OSError as exc:
            print(f"imgserve bench: {exc}", file=sys.stderr)
            return EXIT_USAGE
        source = f"{len(files)} files from {', '.join(args.images)}"
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401  (fail before the sweep, not after it)
        except ImportError:
            print("imgserve bench: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return EXIT_USAGE

    progress = None if args.no_progress else bench.tqdm_progress(config)
    print(f"imgserve bench: {bench.title_for(config)} -> {endpoint}; levels {','.join(map(str, config.concurrency))}, "
          f"{config.warmup_s:g}s warm-up + {config.duration_s:g}s each", file=sys.stderr)
    try:
        connection = {k: v for k, v in client_options(args).items() if k not in ("protocol", "timeout")}
        report = asyncio.run(bench.run_sweep(config, images, image_source=source, progress=progress,
                                             client_options=connection))
    except ImgserveError as exc:
        return report_error("bench", exc, args.server)
    except KeyboardInterrupt:
        print("imgserve bench: interrupted", file=sys.stderr)
        return 130

    print(bench.format_table(report))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"wrote {args.json_out}", file=sys.stderr)
    if args.plot is not None:
        print(f"wrote {bench.plot(report, args.plot)}", file=sys.stderr)
    return EXIT_OK
