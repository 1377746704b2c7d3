"""How a client proves who it is and checks who it talks to: bearer token and TLS options.

One object for both transports, so ``token=``, ``ca_file=`` and ``client_cert=`` mean the
same over gRPC and HTTP: the token travels as ``authorization: Bearer <token>`` (gRPC
metadata or HTTP header), the CA file verifies the gateway's certificate, and the client
certificate answers a gateway that requires mTLS.
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from clients.sdk.errors import InvalidArgument


def read_token_file(path: str | Path) -> str:
    """The first token in a token file (one per line, ``#`` comments and blank lines skipped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidArgument(f"cannot read token file {path}: {exc.strerror or exc}") from None
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    raise InvalidArgument(f"token file {path} holds no token")


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {what} {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class ConnectionSecurity:
    """Token and TLS settings of one client.

    ``tls``: None means "on when a CA file or client certificate is given, or the URL is https://".
    The token's value never appears in repr() (it would end up in logs and tracebacks).
    """

    token: str | None = None
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    tls: bool | None = None

    def __repr__(self) -> str:
        return (f"ConnectionSecurity(token={'***' if self.token else None}, ca_file={self.ca_file!r}, "
                f"client_cert={self.client_cert!r}, tls={self.tls!r})")

    @classmethod
    def create(cls, token: str | None = None, token_file: str | Path | None = None, ca_file: str | Path | None = None,
               client_cert: str | Path | None = None, client_key: str | Path | None = None,
               tls: bool | None = None) -> ConnectionSecurity:
        if token is not None and token_file is not None:
            raise ValueError("give token or token_file, not both")
        if token_file is not None:
            token = read_token_file(token_file)
        if token is not None and (not token.strip() or any(c in token for c in "\r\n")):
            raise ValueError("token must be a non-empty single line")
        if client_key is not None and client_cert is None:
            raise ValueError("client_key needs client_cert")
        if tls is False and (ca_file or client_cert):
            raise ValueError("ca_file / client_cert need TLS, but tls=False")
        return cls(token.strip() if token else None, str(ca_file) if ca_file else None,
                   str(client_cert) if client_cert else None, str(client_key) if client_key else None, tls)

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    def wants_tls(self, https_url: bool = False) -> bool:
        return self.tls if self.tls is not None else bool(https_url or self.ca_file or self.client_cert)

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials: the CA file (else the system roots) and, for mTLS, the client pair."""
        root = _read(self.ca_file, "CA file") if self.ca_file else None
        chain = _read(self.client_cert, "client certificate") if self.client_cert else None
        key = _read(self.client_key or self.client_cert, "client key") if self.client_cert else None
        return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)

    def ssl_context(self) -> ssl.SSLContext:
        """An HTTPS client context verifying the gateway (CA file, else the system roots); TLS 1.2+."""
        try:
            ctx = ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidArgument(f"cannot load CA file {self.ca_file}: {getattr(exc, 'strerror', None) or exc}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.client_cert:
            try:
                ctx.load_cert_chain(self.client_cert, self.client_key)
            except (OSError, ssl.SSLError) as exc:
                raise InvalidArgument(f"cannot load client certificate {self.client_cert}: {exc}") from None
        return ctx
