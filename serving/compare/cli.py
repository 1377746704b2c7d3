"""``imgserve bench --compare``: the four-path comparison from the command line (see serving/compare)."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from serving.compare import paths as P


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(0 if part.strip() == "native" else int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imgserve bench --compare",
        description="Interleaved comparison, in one run, of raw ONNX Runtime (pre-decoded batches), the gateway "
                    "(embedded backend), Triton direct (client-side decode + crop) and the gateway in front of that "
                    "Triton, for the same models, concurrencies and image sizes. Starts every server itself.")
    p.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"), help="(default model_repository)")
    p.add_argument("--model", "-m", dest="models", type=_names, required=True, metavar="NAME[,NAME...]")
    p.add_argument("--concurrency", "-c", type=_ints, default=(1, 8, 32), metavar="N[,N...]", help="(default 1,8,32)")
    p.add_argument("--image-size", type=_ints, default=(0,), metavar="PX[,PX...]",
                   help="side of the square source images; 'native' or 0 = the model's resize side (default)")
    p.add_argument("--image-format", choices=("PNG", "JPEG"), default="PNG")
    p.add_argument("--paths", type=_names, default=P.ALL_PATHS, metavar="P[,P...]",
                   help=f"subset/order of {','.join(P.ALL_PATHS)}, plus {','.join(P.OPTIONAL_PATHS)} (10-crop cost)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--duration", "-d", type=float, default=5.0, metavar="S", help="measured seconds per cell (5)")
    p.add_argument("--warmup", type=float, default=1.0, metavar="S", help="unrecorded seconds per cell (1)")
    p.add_argument("--gateway-args", default="", metavar="'FLAGS'",
                   help="extra `imgserve serve` flags for both gateways, e.g. '--workers 2'")
    p.add_argument("--connections", type=int, default=1, metavar="N",
                   help="gRPC connections per server path, shared round-robin by the workers (default 1; use "
                        "several with --gateway-args '--workers N': each connection lands on one worker)")
    p.add_argument("--json", dest="json_out", type=Path, metavar="OUT")
    p.add_argument("--plot", type=Path, metavar="OUT.png")
    p.add_argument("--quiet", action="store_true", help="no per-cell progress lines on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    from serving.compare import report
    from serving.compare.runner import CompareConfig, run, summarise

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        config = CompareConfig(model_repository=args.model_repository, models=args.models,
                               concurrency=args.concurrency, image_sizes=args.image_size, paths=args.paths,
                               rounds=args.rounds, warmup_s=args.warmup, duration_s=args.duration,
                               image_format=args.image_format, gateway_args=tuple(shlex.split(args.gateway_args)),
                               connections=args.connections)
        steps = run(config, progress=_progress(args.quiet))
    except ValueError as exc:
        print(f"imgserve bench --compare: {exc}", file=sys.stderr)
        return 2
    cells = summarise(steps)
    print(report.format_table(cells))
    command = "imgserve bench --compare " + " ".join(shlex.quote(a) for a in argv if a != "--compare")
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report.to_dict(config, steps, command), indent=2) + "\n")
        print(f"wrote {args.json_out}", file=sys.stderr)
    if args.plot is not None:
        print(f"wrote {report.plot(cells, args.plot, title=command)}", file=sys.stderr)
    return 0


def _progress(quiet: bool):
    if quiet:
        return None
    return lambda line: print(line, file=sys.stderr, flush=True)
