"""The policy categories a tenant's submissions are scored on."""

from __future__ import annotations

import re

from moderation.engine.base import CategorySpec
from moderation.errors import InvalidInput
from moderation.tenants.models import Tenant

CATEGORY_NAME = re.compile(r"^[a-z][a-z0-9_]{1,39}$")
MAX_CUSTOM_CATEGORIES = 20


def default_categories() -> tuple[CategorySpec, ...]:
    """The built-in categories every submission is scored on."""
    from moderation.engine.prompts import DEFAULT_CATEGORIES

    return DEFAULT_CATEGORIES


def categories_for(tenant: Tenant) -> tuple[CategorySpec, ...]:
    """Built-in categories followed by the tenant's own, each with its one-line definition."""
    builtin = default_categories()
    names = {c.name for c in builtin}
    custom = tuple(
        CategorySpec(name=c["name"], definition=c["definition"])
        for c in (tenant.policy or {}).get("categories", [])
        if c.get("name") not in names
    )
    return builtin + custom


def validate_custom_categories(items: list[dict[str, str]]) -> list[dict[str, str]]:
    """Check a tenant's custom categories: snake_case names, one-line definitions, no clash with built-ins."""
    if len(items) > MAX_CUSTOM_CATEGORIES:
        raise InvalidInput(f"at most {MAX_CUSTOM_CATEGORIES} custom categories", code="invalid_categories")
    builtin = {c.name for c in default_categories()}
    seen: set[str] = set()
    clean = []
    for item in items:
        name = str(item.get("name", "")).strip()
        definition = " ".join(str(item.get("definition", "")).split())
        if not CATEGORY_NAME.match(name):
            raise InvalidInput(
                f"category name {name!r} must be snake_case, 2-40 characters", code="invalid_categories"
            )
        if name in builtin or name in seen:
            raise InvalidInput(f"category {name!r} already exists", code="invalid_categories")
        if "\x00" in definition:
            raise InvalidInput(
                f"category {name!r} has a NUL character in its definition", code="invalid_categories"
            )
        if not 3 <= len(definition) <= 300:
            raise InvalidInput(f"category {name!r} needs a one-line definition", code="invalid_categories")
        seen.add(name)
        clean.append({"name": name, "definition": definition})
    return clean
