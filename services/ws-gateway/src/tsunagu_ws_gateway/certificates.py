"""Client-certificate authentication: a device or backend that connects over mutual TLS is who its
certificate says, instead of presenting a JWT.

The TLS handshake has already checked the certificate against `TSUNAGU_SERVER_TLS_CLIENT_CA_FILE`; here
its names (URI SANs such as SPIFFE ids, DNS SANs, the CN) are matched against the configured
identities. A grant made from a certificate carries the certificate's fingerprint as its token id and
its notBefore as its issue time, so the revocation of the user or of that fingerprint disconnects it
and keeps it out like a revoked token.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

from tsunagu_core.tls import PeerCertificate, scope_peer

from tsunagu_ws_gateway.config import CertificateIdentity, GatewaySettings
from tsunagu_ws_gateway.tokens import ConnectionGrant


def _matching_name(pattern: str, certificate: PeerCertificate) -> str | None:
    """The first of the certificate's names that the glob `pattern` matches."""
    return next((name for name in certificate.names if fnmatch.fnmatchcase(name, pattern)), None)


def grant_for(identities: Iterable[CertificateIdentity], certificate: PeerCertificate) -> ConnectionGrant | None:
    """The grant of the first identity (in configured order) that matches the certificate."""
    for identity in identities:
        name = _matching_name(identity.match, certificate)
        if name is None:
            continue
        return ConnectionGrant(
            user=identity.user.replace("{name}", name),
            token_id=f"cert:{certificate.fingerprint}",
            issued_at=certificate.not_before,
            channel_patterns=tuple(pattern.replace("{name}", name) for pattern in identity.channels),
            claims={"cert_subject": certificate.subject, "cert_name": name},
        )
    return None


def certificate_grant(settings: GatewaySettings, scope: Mapping[str, Any]) -> ConnectionGrant | None:
    """The grant of the connection's verified client certificate, if one of the identities takes it."""
    if not settings.client_cert_identities:
        return None
    certificate = scope_peer(scope)
    if certificate is None:
        return None
    return grant_for(settings.client_cert_identities, certificate)


def api_certificate(settings: GatewaySettings, scope: Mapping[str, Any]) -> str | None:
    """The name of a backend certificate allowed to use the server API (None: ask for the API key)."""
    if not settings.api_client_certs:
        return None
    certificate = scope_peer(scope)
    if certificate is None:
        return None
    return next((name for pattern in settings.api_client_certs if (name := _matching_name(pattern, certificate))), None)
