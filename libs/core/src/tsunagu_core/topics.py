"""Kafka topic names of the platform (PLATFORM.md §4); user ingest topics are the user's own."""

GATEWAY_EVENTS = "tsunagu.gateway.events"
COLLAB_UPDATES = "tsunagu.collab.updates"
SIM_INPUTS = "tsunagu.sim.inputs"
MQTT_COMMANDS = "tsunagu.mqtt.commands"
AUTH_REVOCATIONS = "tsunagu.auth.revocations"
AUDIT = "tsunagu.audit"

ALL = (GATEWAY_EVENTS, COLLAB_UPDATES, SIM_INPUTS, MQTT_COMMANDS, AUTH_REVOCATIONS, AUDIT)
