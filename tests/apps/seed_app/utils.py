"""The seed's ``uuid_to_slug`` (Websauna's ``websauna.utils.slug``)."""
from __future__ import annotations

import base64
import uuid


def uuid_to_slug(value: uuid.UUID) -> str:
    """22 URL-safe characters: the UUID's bytes in base64 without padding, as Websauna made slugs."""
    return base64.urlsafe_b64encode(value.bytes).decode("ascii").rstrip("=")


def slug_to_uuid(slug: str) -> uuid.UUID:
    return uuid.UUID(bytes=base64.urlsafe_b64decode(slug + "=="))
