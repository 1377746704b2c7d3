"""Who may talk to the gateway: bearer tokens, TLS material and the exposure warning.

Transport-neutral on purpose: the gRPC interceptor and the aiohttp middleware
(serving/transports/auth.py) both ask the same ``TokenStore`` and the same
exemption lists, so the two doors can never disagree about who gets in.

Why tokens are hashed: ``hmac.compare_digest`` is constant-time only for inputs of
equal length. Comparing SHA-256 digests makes every comparison the same length,
so neither the content nor the length of a configured token leaks through timing;
and every configured token is compared on every call (no early exit), so which
token matched does not leak either.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from serving.settings import Settings

log = logging.getLogger("imgserve.security")

BEARER = "bearer"
# How often (at most) the token file is stat()ed for changes: rotation takes effect within this.
TOKEN_FILE_CHECK_S = 1.0
MIN_TOKEN_LENGTH = 16  # shorter tokens are accepted but logged as weak

# Calls that answer without a token when settings.auth_exempt_health is on: what load balancers,
# kubelet probes and `imgserve` readiness checks call. Reflection is NOT exempt: it lists the API.
GRPC_HEALTH_METHODS = frozenset({
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
})
HTTP_HEALTH_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
HTTP_METRICS_PATHS = frozenset({"/metrics"})


class SecurityConfigError(ValueError):
    """TLS or token configuration that cannot work (unreadable file, key without cert, no tokens)."""


def _digest(token: str | bytes) -> bytes:
    raw = token.encode("utf-8") if isinstance(token, str) else token
    return hashlib.sha256(raw).digest()


def parse_token_lines(text: str) -> list[str]:
    """Tokens from a token file: one per line; blank lines and ``#`` comments are ignored."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def parse_token_list(text: str) -> list[str]:
    """Tokens from IMGSERVE_AUTH_TOKENS: separated by commas, whitespace or newlines."""
    return [t for t in text.replace(",", " ").split() if t]


@dataclass(frozen=True)
class _FileState:
    mtime_ns: int
    size: int
    inode: int


class TokenStore:
    """The accepted bearer tokens: from IMGSERVE_AUTH_TOKENS and/or a token file, several at once.

    Several tokens exist so that rotation needs no restart: add the new token, move clients
    over, remove the old one. The file is re-read when its mtime, size or inode changes
    (checked at most every TOKEN_FILE_CHECK_S), which also follows a Kubernetes Secret volume's
    atomic symlink swap. A file that cannot be read during a check keeps the previous tokens
    (a rotation half-done must not lock everyone out) and logs a warning; a file that reads
    empty means "no tokens from the file" (fail closed). Tokens themselves are never logged.
    """

    def __init__(self, env_tokens: list[str], token_file: Path | None,
                 check_interval_s: float = TOKEN_FILE_CHECK_S) -> None:
        self._env = [_digest(t) for t in env_tokens]
        self._file = token_file
        self._file_tokens: list[bytes] = []
        self._file_state: _FileState | None = None
        self._check_interval_s = check_interval_s
        self._next_check = 0.0
        self._lock = threading.Lock()
        if token_file is not None:
            try:
                self._reload(force=True)
            except OSError as exc:
                raise SecurityConfigError(f"cannot read --auth-token-file {token_file}: "
                                          f"{exc.strerror or exc}") from None
        weak = sum(1 for t in env_tokens if len(t) < MIN_TOKEN_LENGTH)
        if weak:
            log.warning("%d token(s) from IMGSERVE_AUTH_TOKENS are shorter than %d characters", weak,
                        MIN_TOKEN_LENGTH)

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenStore | None:
        """The store for these settings; None when authentication is off (no token source configured)."""
        env_tokens = parse_token_list(settings.auth_tokens)
        token_file = Path(settings.auth_token_file) if settings.auth_token_file else None
        if not env_tokens and token_file is None:
            return None
        store = cls(env_tokens, token_file)
        if store.count == 0:
            raise SecurityConfigError("authentication is configured but no tokens were found "
                                      f"(--auth-token-file {token_file} holds none and IMGSERVE_AUTH_TOKENS is empty)")
        return store

    @property
    def count(self) -> int:
        return len(self._env) + len(self._file_tokens)

    def _reload(self, force: bool = False) -> None:
        if self._file is None:
            return
        st = os.stat(self._file)
        state = _FileState(st.st_mtime_ns, st.st_size, st.st_ino)
        if not force and state == self._file_state:
            return
        tokens = parse_token_lines(self._file.read_text(encoding="utf-8"))
        self._file_tokens = [_digest(t) for t in tokens]
        self._file_state = state
        weak = sum(1 for t in tokens if len(t) < MIN_TOKEN_LENGTH)
        log.info("loaded %d token(s) from %s%s", len(tokens), self._file,
                 f" ({weak} shorter than {MIN_TOKEN_LENGTH} characters)" if weak else "")
        if not tokens:
            log.warning("token file %s holds no tokens: requests authenticated by it are refused", self._file)

    def _maybe_reload(self) -> None:
        if self._file is None:
            return
        now = time.monotonic()
        if now < self._next_check:
            return
        with self._lock:
            if now < self._next_check:
                return
            self._next_check = now + self._check_interval_s
            try:
                self._reload()
            except (OSError, UnicodeDecodeError) as exc:
                log.warning("cannot re-read token file %s (%s); keeping the %d token(s) loaded before",
                            self._file, getattr(exc, "strerror", None) or type(exc).__name__,
                            len(self._file_tokens))

    def accepts(self, presented: str | None) -> bool:
        """Whether ``presented`` is one of the configured tokens, in time independent of which (or none)."""
        self._maybe_reload()
        if not presented:
            return False
        candidate = _digest(presented)
        matched = False
        for known in (*self._env, *self._file_tokens):
            matched |= hmac.compare_digest(candidate, known)
        return matched


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != BEARER or not token.strip():
        return None
    return token.strip()


