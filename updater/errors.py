"""The one error hierarchy.

Every error the agent raises on purpose is an :class:`UpdaterError`. Its
*category* (the class) says whose fault it is and picks the process exit code;
its ``kind`` is a short, bounded, machine-readable string used for exit codes,
D-Bus error names, metric labels and event reports. Callers branch on the type
and the kind, never on the message.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class ExitCode(enum.IntEnum):
    """Process exit codes of ``updatectl`` (documented in the README)."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    CONFIG = 3
    VERIFICATION = 4
    DOWNLOAD = 5
    DISK = 6
    REFUSED = 7
    STATE = 8
    HEALTH = 9
    LOCK = 10
    INTERRUPTED = 130


class UpdaterError(Exception):
    """Base of every deliberate error. ``kind`` is bounded per category."""

    exit_code: ClassVar[ExitCode] = ExitCode.INTERNAL
    kinds: ClassVar[frozenset[str]] = frozenset({"internal"})

    def __init__(self, kind: str, message: str, *, hint: str | None = None) -> None:
        if kind not in self.kinds:
            raise ValueError(f"{type(self).__name__} has no kind {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message} (hint: {self.hint})"

    def as_dict(self) -> dict[str, str]:
        out = {"category": self.category, "kind": self.kind, "message": self.message}
        if self.hint is not None:
            out["hint"] = self.hint
        return out

    @property
    def category(self) -> str:
        return self.exit_code.name.lower()


class ConfigError(UpdaterError):
    """The configuration is missing, unparsable or invalid (the admin's fault)."""

    exit_code = ExitCode.CONFIG
    kinds = frozenset({"unreadable", "syntax", "invalid", "missing"})

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        file: str | None = None,
        key: str | None = None,
        hint: str | None = None,
    ) -> None:
        where = ":".join(p for p in (file, key) if p)
        super().__init__(kind, f"{where}: {message}" if where else message, hint=hint)
        self.file = file
        self.key = key


class VerificationError(UpdaterError):
    """What the repository served is not trustworthy (the server's fault)."""

    exit_code = ExitCode.VERIFICATION
    kinds = frozenset(
        {
            "no_keyring",  # no key configured, or the keyring holds no key
            "signature_missing",
            "signature_invalid",  # bad signature or made by a key we do not trust
            "manifest_malformed",
            "manifest_too_large",
            "expired",
            "older_than_booted",  # a replayed or rolled-back channel
            "below_highest_accepted",  # lower than the highest version ever accepted
            "channel_mismatch",
            "image_too_large",  # raw_size beyond the slot
            "size_mismatch",
            "hash_mismatch",
            "decompress_failed",
            "source_mismatch",  # an Omaha answer disagrees with the signed manifest
            "index_malformed",  # a signed chunk index that contradicts itself or the image
            "signature_threshold",  # fewer trusted keys signed the manifest than the root needs
            "key_rotated_out",  # signed by a key a root rotation removed (a leaked old key?)
            "root_malformed",  # a trust root that is not a valid root document
            "root_signature",  # a root signed by too few keys of the previous root or its own
            "root_chain_broken",  # root.<N>.json holds a later version than N
            "root_rollback",  # an older root offered as the next one (replayed, rolled back)
            "root_missing",  # the shipped root is absent, or a gap in the repository's roots
            "root_expired",  # the newest trust root is past its expiry
        }
    )


class DownloadError(UpdaterError):
    """The transport failed (network, HTTP status, timeouts, endless data)."""

    exit_code = ExitCode.DOWNLOAD
    kinds = frozenset({"connection", "timeout", "http_status", "too_much_data", "unsupported_url"})

    def __init__(
        self, kind: str, message: str, *, status: int | None = None, hint: str | None = None
    ) -> None:
        super().__init__(kind, message, hint=hint)
        self.status = status


class DiskError(UpdaterError):
    """The disk, its partition table or a slot is not usable."""

    exit_code = ExitCode.DISK
    kinds = frozenset(
        {
            "gpt_invalid",
            "slot_not_found",
            "booted_unknown",
            "io",
            "not_a_disk",
            "readback_mismatch",
            "esp_invalid",  # the ESP/boot filesystem lacks what the backend needs, or defeats it
            "boot_entry_invalid",  # a boot loader entry is malformed, duplicate or for no slot
            "grubenv_invalid",  # the GRUB environment block is missing, corrupt or inconsistent
        }
    )


