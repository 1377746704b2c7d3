"""``imgserve serve``: start the gateway (gRPC + HTTP/JSON + /metrics) over a model repository."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from serving.settings import Settings

EXIT_USAGE = 2
EXIT_FAILURE = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgserve serve",
        description="Serve the models of a model repository over gRPC (imgserve.v1 + Open Inference Protocol), "
                    "HTTP/JSON (/v1, /v2), Prometheus /metrics and health endpoints. "
                    "Every flag can also be set as an IMGSERVE_* environment variable.",
    )
    Settings.add_arguments(parser)
    return parser


def _client_host(host: str) -> str:
    return "localhost" if host in ("0.0.0.0", "::", "") else host


def check_repository(settings: Settings) -> str | None:
    """A clear complaint when the embedded backend has nothing to serve, else None."""
    from serving.repository import RepositoryError, scan_repository

    repo = Path(settings.model_repository)
    hint = f"build the default one with: imgserve build-repo --model-repository {repo}"
    if not repo.is_dir():
        return f"model repository {repo} does not exist; {hint}"
    try:
        models = scan_repository(repo)
    except RepositoryError as exc:
        return f"model repository {repo} is invalid: {exc}"
    if not models:
        return f"model repository {repo} holds no models (no <model>/config.pbtxt); {hint}"
    return None


def announce(settings: Settings, grpc_port: int, http_port: int, models: list[str], backend: str) -> None:
    """Tell the operator where the gateway listens and how to call it."""
    host = _client_host(settings.host)
    example = models[0] if models else "MODEL"
    print(f"imgserve gateway is serving {', '.join(models) or 'no models'} (backend: {backend})\n"
          f"  gRPC:    {settings.host}:{grpc_port}  (imgserve.v1.ImageService, inference.GRPCInferenceService)\n"
          f"  HTTP:    http://{host}:{http_port}  (/v1/classify, /v1/models, /v2/..., /openapi.json)\n"
          f"  metrics: http://{host}:{http_port}/metrics\n"
          f"try:\n"
          f"  imgserve classify some.png --server {host}:{grpc_port} --model {example}\n"
          f"  curl -s http://{host}:{http_port}/v1/models",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_args(args)
        level = logging.getLevelName(settings.log_level.upper())
        if not isinstance(level, int):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING or ERROR, not {settings.log_level!r}")
    except ValueError as exc:
        print(f"imgserve serve: invalid settings: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.backend == "onnxruntime":
        problem = check_repository(settings)
        if problem is not None:
            print(f"imgserve serve: {problem}", file=sys.stderr)
            return EXIT_USAGE

    from serving.app import Gateway, StartupError, serve
    from serving.errors import ServingError

    async def run() -> None:
        async def started(gateway: Gateway) -> None:
            statuses = await gateway.dataplane.list_models()
            announce(settings, gateway.grpc_port, gateway.http_port,
                     sorted(s.spec.name for s in statuses), gateway.backend.name)

        await serve(settings, on_started=started)

    try:
        asyncio.run(run())
    except (StartupError, ServingError) as exc:
        print(f"imgserve serve: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except ImportError as exc:
        print(f"imgserve serve: backend {settings.backend!r} is not available here: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130
    return 0
