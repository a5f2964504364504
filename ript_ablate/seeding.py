"""Named random streams: one stable seed per purpose, so changing one count never moves another stream."""

from __future__ import annotations

import hashlib
from typing import Any


def stream_seed(*parts: Any) -> int:
    """A stable 63-bit seed from named parts (e.g. model_seed, "noise", iteration, context, k)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
