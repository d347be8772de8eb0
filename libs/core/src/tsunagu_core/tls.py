"""TLS for every connection of the platform, from the `TSUNAGU_TLS_*` and `TSUNAGU_SERVER_TLS_*` settings.

One function builds the client `ssl.SSLContext` (`client_context`) that every client builder uses: Redis
(`rediss://`), Kafka (librdkafka takes the same files as `ssl.*.location`), PostgreSQL (asyncpg `ssl=`,
when the DSN asks for `sslmode`), the MQTT broker (`mqtts://`). A missing or unreadable file is a
`ConfigError` naming the variable.

On the serving side `ServerTls` keeps one server context for the life of the process: uvicorn is given
that object, and `reload_if_changed()` loads a rotated certificate into the same context, so new
handshakes get the new certificate while open connections carry on. The peer certificate of each
connection is recorded by the protocol classes of `tls_protocols()` (what `uvicorn_options` serves
with), and `scope_peer(scope)` finds it by the scope's client address, for client-certificate auth.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tsunagu_core.config import ConfigError, TlsSettings, load_settings

log = logging.getLogger("tsunagu.tls")

TLS_SSLMODES = ("require", "verify-ca", "verify-full")


def _check_file(variable: str, path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"{variable}={path!r}: no such file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{variable}={path!r}: not readable by this process")


def _load_chain(context: ssl.SSLContext, cert_variable: str, cert: str, key_variable: str, key: str) -> None:
    if not key:
        raise ConfigError(f"{cert_variable} is set but {key_variable} is empty: both are needed")
    if not cert:
        raise ConfigError(f"{key_variable} is set but {cert_variable} is empty: both are needed")
    _check_file(cert_variable, cert)
    _check_file(key_variable, key)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(f"{cert_variable}={cert!r} with {key_variable}={key!r}: not a usable pair: {exc}") from None


def _load_ca(context: ssl.SSLContext, variable: str, path: str) -> None:
    _check_file(variable, path)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise ConfigError(f"{variable}={path!r}: not a PEM CA file: {exc}") from None


def client_settings() -> TlsSettings:
    return load_settings(TlsSettings)


def client_context(settings: TlsSettings | None = None, *, check_hostname: bool | None = None) -> ssl.SSLContext:
    """The context a service connects to a TLS server with: verify it against the CA, present our certificate."""
    tls = settings if settings is not None else client_settings()
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if tls.tls_ca_file:
        _load_ca(context, "TSUNAGU_TLS_CA_FILE", tls.tls_ca_file)
    if tls.tls_cert_file or tls.tls_key_file:
        _load_chain(context, "TSUNAGU_TLS_CERT_FILE", tls.tls_cert_file, "TSUNAGU_TLS_KEY_FILE", tls.tls_key_file)
    context.check_hostname = tls.tls_check_hostname if check_hostname is None else check_hostname
    return context


# --------------------------------------------------------------------------- per dependency


def kafka_config(settings: TlsSettings | None = None) -> dict[str, Any]:
    """librdkafka properties for `TSUNAGU_KAFKA_SECURITY_PROTOCOL` (empty for PLAINTEXT)."""
    tls = settings if settings is not None else client_settings()
    if tls.kafka_security_protocol != "SSL":
        return {}
    client_context(tls)  # the same checks, the same one-line errors, before librdkafka reads the files
    config: dict[str, Any] = {"security.protocol": "SSL"}
    if tls.tls_ca_file:
        config["ssl.ca.location"] = tls.tls_ca_file
    if tls.tls_cert_file:
        config["ssl.certificate.location"] = tls.tls_cert_file
        config["ssl.key.location"] = tls.tls_key_file
    config["ssl.endpoint.identification.algorithm"] = "https" if tls.tls_check_hostname else "none"
    return config


def postgres_ssl(dsn: str, settings: TlsSettings | None = None) -> ssl.SSLContext | None:
    """asyncpg's `ssl=` for a DSN with `sslmode=require|verify-ca|verify-full` and no files of its own."""
    query = parse_qs(urlsplit(dsn).query)
    mode = (query.get("sslmode") or [""])[-1]
    if mode not in TLS_SSLMODES or any(k in query for k in ("sslrootcert", "sslcert", "sslkey")):
        return None  # plaintext, `prefer`/`allow`, or a DSN that names its own files: asyncpg does it
    tls = settings if settings is not None else client_settings()
    context = client_context(tls, check_hostname=mode == "verify-full" and tls.tls_check_hostname)
    if mode == "require" and not tls.tls_ca_file:
        context.verify_mode = ssl.CERT_NONE  # libpq's `require` without a root certificate: encrypt only
    return context


