"""Options and error reporting shared by the client subcommands (classify, models, bench)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from clients.sdk.errors import ImgserveError
from clients.sdk.wire import PROTOCOLS, parse_target

DEFAULT_SERVER = "localhost:8500"
# Where the client commands go when --server is not given (like DOCKER_HOST for docker).
SERVER_ENV = "IMGSERVE_SERVER"

# Exit codes of the client commands.
EXIT_OK = 0
EXIT_REQUEST_FAILED = 1   # the server (or the network) answered with an error
EXIT_USAGE = 2            # bad flags or unusable local input; argparse uses 2 as well


def _number(text: str, cast: type[float] | type[int], *, minimum: float, strict: bool) -> float:
    """Parse a number for argparse, refusing values below (or, strict, equal to) ``minimum``."""
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if cast is int else 'a number'}: {text!r}") from None
    if value < minimum or (strict and value == minimum):
        raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum:g}, got {text}")
    return value


def positive_float(text: str) -> float:
    return float(_number(text, float, minimum=0, strict=True))


def non_negative_float(text: str) -> float:
    return float(_number(text, float, minimum=0, strict=False))


def positive_int(text: str) -> int:
    return int(_number(text, int, minimum=1, strict=False))


def add_connection_args(parser: argparse.ArgumentParser, *, timeout_default: float | None = None) -> None:
    parser.add_argument("--server", "-s", default=os.environ.get(SERVER_ENV) or DEFAULT_SERVER,
                        help="gateway address: host:port for gRPC or http://host:port for HTTP "
                             f"(default: env {SERVER_ENV}, else {DEFAULT_SERVER})")
    parser.add_argument("--protocol", choices=PROTOCOLS, default=None,
                        help="wire protocol; default: http for http:// URLs, grpc otherwise")
    parser.add_argument("--timeout", type=positive_float, default=timeout_default, metavar="S",
                        help="per-request timeout in seconds"
                             + (f" (default {timeout_default})" if timeout_default else " (default: the server's)"))


def check_target(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject contradictory --server/--protocol as a usage error (exit 2) before connecting."""
    try:
        parse_target(args.server, args.protocol)
    except ValueError as exc:
        parser.error(str(exc))


def report_error(command: str, exc: ImgserveError, server: str) -> int:
    """One line on stderr; the exit code for a failed request."""
    where = f" ({server})" if exc.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") and server not in exc.message else ""
    print(f"imgserve {command}: {exc.code}{where}: {exc.message}", file=sys.stderr)
    return EXIT_REQUEST_FAILED


def compact_json(doc: object) -> str:
    """One line of JSON without spaces, like the gateway's own answers (easy to pipe into jq or grep)."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
