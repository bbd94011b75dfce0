"""Configuration errors: every problem found, each naming its variable,
flag or manifest field (pure)."""

from __future__ import annotations


class ConfigError(Exception):
    """Every problem found, each naming the variable or the manifest field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Problems:
    """Collects errors with a location prefix so that every one names its field."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{self.where}: {path}: {message}" if path else f"{self.where}: {message}")
