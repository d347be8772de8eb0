"""`avatar`: one avatar per user (position, heading, gesture), moved by its own user's inputs.

Input (JSON object): `{"seq": n, "p": [x, y, z], "r": degrees, "g": "wave", "entity": "<user>"}`, every
field optional; `{"leave": true}` removes the avatar. An avatar joins on its user's first input.
Refused: a position outside the world (`out_of_range`), a move faster than `max_speed`
(`too_fast`), an `entity` that is not the sender's own (`not_your_entity`), an unknown gesture
(`bad_gesture`), fields of the wrong type (`bad_input`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tsunagu_sim_engine.kinds import Entity, InputRejected, Simulation, number

GESTURES = ("", "idle", "wave", "point", "dance", "sit", "jump", "nod")


@dataclass(slots=True)
class Avatar:
    x: float
    y: float
    z: float
    r: float
    g: str
    moved_at: float
    seen_at: float


class AvatarKind:
    name = "avatar"

    def validate_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "world": number(params, "world", 100.0, 1.0, 100000.0),
            "max_speed": number(params, "max_speed", 10.0, 0.01, 100000.0),
            "idle_timeout": number(params, "idle_timeout", 60.0, 1.0, 86400.0),
            "max_avatars": int(number(params, "max_avatars", 10000, 1, 100000)),
        }

    def create(self, params: Mapping[str, Any]) -> Simulation:
        return AvatarSimulation(self.validate_params(params))


def _coordinate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputRejected("bad_input", "coordinates are finite numbers")
    return float(value)


class AvatarSimulation:
    def __init__(self, params: Mapping[str, Any]) -> None:
        self.world = float(params["world"])
        self.max_speed = float(params["max_speed"])
        self.idle_timeout = float(params["idle_timeout"])
        self.max_avatars = int(params["max_avatars"])
        self.avatars: dict[str, Avatar] = {}
        self._entities: dict[str, tuple[tuple[float, float, float, float, str], Entity]] = {}

    def apply(self, user: str, data: Mapping[str, Any], now: float) -> None:
        entity = data.get("entity", user)
        if entity != user:
            raise InputRejected("not_your_entity", f"user {user!r} can only move its own avatar, not {entity!r}")
        if data.get("leave") is True:
            self.avatars.pop(user, None)
            return
        avatar = self.avatars.get(user)
        if avatar is None:
            if len(self.avatars) >= self.max_avatars:
                raise InputRejected("room_full", f"the room holds at most {self.max_avatars} avatars")
            avatar = Avatar(0.0, 0.0, 0.0, 0.0, "", now, now)
            joining = True
        else:
            joining = False
        x, y, z, r, g = avatar.x, avatar.y, avatar.z, avatar.r, avatar.g
        if "p" in data:
            p = data["p"]
            if not isinstance(p, list) or len(p) not in (2, 3):
                raise InputRejected("bad_input", "p is [x, y] or [x, y, z]")
            x, y = _coordinate(p[0]), _coordinate(p[1])
            z = _coordinate(p[2]) if len(p) == 3 else avatar.z
            if max(abs(x), abs(y), abs(z)) > self.world:
                raise InputRejected("out_of_range", f"positions are within ±{self.world:g}")
            if not joining:
                elapsed = max(now - avatar.moved_at, 0.0)
                distance = math.dist((x, y, z), (avatar.x, avatar.y, avatar.z))
                # One tick of slack so a move sent right after the previous one is not refused.
                if distance > self.max_speed * elapsed + self.max_speed * 0.1 + 1e-6:
                    raise InputRejected(
                        "too_fast", f"moved {distance:.2f} in {elapsed:.3f}s; the limit is {self.max_speed:g}/s"
                    )
        if "r" in data:
            r = _coordinate(data["r"]) % 360.0
        if "g" in data:
            if data["g"] not in GESTURES:
                raise InputRejected("bad_gesture", f"gesture is one of {', '.join(g for g in GESTURES if g)}")
            g = str(data["g"])
        if joining:
            self.avatars[user] = avatar
        if (x, y, z) != (avatar.x, avatar.y, avatar.z):
            avatar.moved_at = now
        avatar.x, avatar.y, avatar.z, avatar.r, avatar.g = x, y, z, r, g
        avatar.seen_at = now

    def step(self, dt: float, now: float) -> None:
        gone = [user for user, avatar in self.avatars.items() if now - avatar.seen_at > self.idle_timeout]
        for user in gone:
            del self.avatars[user]

    def entities(self) -> dict[str, Entity]:
        # The same Entity object while an avatar has not changed: the room then reuses its encoding.
        out = {}
        cache = self._entities
        for user, a in self.avatars.items():
            state = (a.x, a.y, a.z, a.r, a.g)
            cached = cache.get(user)
            if cached is None or cached[0] != state:
                cached = cache[user] = (state, Entity(a.x, a.y, a.z, a.r, {"g": a.g} if a.g else {}))
            out[user] = cached[1]
        if len(cache) > len(self.avatars):
            for gone in [user for user in cache if user not in self.avatars]:
                del cache[gone]
        return out

    def snapshot(self) -> dict[str, Any]:
        return {user: [a.x, a.y, a.z, a.r, a.g, a.moved_at, a.seen_at] for user, a in self.avatars.items()}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.avatars = {
            user: Avatar(float(v[0]), float(v[1]), float(v[2]), float(v[3]), str(v[4]), float(v[5]), float(v[6]))
            for user, v in state.items()
        }
