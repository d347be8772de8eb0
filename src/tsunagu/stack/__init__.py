"""`tsunagu stack up|down|status|env [COMPONENT...]`: the real local infrastructure on 127.0.0.1.

Redis, Mosquitto (MQTT), PostgreSQL and Prometheus run from their Debian packages (installed with apt when
missing), Kafka in KRaft mode from the Apache jars fetched once with Maven into the cache directory. Each
component runs as a detached process on a config generated here, with its config, data, log and pid file
under one state directory (`.stack/` by default), so the stack never depends on the system services that
the Debian packages would start.

`up` is idempotent and waits until each component really answers (a Redis PING, an MQTT CONNACK, a
PostgreSQL login, Prometheus /-/ready, a Kafka metadata request); `down` stops them and keeps the data;
`status` tells which answer; `env` prints the variables that point the services at the stack.

The modules, from the command line down:
  cli          the arguments, the help and the exit codes (imports nothing heavy: `tsunagu --help` stays fast)
  commands     up, down, status, env
  components   the components by name, in start order
  redis, kafka, postgres, mqtt, prometheus, turn   one server each; redis also has PrivateRedis for tests
  base         what every component shares: pid files, start, probe, stop, its TLS files
  templates    the generated config files
  apt, maven   Debian packages; the Kafka jars from Maven Central
  proc         processes, ports, pid files, logs, running a tool
  settings     TSUNAGU_STACK_* settings, StackError, the TSUNAGU_* variables that point at the stack
"""

# Names the command line needs before anything heavy is imported (`tsunagu --help` builds its parser).

# The components in start order, and the other names they answer to.
COMPONENTS = ("redis", "kafka", "postgres", "mqtt", "prometheus")
# Started only when named (`stack up redis-cluster`): sets of Redis servers for the cluster and Sentinel
# engines, `stack env redis-cluster` pointing TSUNAGU_REDIS_URL at one; coturn for WebRTC (`stack env turn`
# gives auth its secret and URIs).
OPTIONAL_COMPONENTS = ("redis-cluster", "redis-sentinel", "turn")
ALIASES = {"mosquitto": "mqtt", "postgresql": "postgres", "pg": "postgres", "prom": "prometheus", "coturn": "turn"}

# `stack env --engines`: the engines that use the stack instead of the services' in-process ones.
ENGINE_ENV = {"TSUNAGU_BUS": "kafka", "TSUNAGU_BROKER": "redis", "TSUNAGU_DATABASE": "postgres"}

# The exit codes of `tsunagu stack` (cli.EXIT_CODES says when each is given).
OK, FAILED, USAGE, NOT_UP, INTERRUPTED = 0, 1, 2, 3, 130
