"""A development PKI for the local stack and the tests: one CA, a server certificate, a client certificate.

`tsunagu stack up` writes it once into `.stack/tls/` so every component can listen with TLS and every
service can present a client certificate (mTLS). The file names are those of a cert-manager Secret
(`tls.crt`, `tls.key`, `ca.crt`), so the same variables point at either. Never for production.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAMES = ("localhost",)
SERVER_IPS = ("127.0.0.1", "::1")
CLIENT_NAME = "tsunagu-dev-client"
VALIDITY = datetime.timedelta(days=825)


@dataclass(frozen=True, slots=True)
class DevPki:
    """Paths of a development PKI directory."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server" / "tls.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server" / "tls.key"

    @property
    def server_pem(self) -> Path:
        """Key and chain in one PEM file (Kafka's PEM keystore)."""
        return self.root / "server" / "keystore.pem"

    @property
    def client_cert(self) -> Path:
        return self.root / "client" / "tls.crt"

    @property
    def client_key(self) -> Path:
        return self.root / "client" / "tls.key"

    def complete(self) -> bool:
        paths = (self.ca_cert, self.ca_key, self.server_cert, self.server_key, self.server_pem)
        return all(p.exists() for p in (*paths, self.client_cert, self.client_key))


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tsunagu development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # PKCS#8: what Kafka's PEM keystore, PostgreSQL, Redis and Mosquitto all read
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(common_name: str = "Tsunagu development CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    common_name: str,
    *,
    server: bool = False,
    client: bool = False,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    uris: tuple[str, ...] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate signed by `ca` for a server and/or a client identity."""
    ca_cert, ca_key = ca
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    alt_names += [x509.UniformResourceIdentifier(uri) for uri in uris]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def write_pair(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_path: Path, key_path: Path) -> None:
    """Write a key and its certificate; the key first readable by its owner only, both replaced atomically."""
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic(key_path, _key_pem(key), 0o600)
    _atomic(cert_path, _cert_pem(cert), 0o644)


def _atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def ensure_dev_pki(root: Path) -> tuple[DevPki, bool]:
    """The PKI under `root`, created when any file is missing; True when it was (re)created now."""
    pki = DevPki(root)
    if pki.complete():
        return pki, False
    root.mkdir(parents=True, exist_ok=True)
    ca = make_ca()
    server_cert, server_key = issue(ca, "localhost", server=True, client=True, dns=SERVER_NAMES, ips=SERVER_IPS)
    client_cert, client_key = issue(ca, CLIENT_NAME, client=True, uris=(f"spiffe://tsunagu.dev/{CLIENT_NAME}",))
    _atomic(pki.ca_key, _key_pem(ca[1]), 0o600)
    _atomic(pki.ca_cert, _cert_pem(ca[0]), 0o644)
    write_pair(server_cert, server_key, pki.server_cert, pki.server_key)
    write_pair(client_cert, client_key, pki.client_cert, pki.client_key)
    _atomic(pki.server_pem, _key_pem(server_key) + _cert_pem(server_cert) + _cert_pem(ca[0]), 0o600)
    return pki, True


def load_ca(pki: DevPki) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{pki.ca_key} is not an EC key")
    return cert, key
