"""`tsunagu stack` without servers: settings, generated configs, connection variables, the command line."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tsunagu.stack import proc, templates
from tsunagu.stack.cli import main
from tsunagu.stack.components import components
from tsunagu.stack.kafka import kafka_cluster_id
from tsunagu.stack.maven import kafka_pom
from tsunagu.stack.mqtt import Mqtt
from tsunagu.stack.postgres import Postgres
from tsunagu.stack.redis import Redis
from tsunagu.stack.settings import StackError, StackSettings, connection_env, load_settings, tls_connection_env


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("TSUNAGU_STACK_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


HELP_WITHOUT_LOADING_THE_STACK = """
import sys
from tsunagu.cli import main
try:
    main(["stack", "--help"])
except SystemExit as exc:
    loaded = [name for name in ("tsunagu.stack.settings", "tsunagu.stack.commands", "pydantic") if name in sys.modules]
    assert not loaded, loaded
    raise
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_defaults(tmp_path: Path) -> None:
    settings = StackSettings()
    assert settings.dir == (tmp_path / ".stack").resolve()
    assert settings.cache_dir == Path("~/.cache/tsunagu").expanduser().resolve()
    assert (settings.redis_port, settings.kafka_port, settings.kafka_controller_port) == (6379, 9092, 9093)
    assert (settings.mqtt_port, settings.postgres_port, settings.prometheus_port) == (1883, 5432, 9090)
    assert settings.kafka_version == "4.1.1"
    assert settings.start_timeout == 90


def test_every_setting_is_documented() -> None:
    for name, field in StackSettings.model_fields.items():
        assert field.description and len(field.description) > 10, name
    # the docs generator prints the default: it must not depend on the machine
    assert StackSettings.model_fields["dir"].default == Path(".stack")


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TSUNAGU_STACK_REDIS_PORT", "7001")
    monkeypatch.setenv("TSUNAGU_STACK_DIR", "state/here")
    monkeypatch.setenv("TSUNAGU_STACK_START_TIMEOUT", "12.5")
    settings = load_settings()
    assert settings.redis_port == 7001
    assert settings.dir == (tmp_path / "state" / "here").resolve()
    assert settings.dir.is_absolute()
    assert settings.start_timeout == 12.5


@pytest.mark.parametrize(
    ("value", "expected"),
    [("abc", "valid integer"), ("70000", "less than or equal to 65535"), ("0", "greater than or equal to 1")],
)
def test_invalid_port_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, value: str, expected: str) -> None:
    monkeypatch.setenv("TSUNAGU_STACK_REDIS_PORT", value)
    with pytest.raises(StackError) as caught:
        load_settings()
    message = caught.value.reason
    assert "\n" not in message
    assert message.startswith("invalid configuration: TSUNAGU_STACK_REDIS_PORT=")
    assert repr(value) in message
    assert expected in message


