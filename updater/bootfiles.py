"""The boot files of a slot (kernel, initrd, UKI) on the ESP: ``/<slot label>/<name>``.

A release may carry boot files (:class:`updater.manifest.BootFileRef`). The
installer downloads each one through :func:`checked` (size and sha256 of the
signed manifest, checked while streaming) into :class:`BootFiles`, after the
slot's image is written and verified and before the slot becomes the next
boot. Each slot has its own directory, so the booted slot's files are never
touched: :class:`EspBootFiles` refuses to write into the booted slot's
directory, compared as FAT compares names (case folded).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Iterator
from typing import Protocol

import structlog

from partitions.bootcontrol import Slot
from partitions.filestore import StreamingStore, describe, is_clean_name
from updater.errors import Cancelled, DiskError, VerificationError
from updater.manifest import MAX_BOOT_FILE_BYTES, BootFileRef, valid_boot_name

log = structlog.get_logger(__name__)


class BootFiles(Protocol):
    """Where a slot's boot files live (the boot loader's file system)."""

    def write(self, slot: Slot, name: str, chunks: Iterable[bytes], *, booted: Slot) -> int:
        """Write ``slot``'s file ``name`` crash-safely from ``chunks``; the bytes written.

        Never into ``booted``'s files (``esp_invalid``). If ``chunks`` raises, the
        file keeps its old content (or stays absent).
        """
        ...

    def digest(self, slot: Slot, name: str) -> tuple[int, str] | None:
        """Size and sha256 of ``slot``'s file ``name``, or None if it is not there."""
        ...


def checked(
    chunks: Iterable[bytes], ref: BootFileRef, url: str, cancel: threading.Event | None = None
) -> Iterator[bytes]:
    """``chunks`` passed on, raising before their end unless size and sha256 are ``ref``'s.

    A writer that consumes this to the end before renaming its temporary file
    into place (:meth:`partitions.filestore.StreamingStore.write_stream`) thus
    never puts an unverified byte under the file's name.
    """
    digest = hashlib.sha256()
    size = 0
    for chunk in chunks:
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled", "the install was stopped")
        size += len(chunk)
        if size > ref.size:  # a Download stops this first (too_much_data); any other source too
            raise VerificationError(
                "size_mismatch", f"{url}: more than the manifest's {ref.size} bytes"
            )
        digest.update(chunk)
        yield chunk
    if size != ref.size:
        raise VerificationError(
            "size_mismatch", f"{url}: {size} bytes, the manifest says {ref.size}"
        )
    if digest.hexdigest() != ref.sha256:
        raise VerificationError(
            "hash_mismatch",
            f"{url}: sha256 {digest.hexdigest()}, the manifest says {ref.sha256}",
        )


def slot_directory(slot: Slot) -> str:
    return slot.label


def same_directory(a: Slot, b: Slot) -> bool:
    """Whether two slots' boot file directories are one on FAT (it folds case)."""
    return a.part_uuid == b.part_uuid or a.label.lower() == b.label.lower()


class EspBootFiles:
    """A slot's boot files as ``/<label>/<name>`` on the ESP (a mounted directory or mtools)."""

    def __init__(self, store: StreamingStore) -> None:
        self.store = store

    def __repr__(self) -> str:
        return f"EspBootFiles({self.store!r})"

    def _path(self, slot: Slot, name: str) -> str:
        directory = slot_directory(slot)
        if not is_clean_name(directory):
            raise DiskError(
                "esp_invalid",
                f"slot label {slot.label!r} cannot name a directory on the ESP",
                hint="name the slots with letters, digits, '.', '_', '-'",
            )
        if not valid_boot_name(name):
            raise ValueError(f"boot file name {name!r} is not plain")  # the manifest checked it
        return f"{directory}/{name}"

    def write(self, slot: Slot, name: str, chunks: Iterable[bytes], *, booted: Slot) -> int:
        path = self._path(slot, name)
        if same_directory(slot, booted):
            # The installer writes the other slot only; this is the last line of defence.
            raise DiskError(
                "esp_invalid",
                f"{describe(self.store, path)}: refusing to write the booted slot "
                f"{booted.label}'s boot files",
                hint="the slots' labels must differ as FAT sees them (case folded)",
            )
        self.store.makedirs(slot_directory(slot))
        written = self.store.write_stream(path, chunks)
        log.info(
            "boot_file_written", slot=slot.label, path=describe(self.store, path), size=written
        )
        return written

    def digest(self, slot: Slot, name: str) -> tuple[int, str] | None:
        return self.store.digest(self._path(slot, name), MAX_BOOT_FILE_BYTES)
