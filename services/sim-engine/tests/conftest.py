from __future__ import annotations

import pytest
from tsunagu_sim_engine.kinds import load_kinds


@pytest.fixture(autouse=True, scope="session")
def _kinds() -> None:
    load_kinds()
