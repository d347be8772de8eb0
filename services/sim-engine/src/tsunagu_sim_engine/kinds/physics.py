"""`physics`: pymunk rigid bodies in a walled 2D box (top-down, no gravity unless asked), pushed by users.

Shared bodies `b0`..`bN` can be pushed by anyone; each user gets a player body `u:<user>` on its
first input, which only that user can push. Input: `{"seq": n, "push": "b3", "impulse": [ix, iy]}`
(`push` defaults to the sender's player). Refused: an impulse above `max_impulse` (`out_of_range`),
another user's player (`not_your_entity`), a body that does not exist (`unknown_entity`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import pymunk

from tsunagu_sim_engine.kinds import Entity, InputRejected, Simulation, number

PLAYER_PREFIX = "u:"


class PhysicsKind:
    name = "physics"

    def validate_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "world": number(params, "world", 50.0, 1.0, 100000.0),
            "bodies": int(number(params, "bodies", 10, 0, 100000)),
            "radius": number(params, "radius", 0.5, 0.01, 1000.0),
            "gravity": number(params, "gravity", 0.0, -1000.0, 1000.0),
            "damping": number(params, "damping", 0.8, 0.0, 1.0),
            "max_impulse": number(params, "max_impulse", 20.0, 0.0, 1e6),
            "max_players": int(number(params, "max_players", 1000, 0, 100000)),
            "seed": int(number(params, "seed", 1, 0, 2**31)),
        }

    def create(self, params: Mapping[str, Any]) -> Simulation:
        return PhysicsSimulation(self.validate_params(params))


class PhysicsSimulation:
    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = dict(params)
        self.world = float(params["world"])
        self.radius = float(params["radius"])
        self.max_impulse = float(params["max_impulse"])
        self.max_players = int(params["max_players"])
        self.space = pymunk.Space()
        self.space.gravity = (0.0, -float(params["gravity"]))
        self.space.damping = float(params["damping"])
        w = self.world
        for a, b in (((-w, -w), (w, -w)), ((w, -w), (w, w)), ((w, w), (-w, w)), ((-w, w), (-w, -w))):
            wall = pymunk.Segment(self.space.static_body, a, b, 0.5)
            wall.elasticity = 0.9
            self.space.add(wall)
        self.bodies: dict[str, pymunk.Body] = {}
        rng = random.Random(int(params["seed"]))
        for index in range(int(params["bodies"])):
            spot = (rng.uniform(-w * 0.9, w * 0.9), rng.uniform(-w * 0.9, w * 0.9))
            self._add(f"b{index}", spot)

    def _add(self, name: str, position: tuple[float, float]) -> pymunk.Body:
        body = pymunk.Body(1.0, pymunk.moment_for_circle(1.0, 0, self.radius))
        body.position = position
        shape = pymunk.Circle(body, self.radius)
        shape.elasticity = 0.9
        shape.friction = 0.5
        self.space.add(body, shape)
        self.bodies[name] = body
        return body

    def apply(self, user: str, data: Mapping[str, Any], now: float) -> None:
        player = PLAYER_PREFIX + user
        target = data.get("push", player)
        if not isinstance(target, str):
            raise InputRejected("bad_input", "push names a body")
        if target.startswith(PLAYER_PREFIX) and target != player:
            raise InputRejected("not_your_entity", f"user {user!r} cannot push another user's player {target!r}")
        impulse = data.get("impulse", [0, 0])
        if (
            not isinstance(impulse, list)
            or len(impulse) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in impulse)
        ):
            raise InputRejected("bad_input", "impulse is [ix, iy], finite numbers")
        if math.hypot(impulse[0], impulse[1]) > self.max_impulse:
            raise InputRejected("out_of_range", f"an impulse is at most {self.max_impulse:g}")
        body = self.bodies.get(target)
        if body is None:
            if target != player:
                raise InputRejected("unknown_entity", f"no body {target!r} in this room")
            if sum(name.startswith(PLAYER_PREFIX) for name in self.bodies) >= self.max_players:
                raise InputRejected("room_full", f"the room holds at most {self.max_players} players")
            body = self._add(player, (0.0, 0.0))
        body.apply_impulse_at_local_point((float(impulse[0]), float(impulse[1])))

    def step(self, dt: float, now: float) -> None:
        self.space.step(dt)

    def entities(self) -> dict[str, Entity]:
        out = {}
        for name, body in self.bodies.items():
            x, y = body.position
            out[name] = Entity(x, y, 0.0, math.degrees(body.angle) % 360.0)
        return out

    def snapshot(self) -> dict[str, Any]:
        return {
            name: [b.position.x, b.position.y, b.angle, b.velocity.x, b.velocity.y, b.angular_velocity]
            for name, b in self.bodies.items()
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        for name, values in state.items():
            body = self.bodies.get(name) or self._add(name, (0.0, 0.0))
            body.position = (float(values[0]), float(values[1]))
            body.angle = float(values[2])
            body.velocity = (float(values[3]), float(values[4]))
            body.angular_velocity = float(values[5])
