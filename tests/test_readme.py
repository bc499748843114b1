"""The README's tables list every error kind a user can meet."""

from __future__ import annotations

from pathlib import Path

import updater.errors as errors

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def error_classes() -> list[type[errors.UpdaterError]]:
    return [
        c
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.UpdaterError)
    ]


def missing_kinds(readme: str) -> dict[str, list[str]]:
    out = {}
    for c in error_classes():
        if absent := sorted(k for k in c.kinds if f"`{k}`" not in readme):
            out[c.__name__] = absent
    return out


def test_every_error_kind_is_in_the_readme() -> None:
    assert missing_kinds(README) == {}


def test_the_check_sees_a_missing_kind() -> None:
    assert missing_kinds(README.replace("`server_refused`", "server_refused")) == {
        "OmahaError": ["server_refused"]
    }