def test_invalid_port_exits_2_without_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TSUNAGU_STACK_KAFKA_PORT", "nope")
    assert main(["status"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert "TSUNAGU_STACK_KAFKA_PORT='nope'" in lines[0]
    assert "Traceback" not in captured.err


def test_ports_must_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSUNAGU_STACK_MQTT_PORT", "9092")
    with pytest.raises(StackError, match="TSUNAGU_STACK_MQTT_PORT and TSUNAGU_STACK_KAFKA_PORT are both 9092"):
        load_settings()


def test_kafka_server_properties_use_configured_ports(tmp_path: Path) -> None:
    settings = StackSettings(kafka_port=19192, kafka_controller_port=19193, dir=tmp_path / "s")
    props = dict(line.split("=", 1) for line in templates.kafka_server_properties(settings).splitlines() if "=" in line)
    assert props["process.roles"] == "broker,controller"
    assert props["node.id"] == "1"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19193"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19192,CONTROLLER://127.0.0.1:19193,SSL://127.0.0.1:9094"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19192,SSL://127.0.0.1:9094"
    # the SSL listener: the dev PKI's PEM key store, client certificates required
    assert props["ssl.keystore.type"] == props["ssl.truststore.type"] == "PEM"
    assert props["ssl.keystore.location"] == str(tmp_path / "s" / "tls" / "server" / "keystore.pem")
    assert props["ssl.truststore.location"] == str(tmp_path / "s" / "tls" / "ca.crt")
    assert props["ssl.client.auth"] == "required"
    assert props["controller.listener.names"] == "CONTROLLER"
    assert props["log.dirs"] == str(tmp_path / "s" / "kafka" / "data")
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["transaction.state.log.min.isr"] == "1"
    assert props["auto.create.topics.enable"] == "true"
    assert props["group.initial.rebalance.delay.ms"] == "0"


def test_kafka_pom_and_logging() -> None:
    pom = kafka_pom("4.1.1")
    assert "<artifactId>kafka_2.13</artifactId><version>4.1.1</version>" in pom
    assert "<artifactId>log4j-slf4j-impl</artifactId>" in pom  # matches the slf4j-api 1.7 that Kafka pulls
    assert "<artifactId>log4j-core</artifactId>" in pom
    assert "<packaging>pom</packaging>" in pom
    log4j = templates.kafka_log4j2_properties()
    assert "rootLogger.level = INFO" in log4j
    assert "appender.console.type = Console" in log4j


def test_kafka_cluster_id_is_a_kafka_uuid() -> None:
    for _ in range(50):
        cluster_id = kafka_cluster_id()
        assert len(cluster_id) == 22
        assert not cluster_id.startswith("-")
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_prometheus_scrapes_every_service() -> None:
    settings = StackSettings(prometheus_port=19090)
    text = templates.prometheus_yml(settings)
    assert "scrape_configs:" in text
    assert "'127.0.0.1:19090'" in text
    expected = {
        "ws-gateway": ["8080", "8090"],
        "auth": ["8081"],
        "presence": ["8082"],
        "collab": ["8083"],
        "stream-ingest": ["8084"],
        "mqtt-bridge": ["8085"],
        "sim-engine": ["8086"],
        "audit-log": ["8087"],
    }
    for service, ports in expected.items():
        assert f"  - job_name: tsunagu-{service}\n" in text
        block = text.split(f"job_name: tsunagu-{service}\n", 1)[1].split("job_name:", 1)[0]
        assert "metrics_path: /metrics" in block
        for port in ports:
            assert f"'127.0.0.1:{port}'" in block
    assert "\t" not in text


def test_redis_mosquitto_postgres_configs(tmp_path: Path) -> None:
    settings = StackSettings(dir=tmp_path, redis_port=16380, mqtt_port=11883, postgres_port=15433)
    redis = templates.redis_conf(settings).splitlines()
    assert "bind 127.0.0.1" in redis
    assert "port 16380" in redis
    assert "daemonize no" in redis
    assert "appendonly no" in redis
    assert f"dir {tmp_path / 'redis'}" in redis
    assert "tls-port 6380" in redis and "tls-auth-clients yes" in redis
    assert f"tls-ca-cert-file {tmp_path / 'tls' / 'ca.crt'}" in redis

    mqtt = templates.mosquitto_conf(settings, user="mosquitto").splitlines()
    assert "listener 11883 127.0.0.1" in mqtt
    assert "allow_anonymous true" in mqtt
    assert "persistence true" in mqtt
    assert f"persistence_location {tmp_path / 'mqtt' / 'data'}/" in mqtt
    assert "user mosquitto" in mqtt
    assert not any(line.startswith("user") for line in templates.mosquitto_conf(settings).splitlines())
    assert "listener 8883 127.0.0.1" not in mqtt
    tls_mqtt = templates.mosquitto_conf(settings, tls=tmp_path / "mqtt" / "tls").splitlines()
    listener = tls_mqtt.index("listener 8883 127.0.0.1")
    # the TLS options follow their listener; the plaintext one stays without them
    assert tls_mqtt[listener + 1 :][:6] == [
        f"cafile {tmp_path / 'mqtt' / 'tls' / 'ca.crt'}",
        f"certfile {tmp_path / 'mqtt' / 'tls' / 'tls.crt'}",
        f"keyfile {tmp_path / 'mqtt' / 'tls' / 'tls.key'}",
        "require_certificate true",
        "use_identity_as_username true",
        "persistence true",
    ]
    assert tls_mqtt.index("listener 11883 127.0.0.1") < listener

    postgres = templates.postgres_conf(settings, tmp_path / "run", tmp_path / "pg")
    assert "listen_addresses = '127.0.0.1'" in postgres
    assert "port = 15433" in postgres
    assert f"unix_socket_directories = '{tmp_path / 'run'}'" in postgres
    assert "ssl = on" in postgres and f"hba_file = '{tmp_path / 'pg' / 'pg_hba.conf'}'" in postgres
    hba = templates.postgres_hba().splitlines()
    # the TLS role: by certificate over TLS, refused without TLS, before the password rule for everyone
    assert (
        hba.index("hostssl all tsunagu_tls 127.0.0.1/32 cert map=tsunagu")
        < hba.index("host all tsunagu_tls 0.0.0.0/0 reject")
        < hba.index("host all all 127.0.0.1/32 scram-sha-256")
    )
    assert "tsunagu tsunagu-dev-client tsunagu_tls" in templates.postgres_ident()


def test_connection_env() -> None:
    settings = StackSettings(
        redis_port=7379,
        kafka_port=7092,
        kafka_controller_port=7093,
        mqtt_port=7883,
        postgres_port=7432,
        prometheus_port=7090,
    )
    assert connection_env(settings) == {
        "TSUNAGU_REDIS_URL": "redis://127.0.0.1:7379/0",
        "TSUNAGU_KAFKA_BOOTSTRAP": "127.0.0.1:7092",
        "TSUNAGU_MQTT_URL": "mqtt://127.0.0.1:7883",
        "TSUNAGU_POSTGRES_DSN": "postgresql://tsunagu:tsunagu@127.0.0.1:7432/tsunagu",
        "TSUNAGU_PROMETHEUS_URL": "http://127.0.0.1:7090",
    }


def test_tls_env_points_at_the_tls_only_ports_with_the_dev_pki(tmp_path: Path) -> None:
    settings = StackSettings(dir=tmp_path, redis_tls_port=7380, kafka_tls_port=7094, mqtt_tls_port=7884)
    env = tls_connection_env(settings)
    assert env["TSUNAGU_REDIS_URL"] == "rediss://127.0.0.1:7380/0"
    assert (env["TSUNAGU_KAFKA_BOOTSTRAP"], env["TSUNAGU_KAFKA_SECURITY_PROTOCOL"]) == ("127.0.0.1:7094", "SSL")
    assert env["TSUNAGU_MQTT_URL"] == "mqtts://127.0.0.1:7884"
    assert env["TSUNAGU_POSTGRES_DSN"] == "postgresql://tsunagu_tls@127.0.0.1:5432/tsunagu?sslmode=verify-full"
    assert env["TSUNAGU_TLS_CA_FILE"] == str(tmp_path / "tls" / "ca.crt")
    assert env["TSUNAGU_TLS_CERT_FILE"] == str(tmp_path / "tls" / "client" / "tls.crt")
    assert env["TSUNAGU_SERVER_TLS_CERT_FILE"] == str(tmp_path / "tls" / "server" / "tls.crt")
    assert env["TSUNAGU_SERVER_TLS_CLIENT_CA_FILE"] == env["TSUNAGU_TLS_CA_FILE"]


def test_the_dev_pki_is_made_once_and_its_certificates_verify(tmp_path: Path) -> None:
    from cryptography import x509

    from tsunagu.devpki import ensure_dev_pki

    pki, created = ensure_dev_pki(tmp_path / "tls")
    assert created and ensure_dev_pki(tmp_path / "tls") == (pki, False)
    assert oct(pki.server_key.stat().st_mode & 0o777) == "0o600"
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    client = x509.load_pem_x509_certificate(pki.client_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert client.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "tsunagu-dev-client"
    # the PEM key store Kafka reads: key, then the chain up to the CA
    assert pki.server_pem.read_text().count("BEGIN CERTIFICATE") == 2


def test_env_command_prints_exports(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "export TSUNAGU_REDIS_URL=redis://127.0.0.1:6379/0" in lines
    assert "export TSUNAGU_KAFKA_BOOTSTRAP=127.0.0.1:9092" in lines
    assert "export TSUNAGU_POSTGRES_DSN=postgresql://tsunagu:tsunagu@127.0.0.1:5432/tsunagu" in lines
    assert all(line.startswith("export TSUNAGU_") for line in lines)
    assert len(lines) == 5
    assert main(["env", "--tls"]) == 0
    tls = capsys.readouterr().out.splitlines()
    assert "export TSUNAGU_REDIS_URL=rediss://127.0.0.1:6380/0" in tls
    assert "export TSUNAGU_KAFKA_SECURITY_PROTOCOL=SSL" in tls


def test_env_engines_points_the_services_engines_at_the_stack(capsys: pytest.CaptureFixture[str]) -> None:
    """`eval "$(tsunagu stack env --engines)"` alone is enough to run services on the stack."""
    assert main(["env", "--engines"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3:] == ["export TSUNAGU_BUS=kafka", "export TSUNAGU_BROKER=redis", "export TSUNAGU_DATABASE=postgres"]
    assert "export TSUNAGU_REDIS_URL=redis://127.0.0.1:6379/0" in lines and len(lines) == 8
    assert main(["env", "--tls", "--engines"]) == 0
    tls = capsys.readouterr().out.splitlines()
    assert "export TSUNAGU_REDIS_URL=rediss://127.0.0.1:6380/0" in tls and "export TSUNAGU_BUS=kafka" in tls


@pytest.mark.parametrize(("flags", "engines"), [("", "memory memory memory"), ("--engines", "kafka redis postgres")])
def test_after_the_eval_a_service_reads_these_engines(flags: str, engines: str) -> None:
    """What a service's settings say after `eval "$(tsunagu stack env ...)"` in a shell."""
    read = "from tsunagu_core.config import CoreSettings as C; c = C(); print(c.bus, c.broker, c.database, c.redis_url)"
    script = f'eval "$({sys.executable} -m tsunagu stack env {flags})" && {sys.executable} -c "{read}"'
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TSUNAGU_")}
    result = subprocess.run(["bash", "-c", script], env=clean, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [*engines.split(), "redis://127.0.0.1:6379/0"]


def test_help_lists_the_exit_codes_and_engines(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "exit codes:" in text and "--engines" in text
    codes = {line.split()[0]: line for line in text.split("exit codes:", 1)[1].splitlines() if line.strip()}
    assert set(codes) == {"0", "1", "2", "3", "130"}
    assert "status" in codes["3"] and "does not answer" in codes["3"]
    # `tsunagu stack --help` is the same parser's help, loading none of the stack
    result = subprocess.run(
        [sys.executable, "-c", HELP_WITHOUT_LOADING_THE_STACK], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "exit codes:" in result.stdout and "--engines" in result.stdout


def test_tsunagu_stack_forwards_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    from tsunagu.cli import main as tsunagu_main

    with pytest.raises(SystemExit) as exited:
        tsunagu_main(["stack", "env", "--tls", "--engines"])
    assert exited.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert "export TSUNAGU_KAFKA_SECURITY_PROTOCOL=SSL" in lines and "export TSUNAGU_DATABASE=postgres" in lines


def test_component_selection() -> None:
    settings = StackSettings()
    assert [c.name for c in components(settings)] == ["redis", "kafka", "postgres", "mqtt", "prometheus"]
    assert [c.name for c in components(settings, ["prometheus", "mosquitto", "redis"])] == [
        "redis",
        "mqtt",
        "prometheus",
    ]
    with pytest.raises(StackError, match="unknown component nosuch"):
        components(settings, ["nosuch"])


def test_unknown_component_and_action_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["up", "nosuch"]) == 2
    assert "unknown component nosuch" in capsys.readouterr().err
    assert main(["sideways"]) == 2


def test_reason_line_picks_the_error() -> None:
    maven = "\x1b[0m[ERROR] Failed to execute goal: artifact not found\n[ERROR]\n[ERROR] Re-run Maven with -X\n"
    assert proc.reason_line(maven) == "[ERROR] Failed to execute goal: artifact not found"
    assert proc.reason_line("starting\nsomething odd\n") == "something odd"
    assert proc.reason_line("") == ""


def test_status_with_nothing_running_exits_3(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ports = {_free_port() for _ in range(12)}
    assert len(ports) >= 6
    for name, port in zip(
        ["REDIS", "KAFKA", "KAFKA_CONTROLLER", "MQTT", "POSTGRES", "PROMETHEUS"], sorted(ports), strict=False
    ):
        monkeypatch.setenv(f"TSUNAGU_STACK_{name}_PORT", str(port))
    monkeypatch.setenv("TSUNAGU_STACK_DIR", str(tmp_path / "empty"))
    assert main(["status", "redis", "mqtt", "prometheus", "kafka"]) == 3
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["COMPONENT", "ADDRESS", "STATE", "PID"]
    rows = {line.split()[0]: line.split() for line in out[1:-1]}
    assert set(rows) == {"redis", "kafka", "mqtt", "prometheus"}
    assert all(row[2] == "down" and row[3] == "-" for row in rows.values())
    assert rows["kafka"][4:] == ["bootstrap", rows["kafka"][1]]


def test_down_with_nothing_running(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("TSUNAGU_STACK_DIR", str(tmp_path / "empty"))
    assert main(["down", "redis", "mqtt"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["mqtt", "redis"]  # reverse start order
    assert all(line.endswith("not running") for line in out)


def test_run_points_the_gateway_at_the_embedded_services_on_their_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    """`tsunagu run` with moved ports: the gateway's collab reads, JWKS and web-app probes follow them."""
    from tsunagu.cli import development_defaults

    monkeypatch.setenv("TSUNAGU_COLLAB_PORT", "18183")
    monkeypatch.setenv("TSUNAGU_AUTH_PORT", "18181")
    gateway = development_defaults("ws-gateway")
    assert gateway["collab_url"] == "http://127.0.0.1:18183"
    assert gateway["token_jwks_url"] == "http://127.0.0.1:18181/.well-known/jwks.json"
    assert gateway["web_service_urls"]["collab"] == "http://127.0.0.1:18183"
    monkeypatch.setenv("TSUNAGU_GATEWAY_COLLAB_URL", "http://collab.internal:8083")
    assert "collab_url" not in development_defaults("ws-gateway")
    # auth lets the web app on the gateway's origin log in
    assert "http://127.0.0.1:9999" in development_defaults("auth", gateway_port=9999)["cors_origins"]


def test_run_routes_device_requests_to_the_bridge_and_keeps_it_alone_on_the_embedded_broker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tsunagu.cli import development_defaults

    monkeypatch.delenv("TSUNAGU_MQTT_URL", raising=False)
    monkeypatch.setenv("TSUNAGU_MQTT_BRIDGE_PORT", "18185")
    route = development_defaults("ws-gateway")["rpc_routes"]["mqtt.request"]
    assert route["url"] == "http://127.0.0.1:18185/mqtt.request"
    assert route["publish_to"] == "mqtt:{topic}"  # the caller must be allowed to command the device
    assert development_defaults("mqtt-bridge") == {"share_group": "", "ack_in_order": True}
    # A real broker keeps the bridge's shared subscription (replicas split the load there).
    monkeypatch.setenv("TSUNAGU_MQTT_URL", "mqtt://broker.internal:1883")
    assert development_defaults("mqtt-bridge") == {}
    monkeypatch.setenv("TSUNAGU_GATEWAY_RPC_ROUTES", '{"sim.join": {"url": "http://sim:8086/sim.join"}}')
    assert "rpc_routes" not in development_defaults("ws-gateway")


def test_servers_that_drop_root_live_where_their_user_can_reach(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Mosquitto and PostgreSQL read their files as their own users: under a private parent (a clone in
    `mktemp -d`) the state directory is out of their reach, so they get a directory in /var/tmp."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    settings = StackSettings(dir=private / "clone" / ".stack")
    monkeypatch.setattr(proc, "is_root", lambda: True)
    mqtt, postgres, redis = Mqtt(settings), Postgres(settings), Redis(settings)
    assert mqtt.home.parent == postgres.home.parent == Path("/var/tmp")
    assert mqtt.home.name.startswith("tsunagu-mqtt-") and postgres.home.name.startswith("tsunagu-postgres-")
    assert mqtt.log.parent == mqtt.home
    assert redis.home == settings.dir / "redis", "redis runs as root: it stays in the state directory"
    open_parent = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        open_parent.chmod(0o755)
        reachable = StackSettings(dir=open_parent / ".stack")
        assert Mqtt(reachable).home == open_parent / ".stack" / "mqtt"
    finally:
        open_parent.rmdir()
    data = mqtt.home / "data"
    assert f"persistence_location {data}/" in templates.mosquitto_conf(settings, data=data).splitlines()
