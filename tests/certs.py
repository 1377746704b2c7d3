"""Certificates made inside the tests (the ``cryptography`` package): a CA, server, client and expired ones.

Why generated, not committed: committed keys expire, get copied into real deployments, and
hide what the tests assume. ``make_pki(dir)`` writes PEM files for a private CA, a server
certificate for 127.0.0.1/localhost, a client certificate, an expired server certificate
and an expired client certificate, plus a second CA that signed nothing the gateway trusts.
EC P-256 keys keep generation to milliseconds.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from tests.requirements import require_module


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    expired_server_cert: Path
    expired_server_key: Path
    expired_client_cert: Path
    expired_client_key: Path
    other_ca: Path
    stranger_cert: Path        # a client certificate signed by other_ca
    stranger_key: Path


def make_pki(directory: Path) -> Pki:
    require_module("cryptography", "pip install cryptography (in the dev extra)")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(k: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def make_ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        k = key()
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(k.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False)
                .sign(k, hashes.SHA256()))
        return cert, k

    def leaf(cn: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], server: bool,
             expired: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        k = key()
        start, end = ((now - dt.timedelta(days=30), now - dt.timedelta(days=1)) if expired
                      else (now - dt.timedelta(days=1), now + dt.timedelta(days=30)))
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca[0].subject)
                   .public_key(k.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                         else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca[1].public_key()),
                                  critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(ca[1], hashes.SHA256()), k

    d = directory
    ca = make_ca("imgserve test CA")
    other = make_ca("someone else's CA")
    server, client = leaf("localhost", ca, server=True), leaf("test client", ca, server=False)
    old_server, old_client = leaf("localhost", ca, True, expired=True), leaf("old client", ca, False, expired=True)
    stranger = leaf("stranger", other, server=False)
    return Pki(
        ca=write_cert(ca[0], d / "ca.pem"),
        server_cert=write_cert(server[0], d / "server.pem"), server_key=write_key(server[1], d / "server.key"),
        client_cert=write_cert(client[0], d / "client.pem"), client_key=write_key(client[1], d / "client.key"),
        expired_server_cert=write_cert(old_server[0], d / "expired-server.pem"),
        expired_server_key=write_key(old_server[1], d / "expired-server.key"),
        expired_client_cert=write_cert(old_client[0], d / "expired-client.pem"),
        expired_client_key=write_key(old_client[1], d / "expired-client.key"),
        other_ca=write_cert(other[0], d / "other-ca.pem"),
        stranger_cert=write_cert(stranger[0], d / "stranger.pem"), stranger_key=write_key(stranger[1], d / "stranger.key"),
    )
