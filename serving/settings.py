"""The gateway's one typed settings object: defaults < IMGSERVE_* env vars < command-line flags."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

ENV_PREFIX = "IMGSERVE_"
# Settings only the environment may set: a secret on the command line is visible in `ps` to every user.
ENV_ONLY = frozenset({"auth_tokens"})


@dataclass
class Settings:
    model_repository: Path = Path("model_repository")
    host: str = "0.0.0.0"  # nosec B104 - containers must listen on the pod IP; warned at start (docs/security.md)
    grpc_port: int = 8500
    http_port: int = 8080
    backend: str = "onnxruntime"             # "onnxruntime" (embedded) or "triton"
    triton_url: str = ""                      # host:port[,host:port...] of Triton gRPC endpoints
    max_queue_delay_ms: float = 2.0           # multi-slot models: wait to fill a batch while another call runs
    max_batch_size: int = 0                   # 0: use each model's max_batch_size
    max_queue_size: int = 1024                # crops waiting per model before RESOURCE_EXHAUSTED
    preprocess_threads: int = 0               # 0: one per core
    backend_threads: int = 0                  # ORT intra-op threads; 0: one per core
    backend_spin: bool = False                # ORT intra-op threads spin-wait for work (off: they yield the cores to decoding and RPC)
    device: str = "cpu"                       # embedded backend: cpu, cuda or cuda:N (CUDA EP, falls back to CPU)
    inline_preprocess_pixels: int = 16384     # images up to this many pixels decode on the event loop (0: never)
    inline_infer_ms: float = 0.5              # embedded backend: calls measured faster than this run on the event loop (0: never)
    max_message_mb: int = 64                  # gRPC send/receive limit, both directions
    max_images_per_request: int = 64
    max_image_pixels: int = 50_000_000        # Pillow decompression-bomb guard
    default_top_k: int = 5
    request_timeout_s: float = 30.0           # server-side deadline when the client sets none
    triton_health_interval_s: float = 0.5      # Triton probes (with the breaker: fault and recovery detection)
    triton_resolve_interval_s: float = 0.0    # >0: re-resolve Triton host names (a headless Service) this often, use every address
    workers: int = 1                          # gateway processes sharing the ports (serving/workers.py)
    reuse_port: bool = False                  # SO_REUSEPORT on both ports (set for each of N workers)
    shutdown_grace_s: float = 10.0            # SIGTERM: how long in-flight requests may take to finish
    log_level: str = "INFO"
    # security (docs/security.md): TLS on both ports, mTLS on gRPC, bearer tokens, HTTP slow-client limits
    tls_cert: str = ""                        # PEM certificate chain; with tls_key turns TLS on for gRPC and HTTP
    tls_key: str = ""                         # PEM private key of tls_cert
    tls_client_ca: str = ""                   # PEM CA bundle: gRPC clients must present a certificate it signed (mTLS)
    auth_token_file: str = ""                 # bearer tokens, one per line (re-read when it changes)
    auth_tokens: str = field(default="", repr=False)  # env IMGSERVE_AUTH_TOKENS only (comma-separated); never a flag
    auth_exempt_health: bool = True           # health and readiness answer without a token
    auth_exempt_metrics: bool = True          # /metrics answers without a token
    http_header_timeout_s: float = 10.0       # request line + headers must arrive within this
    http_body_timeout_s: float = 60.0         # the whole request body must arrive within this (408 after)
    http_keepalive_timeout_s: float = 75.0    # idle keep-alive connections are closed after this
    # --- reliability (issue #9): admission, drain, backend faults, model control
    max_request_pixels: int = 400_000_000     # decoded pixels one request may cost (sum over its images); 0: no limit
    large_image_pixels: int = 4_000_000       # images this large never run on the decode pool's express worker
    drain_delay_s: float = 2.0                # SIGTERM: NOT_SERVING this long (still serving) before refusing new requests
    triton_probe_timeout_s: float = 0.5       # a Triton health probe slower than this counts as a failure (hung server)
    model_control_mode: str = "none"          # embedded backend: none | poll | explicit (as Triton's --model-control-mode)
    repository_poll_interval_s: float = 15.0  # model_control_mode poll: how often the repository is rescanned
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
            if f.name == "extra" or f.name in ENV_ONLY:
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
        if self.drain_delay_s < 0 or self.triton_probe_timeout_s <= 0 or self.repository_poll_interval_s <= 0:
            raise ValueError("drain_delay_s must be >= 0, triton_probe_timeout_s and repository_poll_interval_s > 0")
        if self.model_control_mode not in ("none", "poll", "explicit"):
            raise ValueError(f"model_control_mode must be none, poll or explicit, not {self.model_control_mode!r}")
        if self.max_request_pixels < 0 or self.large_image_pixels < 1:
            raise ValueError("max_request_pixels must be >= 0 (0: no limit) and large_image_pixels >= 1")
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
        self._validate_security()

    def _validate_security(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mTLS) needs TLS: give --tls-cert and --tls-key too")
        for name in ("http_header_timeout_s", "http_body_timeout_s", "http_keepalive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")

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
