"""Check for an update and install it: the thin shell around the rules.

Decisions (is the manifest newer, is it staged, may it be installed) are pure
(:mod:`updater.verify`, :mod:`updater.decisions`); the :class:`Updater` gathers
facts through its ports, tells the update server what happened, and hands a
checked update to the :class:`~updater.installer.Installer`. Operations on the
slots that need no update server are :class:`~updater.slots.Slots`'.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Protocol

import structlog

from partitions.bootcontrol import Slot, SlotStatus
from policies.failed import FailedRecord, Verdict, refusal
from updater import versions
from updater.decisions import check_claim, is_staged
from updater.errors import ConfigError, OmahaError, RefusedError, UpdaterError, VerificationError
from updater.gpg import SignatureChecker
from updater.hostpolicy import HostPolicy, downgrade_allowed, install_refusal
from updater.hostpolicyfile import HostPolicyStore
from updater.install import ProgressFn, WriteResult
from updater.installer import Installer
from updater.manifest import Manifest
from updater.slots import Slots, StatusReport
from updater.source import Happening, HeldBack, NoOffer, UpdateSource, report
from updater.state import State, StateStore
from updater.transport import Transport
from updater.updatesettings import UpdateSettings
from updater.verify import Expectations, is_newer, verify_manifest

log = structlog.get_logger(__name__)

# --- ports -------------------------------------------------------------------


class VersionBlocks(Protocol):
    """This host's group's failed versions (policies.failed.GroupBlocks over etcd).

    Blocking calls; LockError when the group's store cannot be asked.
    """

    group: str

    def verdict(self, version: str) -> Verdict:
        """May ``version`` be installed or rebooted into?"""
        ...

    def record(self, version: str, kind: str, at: float) -> FailedRecord | UpdaterError:
        """Add this host's failure of ``version`` (idempotent); what is stored afterwards."""
        ...


# --- results -----------------------------------------------------------------
# --- results -----------------------------------------------------------------


@dataclass(frozen=True)
class UpdateCheckResult:
    """What :meth:`Updater.check` found (health checks have their own results)."""

    booted: Slot
    booted_version: str | None
    target: Slot
    manifest: Manifest | None  # None: the server offered nothing (or held it back)
    update_available: bool
    staged: bool  # already installed into the target and boots next
    failed_before: bool = False  # this version rolled back on this host: not again
    deferred: str | None = None  # the server holds an update back (its rollout policy)
    interval_s: float | None = None  # the server's poll interval, if it gave one
    blocked: Verdict | None = None  # the version failed on hosts of the group: not installed
    refused: RefusedError | None = None  # this host refuses it: held, skipped, pinned
    downgrade: bool = False  # below the floor, by the admin's one-shot allowance