def redis_tls(url: str, settings: TlsSettings | None = None) -> ssl.SSLContext | None:
    """The context of a `rediss://` URL, and of `rediss-cluster://` and `rediss-sentinel://` (None without TLS)."""
    if not urlsplit(url).scheme.startswith("rediss"):
        return None
    return client_context(settings)


# --------------------------------------------------------------------------- serving


@dataclass(slots=True)
class _Stamp:
    files: tuple[str, ...]
    seen: tuple[tuple[int, int, int], ...] = ()

    def read(self) -> tuple[tuple[int, int, int], ...]:
        stamps = []
        for path in self.files:
            try:
                st = os.stat(path)  # follows the symlinks of a mounted Secret (..data swaps)
            except OSError:
                stamps.append((0, 0, 0))
            else:
                stamps.append((st.st_mtime_ns, st.st_ino, st.st_size))
        return tuple(stamps)


@dataclass(slots=True)
class ServerTls:
    """One server context for the life of a process; a rotated certificate is loaded into it in place."""

    cert_file: str
    key_file: str
    client_ca_file: str = ""
    client_auth: str = "optional"
    context: ssl.SSLContext = field(init=False)
    reloads: int = 0
    _stamp: _Stamp = field(init=False)

    def __post_init__(self) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        _load_chain(
            context, "TSUNAGU_SERVER_TLS_CERT_FILE", self.cert_file, "TSUNAGU_SERVER_TLS_KEY_FILE", self.key_file
        )
        if self.client_ca_file:
            _load_ca(context, "TSUNAGU_SERVER_TLS_CLIENT_CA_FILE", self.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED if self.client_auth == "required" else ssl.CERT_OPTIONAL
        context.set_alpn_protocols(["http/1.1"])
        self.context = context
        self._stamp = _Stamp(
            (self.cert_file, self.key_file, self.client_ca_file)
            if self.client_ca_file
            else (self.cert_file, self.key_file)
        )
        self._stamp.seen = self._stamp.read()

    @classmethod
    def from_settings(cls, settings: TlsSettings) -> ServerTls | None:
        """None when no server certificate is configured (plain HTTP)."""
        if not settings.server_tls_cert_file and not settings.server_tls_key_file:
            if settings.server_tls_client_ca_file:
                raise ConfigError("TSUNAGU_SERVER_TLS_CLIENT_CA_FILE needs TSUNAGU_SERVER_TLS_CERT_FILE and _KEY_FILE")
            return None
        return cls(
            settings.server_tls_cert_file,
            settings.server_tls_key_file,
            settings.server_tls_client_ca_file,
            settings.server_tls_client_auth,
        )

    def reload_if_changed(self) -> bool:
        """Load the files into the live context when they changed; a half-written pair is retried later."""
        current = self._stamp.read()
        if current == self._stamp.seen:
            return False
        scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            # check the new pair on a scratch context first: a failed load must not leave the live one broken
            _load_chain(
                scratch, "TSUNAGU_SERVER_TLS_CERT_FILE", self.cert_file, "TSUNAGU_SERVER_TLS_KEY_FILE", self.key_file
            )
            if self.client_ca_file:
                _load_ca(scratch, "TSUNAGU_SERVER_TLS_CLIENT_CA_FILE", self.client_ca_file)
        except ConfigError as exc:
            log.warning("server certificate changed but cannot be loaded yet (kept the previous one): %s", exc)
            return False
        self.context.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file:
            self.context.load_verify_locations(cafile=self.client_ca_file)
        self._stamp.seen = current
        self.reloads += 1
        log.info("reloaded the server certificate from %s", self.cert_file)
        return True

    async def watch(self, interval: float) -> None:
        """Check the files every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.reload_if_changed()
            except Exception as exc:  # never let a bad file end the watcher
                log.warning("server certificate reload failed: %r", exc)


# --------------------------------------------------------------------------- the peer certificate in the scope


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """A verified client certificate: its subject, names and DER bytes (as the TLS handshake checked it)."""

    subject: str  # RFC 4514, e.g. "CN=device-7,O=Acme"
    common_name: str
    dns_names: tuple[str, ...]
    uris: tuple[str, ...]
    der: bytes
    not_before: float = 0.0  # seconds since the epoch
    not_after: float = 0.0

    @property
    def names(self) -> tuple[str, ...]:
        """What identifies the holder, most specific first: URI SANs (SPIFFE ids), DNS SANs, the CN."""
        return (*self.uris, *self.dns_names, *((self.common_name,) if self.common_name else ()))

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the DER certificate, hex: what revoking one certificate names."""
        return hashlib.sha256(self.der).hexdigest()


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> PeerCertificate | None:
    """The client certificate the handshake verified (None without one: `getpeercert()` is empty then)."""
    if ssl_object is None:
        return None
    parsed = ssl_object.getpeercert()
    der = ssl_object.getpeercert(binary_form=True)
    if not parsed or not der:
        return None
    parts = []
    common_name = ""
    subject: Any = parsed.get("subject", ())
    for rdn in reversed(subject):
        for key, value in rdn:
            short = _SHORT_NAMES.get(key, key)
            parts.append(f"{short}={value}")
            if key == "commonName" and not common_name:
                common_name = value
    alt: Any = parsed.get("subjectAltName", ())
    return PeerCertificate(
        subject=",".join(parts),
        common_name=common_name,
        dns_names=tuple(str(v) for k, v in alt if k == "DNS"),
        uris=tuple(str(v) for k, v in alt if k == "URI"),
        der=der,
        not_before=_cert_time(parsed.get("notBefore")),
        not_after=_cert_time(parsed.get("notAfter")),
    )


def _cert_time(value: Any) -> float:
    try:
        return float(ssl.cert_time_to_seconds(value)) if isinstance(value, str) else 0.0
    except ValueError:
        return 0.0


_SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
}

