"""Comparing a state dict with the one a module expects, for one readable error message."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

MAX_ITEM = 80


def _plain(item: str) -> str:
    text = item if item.isprintable() else repr(item)
    return text if len(text) <= MAX_ITEM else text[: MAX_ITEM - 3] + "..."


def describe(items: list[str], limit: int = 5) -> str:
    """The first ``limit`` items, comma-separated, with the total when there are more. Items come
    from files someone else may have written: one that would not print as plain text (a newline,
    terminal codes) is shown as its repr, and each is cut to ``MAX_ITEM`` characters, so that an
    error stays one readable line."""
    shown = ", ".join(map(_plain, items[:limit]))
    return f"{shown}, ... ({len(items)} in total)" if len(items) > limit else shown


def describe_keys(mapping: Mapping, limit: int = 8) -> str:
    """The sorted top-level keys of a loaded file, as ``describe`` shows them: for the error that
    refuses a file which is not what was asked for (a bare state dict can have thousands)."""
    return describe(sorted(map(str, mapping)), limit)


@dataclass
class StateDictDiff:
    """Keys of ``found`` missing from, unexpected for, or mis-shaped against ``expected``."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]

    @classmethod
    def between(cls, expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> StateDictDiff:
        return cls(
            missing=[key for key in expected if key not in found],
            unexpected=[key for key in found if key not in expected],
            mismatched=[
                f"{key}: expected {tuple(expected[key].shape)}, found {tuple(found[key].shape)}"
                for key in expected
                if key in found and found[key].shape != expected[key].shape
            ],
        )

    @property
    def matches(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        """e.g. "missing keys: a, b; shape mismatches: c: expected (2,), found (3,)"."""
        problems = [
            f"{kind}: {describe(items, limit)}"
            for kind, items, limit in [
                ("missing keys", self.missing, 5),
                ("unexpected keys", self.unexpected, 5),
                ("shape mismatches", self.mismatched, 3),
            ]
            if items
        ]
        return "; ".join(problems)


def check_state_dict(
    expected: Mapping[str, Tensor],
    found: Mapping[str, Tensor],
    what: str,
    hint: str = "",
    strict: bool = True,
) -> StateDictDiff:
    """Raise one ValueError ``"{what}: {differences}. {hint}"`` unless ``found`` has the keys and shapes
    of ``expected``; with ``strict`` False only shape mismatches are an error.

    Returns:
        The differences (only missing or unexpected keys when not ``strict``), for a warning.
    """
    diff = StateDictDiff.between(expected, found)
    if diff.mismatched or (strict and not diff.matches):
        raise ValueError(f"{what}: {diff.describe()}." + (f" {hint}" if hint else ""))
    return diff


def sub_state_dict(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``state_dict`` under ``prefix`` (e.g. ``"vae."``), with the prefix removed."""
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
