"""Area of interest: entities bucketed in square cells, with hysteresis at the borders.

An entity keeps its cell until it is more than `margin` beyond the cell's edge, so one walking
along a border does not flap between two cells (and two channels). Clients subscribe to the cells
around them, `sim:R.cell.X.Y` with `X = floor(x / size)`, `Y = floor(y / size)`, and with a room's
`aoi.far_every` to farther cells' `sim:R.cell.X.Y.far` channels, sent every `far_every` ticks only.
"""

from __future__ import annotations

import math

Cell = tuple[int, int]


def cell_of(x: float, y: float, size: float) -> Cell:
    return (math.floor(x / size), math.floor(y / size))


def cell_channel(room: str, cell: Cell) -> str:
    return f"sim:{room}.cell.{cell[0]}.{cell[1]}"


def far_channel(room: str, cell: Cell) -> str:
    """The cell's level-of-detail channel: its entities at the room's lower `far_every` rate, for clients
    that see the cell from afar (beyond the 3x3 cells they follow at the full rate)."""
    return f"sim:{room}.cell.{cell[0]}.{cell[1]}.far"


class CellTracker:
    def __init__(self, size: float, margin: float) -> None:
        if size <= 0 or margin < 0 or margin >= size / 2:
            raise ValueError("cell size must be positive and the margin under half of it")
        self.size = size
        self.margin = margin
        self.cells: dict[str, Cell] = {}

    def place(self, name: str, x: float, y: float) -> Cell:
        current = self.cells.get(name)
        if current is not None:
            low_x, low_y = current[0] * self.size - self.margin, current[1] * self.size - self.margin
            high_x, high_y = low_x + self.size + 2 * self.margin, low_y + self.size + 2 * self.margin
            if low_x <= x < high_x and low_y <= y < high_y:
                return current
        cell = cell_of(x, y, self.size)
        self.cells[name] = cell
        return cell

    def forget(self, name: str) -> None:
        self.cells.pop(name, None)

    def members(self) -> dict[Cell, set[str]]:
        out: dict[Cell, set[str]] = {}
        for name, cell in self.cells.items():
            out.setdefault(cell, set()).add(name)
        return out
