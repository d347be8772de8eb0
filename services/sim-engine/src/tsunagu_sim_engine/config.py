from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict
from tsunagu_core.config import ServiceSettings


class SimSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TSUNAGU_SIM_", extra="ignore")

    port: int = Field(8086, ge=1, le=65535, description="TCP port to listen on.")
    consumer_group: str = Field("sim-engine", description="Kafka consumer group reading `tsunagu.sim.inputs`.")
    key_prefix: str = Field("tsunagu:sim", description="Prefix of the Redis keys of the rooms registry and snapshots.")
    snapshot_every: int = Field(
        30,
        ge=1,
        le=36000,
        description="A room's state is written to the store every this many ticks: the most a failover loses.",
    )
    lease_ttl: float = Field(
        3.0,
        gt=0.2,
        le=300,
        description="Seconds a replica's claim on a room lives without renewal; an unclaimed room is adopted.",
    )
    seat_ttl: float = Field(
        30.0,
        gt=0.5,
        le=3600,
        description="Seconds a matchmade seat is held once its connection is lost (or, not bound to a connection,"
        " after it was taken): a dropped client's window to reconnect.",
    )
    node_silence: float = Field(
        12.0,
        ge=6,
        le=3600,
        description="Seconds a gateway may stay silent (it heartbeats every 5 s, so at least 6) before the seats"
        " of its clients stop being held for them; with a gateway killed outright they expire seat_ttl +"
        " node_silence after its last heartbeat.",
    )
    room_admins: list[str] = Field(
        default_factory=list,
        description="JSON list of user ids that may lock and unlock any matchmade room over RPC (`rooms.lock`);"
        " a room's creator always may.",
    )
    seats_consumer_group: str = Field(
        "sim-engine-seats",
        min_length=1,
        description="Kafka consumer group reading `tsunagu.gateway.events` to tie seats to connections"
        " (a new group starts at the newest event).",
    )
    scan_interval: float = Field(
        1.0, gt=0, le=60, description="Seconds between renewals of this replica's rooms and scans for orphan rooms."
    )
    max_rooms: int = Field(1000, ge=1, le=100000, description="Most rooms one replica runs at once.")
    input_max_age: float = Field(
        5.0, gt=0, le=3600, description="Inputs older than this many seconds (replayed backlog) are dropped unapplied."
    )
    source_poll: float = Field(
        0.2,
        gt=0.01,
        le=60,
        description="Seconds between reads of the channels a room follows (a twin room's device telemetry):"
        " the most a telemetry message waits before the room sees it.",
    )
    command_timeout: float = Field(
        10.0, gt=0, le=3600, description="Seconds a twin room's device command may wait for the device's broker."
    )
    rooms: list[dict[str, Any]] = Field(
        default_factory=list,
        description="JSON list of room specs (as `POST /v1/rooms` takes them) created at start when missing; "
        "`tsunagu run` creates the demo's `world` room this way.",
    )
    kinds: str = Field(
        "",
        description="Extra simulation kinds, comma-separated `module:attribute` import paths of `SimKind` objects"
        " (entry points in group `tsunagu.sim_kinds` are loaded too).",
    )
