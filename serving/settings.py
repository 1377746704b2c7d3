"""The gateway's one typed settings object: defaults < IMGSERVE_* env vars < command-line flags."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

ENV_PREFIX = "IMGSERVE_"


@dataclass
class Settings:
    model_repository: Path = Path("model_repository")
    host: str = "0.0.0.0"
    grpc_port: int = 8500
    http_port: int = 8080
    backend: str = "onnxruntime"             # "onnxruntime" (embedded) or "triton"
    triton_url: str = ""                      # host:port[,host:port...] of Triton gRPC endpoints
    max_queue_delay_ms: float = 2.0           # multi-slot models: wait to fill a batch while another call runs
    max_batch_size: int = 0                   # 0: use each model's max_batch_size
    max_queue_size: int = 1024                # crops waiting per model before RESOURCE_EXHAUSTED
    preprocess_threads: int = 0               # 0: one per core
    backend_threads: int = 0                  # ORT intra-op threads; 0: one per core
    device: str = "cpu"                       # embedded backend: cpu, cuda or cuda:N (CUDA EP, falls back to CPU)
    inline_preprocess_pixels: int = 16384     # images up to this many pixels decode on the event loop (0: never)
    inline_infer_ms: float = 0.5              # embedded backend: calls measured faster than this run on the event loop (0: never)
    max_message_mb: int = 64                  # gRPC send/receive limit, both directions
    max_images_per_request: int = 64
    max_image_pixels: int = 50_000_000        # Pillow decompression-bomb guard
    default_top_k: int = 5
    request_timeout_s: float = 30.0           # server-side deadline when the client sets none
    triton_health_interval_s: float = 2.0
    triton_resolve_interval_s: float = 0.0    # >0: re-resolve Triton host names (a headless Service) this often, use every address
    workers: int = 1                          # gateway processes sharing the ports (serving/workers.py)
    reuse_port: bool = False                  # SO_REUSEPORT on both ports (set for each of N workers)
    shutdown_grace_s: float = 10.0            # SIGTERM: how long in-flight requests may take to finish
    log_level: str = "INFO"
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Settings":
        environ = dict(os.environ if environ is None else environ)
        s = cls()
        for f in fields(cls):
            if f.name == "extra":
                continue
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                setattr(s, f.name, _coerce(f.type, raw, f.name))
        return s

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one --flag per field; defaults are None so env values survive unset flags."""
        for f in fields(cls):
            if f.name == "extra":
                continue
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                                help=f"(env {ENV_PREFIX}{f.name.upper()}; default {getattr(cls(), f.name)})")

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: dict[str, str] | None = None) -> "Settings":
        s = cls.from_env(environ)
        for f in fields(cls):
            value = getattr(args, f.name, None)
            if f.name != "extra" and value is not None:
                setattr(s, f.name, _coerce(f.type, str(value), f.name))
        s.validate()
        return s

    def validate(self) -> None:
        if self.backend not in ("onnxruntime", "triton"):
            raise ValueError(f"backend must be 'onnxruntime' or 'triton', not {self.backend!r}")
        if self.backend == "triton" and not self.triton_urls:
            raise ValueError("--backend triton needs --triton-url host:port[,host:port...]")
        for name in ("grpc_port", "http_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} out of range")
        if self.triton_resolve_interval_s < 0:
            raise ValueError("triton_resolve_interval_s must be >= 0 (0 disables DNS discovery)")
        if self.shutdown_grace_s < 0:
            raise ValueError("shutdown_grace_s must be >= 0")
        from serving.backends.ort_device import parse_device

        parse_device(self.device)  # ValueError names the accepted forms
        if self.workers < 1:
            raise ValueError("workers must be >= 1")
        if self.inline_preprocess_pixels < 0 or self.inline_infer_ms < 0:
            raise ValueError("inline_preprocess_pixels and inline_infer_ms must be >= 0 (0 disables)")
        if self.max_queue_size < 1 or self.max_queue_delay_ms < 0:
            raise ValueError("max_queue_size must be >= 1 and max_queue_delay_ms >= 0")

    @property
    def triton_urls(self) -> list[str]:
        return [u.strip() for u in self.triton_url.split(",") if u.strip()]

    @property
    def cores(self) -> int:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024


def _coerce(type_name: object, raw: str, name: str) -> object:
    t = str(type_name)
    try:
        if t in ("int", "<class 'int'>"):
            return int(raw)
        if t in ("float", "<class 'float'>"):
            return float(raw)
        if t in ("bool", "<class 'bool'>"):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if "Path" in t:
            return Path(raw)
    except ValueError as exc:
        raise ValueError(f"setting {name}: {raw!r} is not a valid {t}") from exc
    return raw
