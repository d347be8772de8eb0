"""Mosquitto: MQTT on a plaintext port and a TLS-only one whose client certificate names the user."""

from __future__ import annotations

import contextlib
import os
import pwd
import socket

from tsunagu.stack import proc
from tsunagu.stack.base import Component, copy_tls, tls_connect
from tsunagu.stack.settings import connection_env
from tsunagu.stack.templates import mosquitto_conf

_CLIENT_ID = b"tsunagu-stack-probe"
_VARIABLE_HEADER = b"\x00\x04MQTT\x04\x02\x00\x0a"  # MQTT 3.1.1, clean session, keep-alive 10 s
_PAYLOAD = len(_CLIENT_ID).to_bytes(2, "big") + _CLIENT_ID
CONNECT = bytes([0x10, len(_VARIABLE_HEADER) + len(_PAYLOAD)]) + _VARIABLE_HEADER + _PAYLOAD
CONNACK_ACCEPTED = b"\x20\x02\x00\x00"
DISCONNECT = b"\xe0\x00"


def _connack(sock: socket.socket) -> bool:
    sock.sendall(CONNECT)
    answer = sock.recv(4)
    with contextlib.suppress(OSError):
        sock.sendall(DISCONNECT)
    return answer == CONNACK_ACCEPTED


class Mqtt(Component):
    name = "mqtt"
    port_fields = ("mqtt_port", "mqtt_tls_port")
    service = "mosquitto"
    exe_names = ("mosquitto",)
    runs_as_own_user = True  # mosquitto drops root; it reads its TLS files (and persists) as that user

    @property
    def port(self) -> int:
        return self.settings.mqtt_port

    def detail(self) -> str:
        return connection_env(self.settings)["TSUNAGU_MQTT_URL"]

    def binary(self) -> str | None:
        return proc.which("mosquitto", "/usr/sbin/mosquitto")

    def missing_packages(self) -> list[str]:
        return [] if self.binary() else ["mosquitto"]

    def marker(self) -> str:
        return str(self.home / "mosquitto.conf")

    def prepare(self) -> None:
        data = self.home / "data"
        data.mkdir(parents=True, exist_ok=True)
        user: str | None = None
        owner: pwd.struct_passwd | None = None
        if proc.is_root():
            # run as root, mosquitto drops to its own user, which must own the persistence directory
            try:
                owner = pwd.getpwnam("mosquitto")
            except KeyError:
                user = "root"
            else:
                user = "mosquitto"
                for path in (data, *data.iterdir()):
                    os.chown(path, owner.pw_uid, owner.pw_gid)
        tls = copy_tls(self.settings, self.home / "tls", owner)
        proc.write_if_changed(self.home / "mosquitto.conf", mosquitto_conf(self.settings, user, tls, data))

    def command(self) -> list[str]:
        return [self.binary() or "mosquitto", "-c", str(self.home / "mosquitto.conf")]

    def probe(self, timeout: float) -> bool:
        try:
            with proc.connect(self.port, timeout) as sock:
                if not _connack(sock):
                    return False
            with tls_connect(self.settings, self.settings.mqtt_tls_port, timeout) as tls:
                return _connack(tls)
        except OSError:
            return False