class RefusedError(UpdaterError):
    """A request that is well-formed but not allowed in the current state."""

    exit_code = ExitCode.REFUSED
    kinds = frozenset(
        {
            "rollback_refused",
            "booted_not_good",
            "busy",
            "nothing_staged",
            "reboot_refused",
            "no_free_slot",
            "last_bootable_slot",  # the change would leave the boot loader nothing to boot
            "version_blocked",  # the version rolled back on hosts of the group (policies.failed)
            "not_blocked",  # `fleet unblock`: nothing recorded for that version
            "users_logged_in",  # the reboot waits for interactive users ([reboot] wait_for_users)
            "held",  # `updatectl hold`: no installs on this host until `unhold` (or --until)
            "skipped",  # `updatectl skip VERSION`: this host refuses that version
            "pinned",  # outside [source] pin: this host stays on its line
            "channel_downgrade",  # the channel's newest is below this host's version floor
            "not_root",  # only root may do that (`channel --allow-downgrade`)
        }
    )


class UsageError(UpdaterError):
    """A command-line argument that argparse could not judge (a time in the past...)."""

    exit_code = ExitCode.USAGE
    kinds = frozenset({"bad_time", "bad_version", "bad_channel"})


class StateError(UpdaterError):
    """The persisted agent state cannot be read or written."""

    exit_code = ExitCode.STATE
    # policy_corrupt: <state_dir>/hostpolicy.json (hold, skips) cannot be read: no
    # installs until it is fixed (a lost hold must not install on a held host)
    kinds = frozenset({"unwritable", "newer_schema", "policy_corrupt"})


class HealthError(UpdaterError):
    """The booted system failed its health checks: the slot is not blessed."""

    exit_code = ExitCode.HEALTH
    kinds = frozenset({"check_failed", "check_timeout", "unit_inactive"})


class LockError(UpdaterError):
    """The cluster reboot lock could not be asked or answered nonsense: fail closed."""

    exit_code = ExitCode.LOCK
    kinds = frozenset(
        {
            "unavailable",  # no endpoint answered (connection, timeout, 5xx)
            "malformed",  # the semaphore (or a server's answer) cannot be read
            "conflict",  # gave up after too many concurrent changes
            "refused",  # the lock service said no with an error (FleetLock kind/value)
            "bad_argument",  # a bad group, id or slot count
        }
    )


class Cancelled(UpdaterError):
    """The work was stopped on request (SIGTERM, shutdown); nothing is wrong."""

    exit_code = ExitCode.INTERRUPTED
    kinds = frozenset({"cancelled"})


class OmahaError(UpdaterError):
    """The Omaha server's answer cannot be used (the server's fault).

    Its exit code is the download one: like a transport failure, the agent
    retries at the next poll. Each kind maps to an update_engine error code
    (``updater.omaha_codes.ERROR_CODES``) for the failure event.
    """

    exit_code = ExitCode.DOWNLOAD
    kinds = frozenset(
        {
            "too_large",  # more than MAX_RESPONSE_BYTES
            "empty_response",
            "xml_parse",  # not well-formed XML
            "xml_forbidden",  # a DTD, entity or external reference (bomb, XXE)
            "invalid_response",  # well-formed, but not an answer to our update check
            "unknown_status",  # app or updatecheck status we do not know
            "size_invalid",  # package size missing, not a number, or <= 0
            "missing_codebase",  # no urls/url, or an empty codebase
            "package_url",  # codebase or package name would leave http(s) or the codebase
            "hash_missing",  # neither a postinstall sha256 nor a hash_sha256
            "hash_invalid",  # not a SHA-256, or the two hashes disagree
            "unsupported_protocol",  # the response is not <response protocol="3.0">
            "server_refused",  # an error-* app status that is no rollout deferral
        }
    )


class CommandError(UpdaterError):
    """An external tool failed; callers usually re-raise it in their own category."""

    exit_code = ExitCode.INTERNAL
    kinds = frozenset({"command_failed", "command_missing", "command_timeout"})

    def __init__(
        self, kind: str, message: str, *, argv: list[str], returncode: int | None, stderr: str = ""
    ) -> None:
        super().__init__(kind, message)
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


def internal_error(exc: BaseException, during: str) -> UpdaterError:
    """An exception that is not one of ours (a bug, a library breaking its contract),
    as the ``internal`` error it is, so that it ends like any other failure."""
    if isinstance(exc, UpdaterError):
        return exc
    text = str(exc)
    detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if len(detail) > 300:  # a message, not a dump: the traceback goes to the log
        detail = detail[:297] + "..."
    return UpdaterError("internal", f"{during} crashed: {detail}")