# Live TLS connections by (client host, client port, our port): filled by the protocol classes, read by
# `scope_peer`. Our port is part of the key because one client address may hold connections to several
# of the ports of one process (`tsunagu run`), e.g. behind a NAT.
_PEERS: dict[tuple[str, int, int], dict[str, Any]] = {}


def _tls_extension(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    peer = peer_certificate(ssl_object)
    version = ssl_object.version() or ""
    return {
        # the keys of the ASGI TLS extension, plus the parsed certificate
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(peer.der)] if peer else [],
        "client_cert_name": peer.subject if peer else None,
        "client_cert_error": None,
        "tls_version": version,
        "cipher_suite": (ssl_object.cipher() or ("",))[0],
        "tsunagu.peer": peer,
    }


def _address(transport: asyncio.BaseTransport) -> tuple[str, int, int] | None:
    peer = transport.get_extra_info("peername")
    local = transport.get_extra_info("sockname")
    if isinstance(peer, tuple) and len(peer) >= 2 and isinstance(local, tuple) and len(local) >= 2:
        return str(peer[0]), int(peer[1]), int(local[1])
    return None


def tls_protocols(
    http_class: type[asyncio.Protocol], ws_class: type[asyncio.Protocol] | None
) -> tuple[type, type | None]:
    """Subclasses of uvicorn's protocol classes that record each TLS connection's peer certificate.

    The HTTP protocol sees the connection first (a WebSocket upgrade hands the transport on to the
    WebSocket protocol, whose `connection_lost` then ends it), so it records and both forget."""

    class TlsHttp(http_class):  # type: ignore[valid-type,misc]
        # what `merge_server_options` replaces by the app's own class, subclassed the same way
        tsunagu_tls = True

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            address = _address(transport)
            info = _tls_extension(transport)
            if address is not None and info is not None:
                _PEERS[address] = info
            self._tsunagu_address = address
            super().connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            address = getattr(self, "_tsunagu_address", None)
            if address is not None:
                _PEERS.pop(address, None)
            super().connection_lost(exc)

        def shutdown(self) -> None:
            super().shutdown()
            transport = getattr(self, "transport", None)
            if transport is not None and transport.is_closing():
                # An idle keep-alive connection: closing TLS waits for the client's close_notify, which an
                # idle client never sends (30 s, asyncio's ssl_shutdown_timeout): a stopping server would
                # hang on it. Nothing is in flight, so drop it.
                transport.abort()

    if ws_class is None:
        return TlsHttp, None
    return TlsHttp, tls_websocket_protocol(ws_class)