@dataclass(frozen=True)
class AuthPolicy:
    """Which calls need a token: everything except the configured exemptions."""

    tokens: TokenStore
    exempt_health: bool = True
    exempt_metrics: bool = True

    def grpc_exempt(self, method: str) -> bool:
        return self.exempt_health and method in GRPC_HEALTH_METHODS

    def http_exempt(self, path: str) -> bool:
        return ((self.exempt_health and path in HTTP_HEALTH_PATHS)
                or (self.exempt_metrics and path in HTTP_METRICS_PATHS))

    @classmethod
    def from_settings(cls, settings: Settings) -> AuthPolicy | None:
        store = TokenStore.from_settings(settings)
        if store is None:
            return None
        return cls(store, settings.auth_exempt_health, settings.auth_exempt_metrics)


# ---------------------------------------------------------------- TLS

def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def tls_enabled(settings: Settings) -> bool:
    return bool(settings.tls_cert)


def grpc_server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port (None: plaintext); with ``tls_client_ca`` clients must present a cert
    signed by that CA (mTLS), otherwise the handshake fails."""
    if not tls_enabled(settings):
        return None
    key = _read(settings.tls_key, "--tls-key")
    cert = _read(settings.tls_cert, "--tls-cert")
    _check_pair(settings)
    client_ca = _read(settings.tls_client_ca, "--tls-client-ca") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def http_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The server-side SSLContext for the HTTP port (None: plaintext); TLS 1.2 or newer.

    Client certificates are not requested on HTTP: kubelet probes and Prometheus scrape it,
    and tokens authenticate its callers (docs/security.md).
    """
    if not tls_enabled(settings):
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise SecurityConfigError(f"cannot load --tls-cert {settings.tls_cert} / --tls-key {settings.tls_key}: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from None
    return ctx


def _check_pair(settings: Settings) -> None:
    """Fail at start, with the file names, when the key does not belong to the certificate.

    grpc only notices a mismatch at the first handshake (and then every client fails), so the
    pair is loaded once through ssl, which checks it.
    """
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        probe.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise SecurityConfigError(f"--tls-cert {settings.tls_cert} and --tls-key {settings.tls_key} are not a "
                                  f"usable pair: {getattr(exc, 'strerror', None) or exc}") from None


# ---------------------------------------------------------------- exposure

def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(settings: Settings) -> str | None:
    """A loud line for the log when the gateway listens beyond loopback without TLS or without tokens.

    The default stays 0.0.0.0 because containers (Dockerfile, k8s/) must listen on the pod's
    address; the warning makes the open door visible instead of refusing to start.
    """
    if is_loopback(settings.host):
        return None
    missing = [what for what, on in (("TLS (--tls-cert/--tls-key)", tls_enabled(settings)),
                                     ("authentication (--auth-token-file or IMGSERVE_AUTH_TOKENS)",
                                      bool(settings.auth_token_file or settings.auth_tokens.strip())))
               if not on]
    if not missing:
        return None
    where = "all interfaces" if settings.host in ("0.0.0.0", "::", "") else settings.host  # nosec B104 - a comparison
    return (f"listening on {where} without {' and without '.join(missing)}: anyone who can reach these ports "
            f"can use every model; configure them, or pass --host 127.0.0.1 for local use (docs/security.md)")


# ---------------------------------------------------------------- refusal log

class ThrottledLog:
    """One WARNING per ``every_s`` for a stream of similar refusals, with how many were folded in.

    Hostile traffic (a scanner without a token, a fuzzer sending garbage) must stay visible in the
    log without letting the attacker write it at line rate.
    """

    def __init__(self, logger: logging.Logger, every_s: float = 10.0) -> None:
        self._log = logger
        self._every_s = every_s
        self._next = 0.0
        self._folded = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._folded += 1
            return
        folded, self._folded, self._next = self._folded, 0, now + self._every_s
        suffix = f" (and {folded} more like it in the last {self._every_s:g} s)" if folded else ""
        self._log.warning(message + suffix, *args)
