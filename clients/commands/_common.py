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
# A bearer token from the environment, so it need not appear on the command line (visible in `ps`).
TOKEN_ENV = "IMGSERVE_TOKEN"  # nosec B105 - the name of an env variable, not a secret

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
    sec = parser.add_argument_group("authentication and TLS (docs/security.md)")
    token = sec.add_mutually_exclusive_group()
    token.add_argument("--token", default=None, metavar="TOKEN",
                       help=f"bearer token for a gateway that requires one (default: env {TOKEN_ENV}; prefer "
                            "--token-file or the env var: a command line is visible to other users)")
    token.add_argument("--token-file", default=None, metavar="FILE", help="read the bearer token from FILE")
    sec.add_argument("--ca-file", default=None, metavar="PEM",
                     help="CA certificate(s) that signed the gateway's TLS certificate; turns TLS on for gRPC "
                          "(for HTTP use an https:// server URL)")
    sec.add_argument("--client-cert", default=None, metavar="PEM",
                     help="client certificate for a gateway that requires mTLS (turns TLS on)")
    sec.add_argument("--client-key", default=None, metavar="PEM",
                     help="private key of --client-cert (default: inside the --client-cert file)")
    sec.add_argument("--tls", action="store_true", default=None,
                     help="use TLS with the system's CA certificates (gRPC; implied by the options above)")


def client_options(args: argparse.Namespace) -> dict[str, object]:
    """ImageClient/AsyncImageClient keyword arguments for the connection flags of add_connection_args."""
    token = args.token
    if token is None and args.token_file is None:
        token = os.environ.get(TOKEN_ENV) or None
    return {"protocol": args.protocol, "timeout": args.timeout, "token": token, "token_file": args.token_file,
            "ca_file": args.ca_file, "client_cert": args.client_cert, "client_key": args.client_key,
            "tls": args.tls}


def check_target(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject contradictory --server/--protocol as a usage error (exit 2) before connecting."""
    try:
        endpoint = parse_target(args.server, args.protocol)
    except ValueError as exc:
        parser.error(str(exc))
    if args.client_key and not args.client_cert:
        parser.error("--client-key needs --client-cert")
    if endpoint.protocol == "http" and endpoint.address.lower().startswith("http://") and (
            args.ca_file or args.client_cert or args.tls):
        parser.error("--ca-file/--client-cert/--tls need an https:// server URL for HTTP")


def report_error(command: str, exc: ImgserveError, server: str) -> int:
    """One line on stderr; the exit code for a failed request."""
    where = f" ({server})" if exc.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") and server not in exc.message else ""
    print(f"imgserve {command}: {exc.code}{where}: {exc.message}", file=sys.stderr)
    return EXIT_REQUEST_FAILED


def compact_json(doc: object) -> str:
    """One line of JSON without spaces, like the gateway's own answers (easy to pipe into jq or grep)."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
