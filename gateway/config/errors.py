"""The config loader's errors: every problem found in a file, each with its place and key path."""

from __future__ import annotations

import typing
from dataclasses import dataclass


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a configuration file. ``line`` and ``column`` are 1-based; ``key`` is the dotted
    key path ('' for a problem with the file as a whole, such as a YAML syntax error)."""
    file: str
    line: int
    column: int
    key: str
    message: str

    def __str__(self) -> str:
        if self.key:
            return f"{self.file}:{self.line}:{self.column}: {self.key}: {self.message}"
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


class ConfigError(Exception):
    """The configuration is not valid. ``issues`` holds every problem found, in file order."""

    def __init__(self, issues: typing.Iterable[ConfigIssue]):
        self.issues: list[ConfigIssue] = list(issues)
        super().__init__('\n'.join(str(issue) for issue in self.issues))

    def __str__(self) -> str:
        return '\n'.join(str(issue) for issue in self.issues)

