from pydantic import Field
from pydantic_settings import SettingsConfigDict
from tsunagu_core.config import ServiceSettings


class PresenceSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TSUNAGU_PRESENCE_", extra="ignore")

    port: int = Field(8082, ge=1, le=65535, description="TCP port to listen on.")
    dead_after: float = Field(
        15.0,
        ge=6,
        le=3600,
        description="Seconds without any event (gateways heartbeat every 5 s, so at least 6) after which a gateway"
        " node is declared dead and its clients are removed, with a leave pushed on each of their presence channels."
        " A dead node's clients are gone within dead_after + sweep_interval + one sweep.",
    )
    sweep_interval: float = Field(
        1.0, gt=0, le=60, description="Seconds between two looks for silent gateway nodes on each replica."
    )
    consumer_group: str = Field(
        "presence", min_length=1, description="Kafka consumer group reading `tsunagu.gateway.events`."
    )
    key_prefix: str = Field(
        "tsunagu:presence", min_length=1, description="Prefix of the Redis keys holding who is online."
    )
    tombstone_ttl: float = Field(
        900.0,
        gt=0,
        description="Seconds a disconnected client is remembered, so its late or replayed events do not bring it back.",
    )
    dead_node_ttl: float = Field(
        86400.0,
        gt=0,
        description="Seconds a swept node is remembered, so replayed events it sent before dying are ignored.",
    )
