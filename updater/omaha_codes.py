"""Omaha error codes: update_engine's ``ActionExitCode`` values and which one each of our
error kinds is reported as (the ``errorcode`` of a failure event). Pure.

A failed update check itself is 2000 + the HTTP status (0 when no answer, 999
when out of range), as update_engine's OmahaRequestAction does
(:func:`error_code_for_error` with ``during_check=True``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

from updater.errors import OmahaError, UpdaterError


class ErrorCode(enum.IntEnum):
    """update_engine's ``ActionExitCode`` values (flatcar/update_engine,
    ``src/update_engine/action_processor.h``), as sent in ``errorcode``."""

    SUCCESS = 0
    ERROR = 1
    OMAHA_REQUEST_ERROR = 2
    OMAHA_RESPONSE_HANDLER_ERROR = 3
    FILESYSTEM_COPIER_ERROR = 4
    POSTINSTALL_RUNNER_ERROR = 5
    INSTALL_DEVICE_OPEN_ERROR = 7
    KERNEL_DEVICE_OPEN_ERROR = 8
    DOWNLOAD_TRANSFER_ERROR = 9
    PAYLOAD_HASH_MISMATCH_ERROR = 10
    PAYLOAD_SIZE_MISMATCH_ERROR = 11
    DOWNLOAD_PAYLOAD_VERIFICATION_ERROR = 12
    DOWNLOAD_NEW_PARTITION_INFO_ERROR = 13
    DOWNLOAD_WRITE_ERROR = 14
    NEW_ROOTFS_VERIFICATION_ERROR = 15
    NEW_KERNEL_VERIFICATION_ERROR = 16
    SIGNED_DELTA_PAYLOAD_EXPECTED_ERROR = 17
    DOWNLOAD_PAYLOAD_PUB_KEY_VERIFICATION_ERROR = 18
    POSTINSTALL_BOOTED_FROM_FIRMWARE_B = 19
    DOWNLOAD_STATE_INITIALIZATION_ERROR = 20
    DOWNLOAD_INVALID_METADATA_MAGIC_STRING = 21
    DOWNLOAD_SIGNATURE_MISSING_IN_MANIFEST = 22
    DOWNLOAD_MANIFEST_PARSE_ERROR = 23
    DOWNLOAD_METADATA_SIGNATURE_ERROR = 24
    DOWNLOAD_METADATA_SIGNATURE_VERIFICATION_ERROR = 25
    DOWNLOAD_METADATA_SIGNATURE_MISMATCH = 26
    DOWNLOAD_OPERATION_HASH_VERIFICATION_ERROR = 27
    DOWNLOAD_OPERATION_EXECUTION_ERROR = 28
    DOWNLOAD_OPERATION_HASH_MISMATCH = 29
    OMAHA_REQUEST_EMPTY_RESPONSE_ERROR = 30
    OMAHA_REQUEST_XML_PARSE_ERROR = 31
    DOWNLOAD_INVALID_METADATA_SIZE = 32
    DOWNLOAD_INVALID_METADATA_SIGNATURE = 33
    OMAHA_RESPONSE_INVALID = 34
    OMAHA_UPDATE_IGNORED_PER_POLICY = 35
    OMAHA_UPDATE_DEFERRED_PER_POLICY = 36
    OMAHA_ERROR_IN_HTTP_RESPONSE = 37
    DOWNLOAD_OPERATION_HASH_MISSING_ERROR = 38
    DOWNLOAD_METADATA_SIGNATURE_MISSING_ERROR = 39
    OMAHA_UPDATE_DEFERRED_FOR_BACKOFF = 40
    POSTINSTALL_POWERWASH_ERROR = 41
    NEW_PCR_POLICY_VERIFICATION_ERROR = 42
    NEW_PCR_POLICY_HTTP_ERROR = 43
    ROLLBACK_ERROR = 44
    OMAHA_REQUEST_HTTP_RESPONSE_BASE = 2000  # + the HTTP status of a failed update check


_E = ErrorCode

# Our error kinds -> update_engine's code (update_engine's names: ErrorCode).
ERROR_CODES: Final[Mapping[str, ErrorCode]] = {
    # VerificationError
    "hash_mismatch": _E.PAYLOAD_HASH_MISMATCH_ERROR,
    "size_mismatch": _E.PAYLOAD_SIZE_MISMATCH_ERROR,
    "expired": _E.DOWNLOAD_PAYLOAD_VERIFICATION_ERROR,
    "older_than_booted": _E.DOWNLOAD_PAYLOAD_VERIFICATION_ERROR,
    "below_highest_accepted": _E.DOWNLOAD_PAYLOAD_VERIFICATION_ERROR,
    "channel_mismatch": _E.DOWNLOAD_PAYLOAD_VERIFICATION_ERROR,
    "image_too_large": _E.DOWNLOAD_PAYLOAD_VERIFICATION_ERROR,
    "source_mismatch": _E.DOWNLOAD_PAYLOAD_VERIFICATION_ERROR,
    "signature_missing": _E.SIGNED_DELTA_PAYLOAD_EXPECTED_ERROR,
    "signature_invalid": _E.DOWNLOAD_PAYLOAD_PUB_KEY_VERIFICATION_ERROR,
    "no_keyring": _E.DOWNLOAD_PAYLOAD_PUB_KEY_VERIFICATION_ERROR,
    # the trust root chain decides which keys verify: a key verification failure
    "signature_threshold": _E.DOWNLOAD_PAYLOAD_PUB_KEY_VERIFICATION_ERROR,
    "key_rotated_out": _E.DOWNLOAD_PAYLOAD_PUB_KEY_VERIFICATION_ERROR,
    "root_signature": _E.DOWNLOAD_PAYLOAD_PUB_KEY_VERIFICATION_ERROR,
    "root_chain_broken": _E.DOWNLOAD_PAYLOAD_PUB_KEY_VERIFICATION_ERROR,
    "root_rollback": _E.DOWNLOAD_PAYLOAD_PUB_KEY_VERIFICATION_ERROR,
    "root_missing": _E.DOWNLOAD_PAYLOAD_PUB_KEY_VERIFICATION_ERROR,
    "root_expired": _E.DOWNLOAD_PAYLOAD_PUB_KEY_VERIFICATION_ERROR,
    "root_malformed": _E.DOWNLOAD_MANIFEST_PARSE_ERROR,
    "manifest_malformed": _E.DOWNLOAD_MANIFEST_PARSE_ERROR,
    "manifest_too_large": _E.DOWNLOAD_INVALID_METADATA_SIZE,
    "index_malformed": _E.DOWNLOAD_MANIFEST_PARSE_ERROR,
    "decompress_failed": _E.DOWNLOAD_OPERATION_EXECUTION_ERROR,
    # DownloadError
    "connection": _E.DOWNLOAD_TRANSFER_ERROR,
    "timeout": _E.DOWNLOAD_TRANSFER_ERROR,
    "http_status": _E.DOWNLOAD_TRANSFER_ERROR,
    "unsupported_url": _E.DOWNLOAD_TRANSFER_ERROR,
    "too_much_data": _E.PAYLOAD_SIZE_MISMATCH_ERROR,
    # DiskError
    "io": _E.DOWNLOAD_WRITE_ERROR,
    "gpt_invalid": _E.INSTALL_DEVICE_OPEN_ERROR,
    "slot_not_found": _E.INSTALL_DEVICE_OPEN_ERROR,
    "booted_unknown": _E.INSTALL_DEVICE_OPEN_ERROR,
    "not_a_disk": _E.INSTALL_DEVICE_OPEN_ERROR,
    "esp_invalid": _E.INSTALL_DEVICE_OPEN_ERROR,
    "boot_entry_invalid": _E.INSTALL_DEVICE_OPEN_ERROR,
    "grubenv_invalid": _E.INSTALL_DEVICE_OPEN_ERROR,
    "readback_mismatch": _E.NEW_ROOTFS_VERIFICATION_ERROR,
    # OmahaError
    "empty_response": _E.OMAHA_REQUEST_EMPTY_RESPONSE_ERROR,
    "xml_parse": _E.OMAHA_REQUEST_XML_PARSE_ERROR,
    "xml_forbidden": _E.OMAHA_REQUEST_XML_PARSE_ERROR,
    "invalid_response": _E.OMAHA_RESPONSE_INVALID,
    "unknown_status": _E.OMAHA_RESPONSE_INVALID,
    "size_invalid": _E.OMAHA_RESPONSE_INVALID,
    "missing_codebase": _E.OMAHA_RESPONSE_INVALID,
    "package_url": _E.OMAHA_RESPONSE_INVALID,
    "hash_missing": _E.OMAHA_RESPONSE_INVALID,
    "hash_invalid": _E.OMAHA_RESPONSE_INVALID,
    "too_large": _E.OMAHA_RESPONSE_INVALID,
    "unsupported_protocol": _E.OMAHA_RESPONSE_INVALID,
    "server_refused": _E.OMAHA_RESPONSE_INVALID,
    # this host's own refusal (an admin's hold, skip or pin): never a failure report of
    # ours (the agent stays on its version and says nothing), the code should one be needed
    "held": _E.OMAHA_UPDATE_IGNORED_PER_POLICY,
    "skipped": _E.OMAHA_UPDATE_IGNORED_PER_POLICY,
    "pinned": _E.OMAHA_UPDATE_IGNORED_PER_POLICY,
    # outcomes that are no exception of ours
    "deferred": _E.OMAHA_UPDATE_DEFERRED_PER_POLICY,
    "rollback": _E.ROLLBACK_ERROR,
    # HealthError: the new boot was not blessed, the machine falls back to the old version
    "check_failed": _E.ROLLBACK_ERROR,
    "check_timeout": _E.ROLLBACK_ERROR,
    "unit_inactive": _E.ROLLBACK_ERROR,
    # the generic code, listed so that every kind is a decision (tests check coverage)
    **dict.fromkeys(
        (
            "internal",
            "unreadable",
            "syntax",
            "invalid",
            "missing",
            "rollback_refused",
            "booted_not_good",
            "busy",
            "nothing_staged",
            "reboot_refused",
            "no_free_slot",
            "last_bootable_slot",
            "version_blocked",
            "not_blocked",
            "users_logged_in",
            "unwritable",
            "newer_schema",
            "unavailable",
            "malformed",
            "conflict",
            "refused",
            "bad_argument",
            "cancelled",
            "channel_downgrade",
            "not_root",
            "policy_corrupt",
            "bad_time",
            "bad_version",
            "bad_channel",
            "command_failed",
            "command_missing",
            "command_timeout",
        ),
        _E.ERROR,
    ),
}


def error_code_for(kind: str) -> int:
    """update_engine's error code for one of our error kinds; kActionCodeError (1) if unknown.

    :data:`ERROR_CODES` is the table (every kind of :mod:`updater.errors`
    and of :class:`OmahaError` is in it: a test checks it, so adding a kind
    forces a decision there).
    """
    return int(ERROR_CODES.get(kind, _E.ERROR))


def http_error_code(status: int | None) -> int:
    """The code of a failed update check: 2000 + HTTP status (0: no answer; 999 if out of range)."""
    code = 0 if status is None else status
    if code < 0 or code >= 1000:
        code = 999
    return int(_E.OMAHA_REQUEST_HTTP_RESPONSE_BASE) + code


def error_code_for_error(exc: BaseException, *, during_check: bool = False) -> int:
    """The code to report for ``exc``.

    ``during_check``: the exception came from the update check request itself;
    a transport failure there is 2000 + HTTP status (update_engine's
    OmahaRequestAction), elsewhere it is a payload download error (9).
    """
    if not isinstance(exc, UpdaterError):
        return int(_E.ERROR)
    if during_check and exc.category == "download" and not isinstance(exc, OmahaError):
        return http_error_code(getattr(exc, "status", None))
    return error_code_for(exc.kind)
