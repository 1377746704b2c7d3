"""``imgserve serve``: start the gateway (gRPC + HTTP/JSON + /metrics) over a model repository."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
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
    return "localhost" if host in ("0.0.0.0", "::", "") else host  # nosec B104 - a comparison, not a bind


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


# A shipped sample image per default model (examples/images/, written by scripts/make_sample_images.py),
# so the banner's first command works when pasted from the repository root.
SAMPLE_IMAGES: dict[str, str] = {
    "lenet5": "examples/images/digit_7.png",
    "resnet20": "examples/images/shape_star.png",
}
PLACEHOLDER_IMAGE = "IMAGE.png"


def client_executable(argv0: str | None = None, cwd: Path | None = None) -> str:
    """How a second shell in the same directory runs this same imgserve.

    ``imgserve`` when it is the one on PATH, else the path it was started by, relative to
    the working directory when inside it (``.venv/bin/imgserve`` after ``make run``).
    """
    exe = Path(argv0 if argv0 is not None else sys.argv[0])
    if exe.name != "imgserve" or not exe.is_file():  # e.g. python -m serving.cli
        return "imgserve"
    found = shutil.which("imgserve")
    if found and Path(found).resolve() == exe.resolve():
        return "imgserve"
    relative = os.path.relpath(exe.absolute(), (cwd or Path.cwd()).absolute())
    return relative if not relative.startswith("..") else str(exe.absolute())


def example_request(models: list[str], cwd: Path | None = None) -> tuple[str, str]:
    """(model, image) for the banner: a default model whose sample image exists here, else a placeholder."""
    root = cwd or Path.cwd()
    for model, image in SAMPLE_IMAGES.items():
        if model in models and (root / image).is_file():
            return model, image
    return (models[0] if models else "MODEL"), PLACEHOLDER_IMAGE


def announce(settings: Settings, grpc_port: int, http_port: int, models: list[str], backend: str) -> None:
    """Tell the operator where the gateway listens and give commands that work pasted into a second shell."""
    host = _client_host(settings.host)
    model, image = example_request(models)
    exe = client_executable()
    everywhere = settings.host in ("0.0.0.0", "::", "")  # nosec B104 - a comparison, not a bind
    listening = f"{settings.host} (all interfaces)" if everywhere else settings.host
    print(f"imgserve gateway is serving {', '.join(models) or 'no models'} (backend: {backend}), "
          f"listening on {listening}\n"
          f"  gRPC:    {host}:{grpc_port}  (imgserve.v1.ImageService, inference.GRPCInferenceService)\n"
          f"  HTTP:    http://{host}:{http_port}  (/v1/classify, /v1/models, /v2/..., /openapi.json)\n"
          f"  metrics: http://{host}:{http_port}/metrics\n"
          f"try, from this directory in a second shell:\n"
          f"  {exe} classify {image} --server {host}:{grpc_port} --model {model}\n"
          f"  {exe} models --server {host}:{grpc_port}\n"
          f"  curl -s http://{host}:{http_port}/v1/models",
          flush=True)


def tell_supervisor() -> bool:
    """In a worker of ``--workers N``: report readiness to the supervisor (it prints the banner)."""
    from serving.workers import READY_FD_ENV

    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return False
    with os.fdopen(int(fd), "w") as pipe:
        pipe.write("ready\n")
    return True


def supervise(settings: Settings, argv: list[str]) -> int:
    """``--workers N``: run N gateway processes on the same ports (serving/workers.py)."""
    from serving.repository import scan_repository
    from serving.workers import Supervisor

    def ready(grpc_port: int, http_port: int) -> None:
        models = sorted(scan_repository(settings.model_repository)) if settings.backend == "onnxruntime" else []
        announce(settings, grpc_port, http_port, models, f"{settings.backend}, {settings.workers} workers")

    try:
        return Supervisor(settings, argv, on_ready=ready).run()
    except KeyboardInterrupt:
        return 130


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

    if settings.workers > 1:
        return supervise(settings, list(sys.argv[1:] if argv is None else argv))

    from serving.app import Gateway, StartupError, serve
    from serving.errors import ServingError

    async def run() -> None:
        async def started(gateway: Gateway) -> None:
            if tell_supervisor():
                return
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
