"""Reading the small JSON files of a checkpoint (manifests, train state) with errors that name them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_versioned_json(path: Path, fmt: str, version: Any = None, *, error: type[Exception] = ValueError,
                        missing: str = "missing") -> dict:
    """The JSON object at ``path``, refused unless its ``format`` is ``fmt`` (and ``version``, when
    given, matches): a missing file says ``<path>: <missing>``, a broken one names the JSON error."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise error(f"{path}: format {got!r}, expected {fmt!r}")
    if version is not None and data.get("version") != version:
        raise error(f"{path}: version {data.get('version')!r}, this code reads {version}")
    return data
