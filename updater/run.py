"""The one place that starts external programs.

argv lists only, stdin closed unless input is given, a minimal environment
with ``LANG=C.UTF-8``, a timeout that kills the child, and failures reported as
a copy-pasteable command line.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from updater.errors import CommandError

log = structlog.get_logger(__name__)

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


class Runner(Protocol):
    def __call__(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        check: bool = True,
        timeout: float | None = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> Completed: ...


def minimal_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", _PATH) + ":" + _PATH, "LANG": "C.UTF-8"}
    if extra:
        env.update(extra)
    return env


def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    check: bool = True,
    timeout: float | None = 60.0,
    env: Mapping[str, str] | None = None,
) -> Completed:
    """Run ``argv`` to completion and capture its output."""
    args = [str(a) for a in argv]
    cmdline = shlex.join(args)
    try:
        proc = subprocess.run(
            args,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=minimal_env(env),
            check=False,
        )
    except FileNotFoundError as exc:
        raise CommandError(
            "command_missing", f"{args[0]}: not installed", argv=args, returncode=None
        ) from exc
    except subprocess.TimeoutExpired as exc:
        log.warning("command_timeout", cmd=cmdline, timeout_s=timeout)
        raise CommandError(
            "command_timeout", f"timed out after {timeout}s: {cmdline}", argv=args, returncode=None
        ) from exc
    done = Completed(tuple(args), proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        stderr = proc.stderr.decode("utf-8", "replace").strip()
        log.warning("command_failed", cmd=cmdline, returncode=proc.returncode, stderr=stderr)
        raise CommandError(
            "command_failed",
            f"exit {proc.returncode}: {cmdline}: {stderr}",
            argv=args,
            returncode=proc.returncode,
            stderr=stderr,
        )
    return done
