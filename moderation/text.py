"""Text fields the database can store, for request schemas."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def storable(value: str) -> str:
    """``value`` as it is; ValueError when Postgres could not store it (text columns refuse NUL)."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


#: Free text a client sends that is stored as it is: refused with 422 when the database could not hold it.
StorableText = Annotated[str, AfterValidator(storable)]
