"""The real text of ``../shared/data`` for tests that need it: a test module without it is skipped with
the reason, or fails when ``NULLS_REQUIRE_DATA=1`` (as ``.ci/run`` sets), so that CI never passes by
skipping what it was meant to run."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("NULLS_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def require_shared_data(*parts: str) -> Path:
    """``SHARED_DATA / parts``, or a skip (a failure under NULLS_REQUIRE_DATA=1) for the calling module."""
    path = SHARED_DATA.joinpath(*parts)
    if path.exists():
        return path
    why = f"{path} is missing: this test needs the real text of ../shared/data (see its README.md)"
    if os.environ.get("NULLS_REQUIRE_DATA") == "1":
        pytest.fail(f"NULLS_REQUIRE_DATA=1: {why}", pytrace=False)
    pytest.skip(why, allow_module_level=True)