class Updater:
    """The update operations (check, install) over the host's :class:`Slots`.

    Every port is required: an updater without an update server is :class:`Slots`
    alone. The slot operations the agent uses are reachable here too (``status``,
    ``unstage``, ...), delegated to ``slots``.
    """

    def __init__(
        self,
        *,
        slots: Slots,
        source: UpdateSource,
        verifier: SignatureChecker,
        transport: Transport,
        settings: UpdateSettings | None = None,
        blocks: VersionBlocks | None = None,
        boot_files_refusal: ConfigError | None = None,
        progress: ProgressFn | None = None,
        policy: HostPolicyStore | None = None,
    ) -> None:
        self.slots = slots
        self.policy = policy  # the admin's hold, skips and downgrade allowance
        self.source = source
        self.verifier = verifier
        self.transport = transport
        self.settings = settings or UpdateSettings()
        self.blocks = blocks  # None: no group shares failed versions (no etcd lock)
        self.progress = progress
        self.installer = Installer(
            slots=slots,
            source=source,
            transport=transport,
            settings=self.settings,
            boot_files_refusal=boot_files_refusal,
        )

    # -- the slots' side, as the agent uses it

    @property
    def store(self) -> StateStore:
        return self.slots.store

    def status(self) -> StatusReport:
        return self.slots.status()

    def staged_slot_boots_next(self) -> bool:
        return self.slots.staged_slot_boots_next()

    def clear_reboot_sentinel(self) -> None:
        self.slots.clear_reboot_sentinel()

    def unstage(self, version: str, reason: str) -> Slot | None:
        return self.slots.unstage(version, reason)

    def host_policy(self) -> HostPolicy:
        """The admin's decisions for this host (StateError ``policy_corrupt``: fail closed)."""
        return HostPolicy() if self.policy is None else self.policy.load()

    # -- verbs

    def check(self) -> UpdateCheckResult:
        """Fetch and verify the channel's manifest; no slot or state changes."""
        booted, target = self.slots.pair()
        self.note_rollback()
        state = self.store.load()
        booted_version = self.slots.booted_version(state, booted.slot)
        if booted.flags.successful:  # a trial boot has not succeeded yet
            self._report_boot(state, booted_version)
        try:
            return self._check(booted, target, state, booted_version)
        except (VerificationError, OmahaError) as exc:
            # the server answered, but not acceptably: it should hear of it
            self._report(Happening("failed", version=booted_version, error=exc, during_check=True))
            raise

    def _report_boot(self, state: State, booted_version: str | None) -> None:
        """The first check after the staged version booted (and was blessed) reports it."""
        report = state.boot_report
        if report is None or booted_version is None:
            return
        if versions.compare(booted_version, report.version) == 0:
            self._report(
                Happening(
                    "rebooted", version=report.version, previous_version=report.previous_version
                )
            )
            self.store.update(lambda st: replace(st, boot_report=None))

    def _check(
        self, booted: SlotStatus, target: SlotStatus, state: State, booted_version: str | None
    ) -> UpdateCheckResult:
        doc = self.source.fetch(booted_version)
        if isinstance(doc, NoOffer | HeldBack):
            deferred = doc.reason if isinstance(doc, HeldBack) else None
            if deferred is not None:
                self._report(Happening("deferred", version=booted_version))
            log.info(
                "update_checked", available=False, booted_version=booted_version, deferred=deferred
            )
            return UpdateCheckResult(
                booted.slot,
                booted_version,
                target.slot,
                None,
                False,
                False,
                deferred=deferred,
                interval_s=doc.interval_s,
            )
        policy = self.host_policy()
        allow_below = policy.downgrade.version if policy.downgrade is not None else None
        if not downgrade_allowed(policy, self.settings.channel, allow_below or ""):
            allow_below = None
        verdict = None if doc.signature is None else self.verifier.verify(doc.body, doc.signature)
        now = self.slots.clock.now()
        manifest = verify_manifest(
            doc.body,
            doc.signature,
            verdict,
            Expectations(
                channel=self.settings.channel,
                booted_version=booted_version,
                highest_accepted=state.highest_version,
                slot_size=target.slot.size,
                now=now,
                allow_below=allow_below,
            ),
        )
        if doc.claim is not None:
            check_claim(doc.claim, manifest, self.source.image_url(manifest))
        failed_before = manifest.version in state.failed_versions
        downgrade = (
            manifest.version == allow_below
            and booted_version is not None
            and versions.compare(manifest.version, booted_version) < 0
        )
        available = (is_newer(manifest, booted_version) or downgrade) and not failed_before
        staged = available and is_staged(state, target, self.slots.boot.primary(), manifest.version)
        refused = None
        if available and not staged:
            refused = install_refusal(manifest.version, policy, self.settings.pin, now.timestamp())
            if refused is not None:
                log.info(
                    "install_refused_by_host",
                    version=manifest.version,
                    error_kind=refused.kind,
                    reason=refused.message,
                )
        blocked = self.blocked(manifest.version) if available and not staged else None
        log.info(
            "update_checked",
            version=manifest.version,
            booted_version=booted_version,
            available=available,
            staged=staged,
            failed_before=failed_before,
            blocked=blocked is not None,
        )
        return UpdateCheckResult(
            booted.slot,
            booted_version,
            target.slot,
            manifest,
            available,
            staged,
            failed_before,
            interval_s=doc.interval_s,
            blocked=blocked,
            refused=refused,
            downgrade=downgrade,
        )

    def newest(self) -> Manifest | None:
        """The channel's newest release, verified (signature, channel, expiry, size) but
        not held to this host's version floor: what `updatectl channel` weighs."""
        booted, target = self.slots.pair()
        state = self.store.load()
        doc = self.source.fetch(self.slots.booted_version(state, booted.slot))
        if isinstance(doc, NoOffer | HeldBack):
            return None
        verdict = None if doc.signature is None else self.verifier.verify(doc.body, doc.signature)
        return verify_manifest(
            doc.body,
            doc.signature,
            verdict,
            Expectations(
                channel=self.settings.channel,
                booted_version=None,
                highest_accepted=None,
                slot_size=target.slot.size,
                now=self.slots.clock.now(),
            ),
        )

    def blocked(self, version: str) -> Verdict | None:
        """The group's verdict on installing ``version`` if it blocks it, else None.

        A lookup that fails does not stop the install (staging reboots nothing):
        the reboot asks again and does not happen unless the answer is "not blocked".
        """
        if self.blocks is None:
            return None
        try:
            verdict = self.blocks.verdict(version)
        except UpdaterError as exc:
            log.warning(
                "version_block_unknown",
                version=version,
                group=self.blocks.group,
                error_kind=exc.kind,
                error=exc.message,
            )
            return None
        if not verdict.blocked:
            return None
        log.error(
            "install_refused_version_blocked",
            version=version,
            group=self.blocks.group,
            hosts=verdict.hosts,
            reason=verdict.describe(),
        )
        return verdict

    def note_rollback(self) -> str | None:
        """Detect and record a boot that came back on the old slot, and tell the update
        server; its version, or None."""
        version = self.slots.note_rollback()
        if version is not None:
            self._report(Happening("rolled_back", version=version))
            self.store.update(lambda st: replace(st, boot_report=None))
        return version

    def install(
        self,
        check: UpdateCheckResult,
        cancel: threading.Event | None = None,
        progress: ProgressFn | None = None,
    ) -> WriteResult | None:
        """Install a checked update into the other slot; None if there is nothing to do."""
        if not check.update_available or check.staged or check.manifest is None:
            return None
        if check.refused is not None:
            raise check.refused
        if check.blocked is not None:
            raise refusal(check.blocked)
        result = self.installer.install(check.manifest, cancel, progress or self.progress)
        if check.downgrade:
            self._downgraded(check.manifest.version)
        return result

    def _downgraded(self, version: str) -> None:
        """The allowed downgrade is staged: ``version`` is the floor now, and the
        allowance is used up (one-shot)."""
        self.store.update(lambda st: replace(st, highest_version=version))
        if self.policy is not None:
            self.policy.update(lambda p: replace(p, downgrade=None))
        log.warning("downgrade_installed", version=version, channel=self.settings.channel)

    def _report(self, happening: Happening) -> None:
        report(self.source, happening)
