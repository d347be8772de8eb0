from pydantic import Field
from pydantic_settings import SettingsConfigDict
from tsunagu_core.config import ServiceSettings


class CollabSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TSUNAGU_COLLAB_", extra="ignore")

    port: int = Field(8083, ge=1, le=65535, description="TCP port to listen on.")
    consumer_group: str = Field(
        "collab", min_length=1, description="Kafka consumer group of the replicas applying `tsunagu.collab.updates`."
    )
    history_size: int = Field(
        1000, ge=1, le=100_000, description="Updates kept in each `collab:{doc}` channel's history for gateways."
    )
    history_ttl: float = Field(3600.0, gt=0, description="Seconds the `collab:{doc}` channel history is kept.")
    idle_seconds: float = Field(
        60.0, gt=0, description="Seconds without updates after which a document is compacted and evicted from memory."
    )
    compact_min_bytes: int = Field(
        16384, ge=0, description="Appended update bytes a document may gather before it is compacted at the latest."
    )
    compact_max_updates: int = Field(2000, ge=1, description="Appended updates after which a document is compacted.")
