"""Parsing ``models:/NAME@ALIAS`` and ``models:/NAME/VERSION``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ModelUriError

__all__ = ["ModelRef", "parse_model_uri"]

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]*"
_PATTERN = re.compile(rf"^models:/(?P<name>{_NAME})(?:@(?P<alias>{_NAME})|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ModelRef:
    name: str
    alias: str | None = None
    version: int | None = None

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def parse_model_uri(uri: str) -> ModelRef:
    match = _PATTERN.match(uri.strip())
    if not match:
        raise ModelUriError(
            f"model URI {uri!r} is not of the form models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    version = match.group("version")
    return ModelRef(match.group("name"), match.group("alias"), int(version) if version else None)
