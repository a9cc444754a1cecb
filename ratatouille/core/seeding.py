"""Seeds derived by hashing a run's identity, as DomainBed does.

Hashing (rather than adding offsets) keeps seeds of different runs, domains and
hyperparameters independent and stable across processes and machines.
"""

from __future__ import annotations

import hashlib
from enum import Enum


def seed_hash(*args: object) -> int:
    """A 31-bit seed from the string form of ``args`` (DomainBed's ``seed_hash``).

    Enum members count as their value: ``str()`` of a tuple shows their repr, and a name
    constant must give the seed its plain string gave.
    """
    plain = tuple(arg.value if isinstance(arg, Enum) else arg for arg in args)
    digest = hashlib.md5(str(plain).encode("utf-8")).hexdigest()
    return int(digest, 16) % (2**31)
