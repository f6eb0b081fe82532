"""Shared test fixtures: every async test runs on asyncio (asyncssh is asyncio-only)."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