def tls_websocket_protocol(ws_class: type[asyncio.Protocol]) -> type:
    """`ws_class` (uvicorn's or an app's own WebSocket protocol) forgetting its TLS peer at the end."""

    class TlsWs(ws_class):  # type: ignore[valid-type,misc]
        # what `merge_server_options` replaces by the app's own class, subclassed the same way
        tsunagu_tls = True

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # the address now: a closed TLS transport no longer answers get_extra_info
            self._tsunagu_address = _address(transport)
            super().connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            address = getattr(self, "_tsunagu_address", None)
            if address is not None:
                _PEERS.pop(address, None)
            super().connection_lost(exc)

    return TlsWs


def scope_tls(scope: Mapping[str, Any]) -> dict[str, Any] | None:
    """The TLS extension of a scope: from the server when it sets one, else recorded for the client address."""
    extensions = scope.get("extensions") or {}
    if "tls" in extensions:
        info: dict[str, Any] | None = extensions["tls"]
        return info
    client, server = scope.get("client"), scope.get("server")
    if client and server and len(server) >= 2 and server[1] is not None:
        return _PEERS.get((str(client[0]), int(client[1]), int(server[1])))
    return None


def scope_peer(scope: Mapping[str, Any]) -> PeerCertificate | None:
    info = scope_tls(scope)
    peer = info.get("tsunagu.peer") if info else None
    return peer if isinstance(peer, PeerCertificate) else None


def uvicorn_options(server_tls: ServerTls) -> dict[str, Any]:
    """`uvicorn.Config` keyword arguments that serve with `server_tls`'s live context and record each
    connection's client certificate for `scope_peer` (uvicorn's protocol classes, subclassed)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol
    from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

    ws_class = AutoWebSocketsProtocol if isinstance(AutoWebSocketsProtocol, type) else None
    http, ws = tls_protocols(AutoHTTPProtocol, ws_class)
    return {
        "ssl_context_factory": lambda _config, _default: server_tls.context,
        "http": http,
        "ws": ws if ws is not None else "none",
    }


def merge_server_options(own: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """An app's own uvicorn options (`app.state.server_options`) with `options` (e.g. `uvicorn_options`)
    over them; an app's own WebSocket and HTTP protocol classes stay, subclassed to record TLS peers
    when `options` serves TLS."""
    merged = {**own, **options}
    base, tls_ws = own.get("ws"), options.get("ws")
    if isinstance(base, type) and getattr(tls_ws, "tsunagu_tls", False):
        merged["ws"] = tls_websocket_protocol(base)
    base_http, tls_http = own.get("http"), options.get("http")
    if isinstance(base_http, type) and getattr(tls_http, "tsunagu_tls", False):
        merged["http"] = tls_protocols(base_http, None)[0]
    return merged


def known_peers() -> Iterable[tuple[str, int, int]]:
    """(client host, client port, our port) of the live TLS connections (for tests and debugging)."""
    return list(_PEERS)
