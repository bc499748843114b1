"""The update core's pure decisions: what a slot holds, whether an update is staged,
whether a rollback is allowed, what state the host is in, what a failed health check
does. No I/O: :mod:`updater.slots`, :mod:`updater.update` and :mod:`updater.installer`
gather the facts and carry the decisions out; tests/test_decisions.py tables them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from partitions.bootcontrol import Slot, SlotStatus
from updater.errors import VerificationError
from updater.manifest import Manifest
from updater.source import ImageClaim
from updater.state import BootFileRecord, SlotRecord, State

HostState = Literal["idle", "installing", "install_interrupted", "update_staged", "trial_boot"]


def slot_version(
    state: State, slot: Slot, booted: Slot, os_release_version: str | None
) -> str | None:
    """What a slot holds: our record of it, else (booted slot only) os-release."""
    rec = state.slots.get(str(slot.part_uuid))
    if rec is not None and rec.condition in ("installed", "good") and rec.version:
        return rec.version
    if slot.part_uuid == booted.part_uuid:
        return os_release_version
    return None


def is_staged(state: State, target: SlotStatus, primary: Slot | None, version: str) -> bool:
    """The target already holds ``version``, verified, and boots next."""
    rec = state.slots.get(str(target.slot.part_uuid))
    return (
        rec is not None
        and rec.condition == "installed"
        and rec.unstaged is None
        and rec.version == version
        and primary is not None
        and primary.part_uuid == target.slot.part_uuid
        and target.flags.bootable
    )


def host_state(state: State, booted: SlotStatus, primary: Slot | None, busy: bool) -> HostState:
    if busy:
        return "installing"
    if state.pending is not None and state.pending.part_uuid != str(booted.slot.part_uuid):
        return "install_interrupted"
    if not booted.flags.successful:
        return "trial_boot"
    if primary is not None and primary.part_uuid != booted.slot.part_uuid:
        return "update_staged"
    return "idle"


def settle_booted_install(state: State, booted: Slot) -> State:
    """Drop the pending mark of an install into the slot that booted: it was complete.

    The firmware boots an install's target only once the install made it the
    next boot, which follows the verified, flushed write; a power cut between
    that and saving "installed" leaves the mark (and the slot "installing").
    """
    if state.pending is None or state.pending.part_uuid != str(booted.part_uuid):
        return state
    return replace(state, pending=None)


def rollback_refusal(
    record: SlotRecord | None, other: SlotStatus, primary: Slot | None
) -> str | None:
    """Why the other slot may not become the next boot, or None if it may."""
    if record is None:
        return "this agent has no record of what the other slot holds"
    if record.condition not in ("installed", "good"):
        return f"the other slot is {record.condition}, not a complete, verified install"
    if record.unstaged is not None:
        return (
            f"the other slot holds {record.version}, un-staged ({record.unstaged}); "
            "a check stages it again once it may be booted"
        )
    if primary is not None and primary.part_uuid == other.slot.part_uuid:
        return "the other slot already boots next"
    return None


HealthFailureAction = Literal["give_up", "keep", "no_fallback"]


def health_failure_action(
    booted: SlotStatus, record: SlotRecord | None, other: SlotStatus
) -> HealthFailureAction:
    """What a failed health check does to the booted slot.

    ``keep``: it is the known-good slot, blessed before with what it holds now
    (the boot loader says so, or this agent's record does: RAUC's GRUB puts
    every boot on trial), so it stays the slot that boots; there is no newer
    install to give up, and falling back would downgrade. ``give_up``: a trial
    boot of a new install, and the other slot can boot: mark it bad.
    ``no_fallback``: a trial boot, but nothing else can boot.
    """
    if booted.flags.successful or (record is not None and record.condition == "good"):
        return "keep"
    if not other.flags.bootable:
        return "no_fallback"
    return "give_up"


def detect_rollback(state: State, other: SlotStatus) -> str | None:
    """The version whose trial boot failed, if the host came back on the old slot.

    The other slot holds an install that was verified and made the next boot
    ("installed"), or one given up after failed health checks ("bad"), and it
    is neither bootable nor blessed: the firmware spent its try or the agent
    marked it bad, and the old slot booted again. Reported once: the version
    then joins ``failed_versions``.
    """
    rec = state.slots.get(str(other.slot.part_uuid))
    if rec is None or rec.condition not in ("installed", "bad") or rec.version is None:
        return None
    if rec.unstaged is not None:  # the agent took it off the next boot; it never booted
        return None
    if other.flags.bootable or other.flags.successful:
        return None
    if rec.version in state.failed_versions:
        return None
    return rec.version


def reusable_install(record: SlotRecord | None, m: Manifest) -> bool:
    """The slot holds ``m``'s image from an earlier install the agent un-staged (a blocked
    version, unblocked since): what was written and verified then is this manifest's."""
    return (
        record is not None
        and record.condition == "installed"
        and record.unstaged is not None
        and record.version == m.version
        and record.raw_size == m.image.raw_size
        and record.raw_sha256 == m.image.raw_sha256
        and record.boot == tuple(BootFileRecord(b.name, b.size, b.sha256) for b in m.boot)
    )


def check_claim(claim: ImageClaim, manifest: Manifest, image_url: str) -> None:
    """An update server's size, hash and URL must be the signed manifest's own."""
    mismatches = []
    if claim.size != manifest.image.size:
        mismatches.append(f"size {claim.size} != {manifest.image.size}")
    if claim.sha256 != manifest.image.sha256:
        mismatches.append(f"sha256 {claim.sha256} != {manifest.image.sha256}")
    if claim.url != image_url:
        mismatches.append(f"url {claim.url} != {image_url}")
    if claim.version is not None and claim.version != manifest.version:
        mismatches.append(f"version {claim.version} != {manifest.version}")
    if mismatches:
        raise VerificationError(
            "source_mismatch",
            "the update server's answer disagrees with the signed manifest: "
            + "; ".join(mismatches),
        )
