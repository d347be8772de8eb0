from pydantic import Field
from pydantic_settings import SettingsConfigDict
from tsunagu_core.config import ServiceSettings


class CollabSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TSUNAGU_COLLAB_", extra="ignore")

    port: int = Field(8083, ge=1, le=65535, description="TCP port to listen on.")
