"""Seeds derived by hashing a run's identity, as DomainBed does.

Hashing (rather than adding offsets) keeps seeds of different runs, domains and
hyperparameters independent and stable across processes and machines.
"""

from __future__ import annotations

import hashlib


def seed_hash(*args: object) -> int:
    """A 31-bit seed from the string form of ``args`` (DomainBed's ``seed_hash``)."""
    digest = hashlib.md5(str(args).encode("utf-8")).hexdigest()
    return int(digest, 16) % (2**31)
