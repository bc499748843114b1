"""OpenPGP signatures through python-gnupg, in a private, throwaway GNUPGHOME.

Only the configured public key files are imported, into a fresh home per
verification, so neither root's keyring nor a key left behind by an earlier
run can vouch for a release. A missing or empty keyring is an error, never a
skip (update_engine's silent skip is the failure we avoid).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import gnupg
import structlog

from updater.errors import VerificationError
from updater.run import run
from updater.trustroot import Signer
from updater.verify import SignatureVerdict

log = structlog.get_logger(__name__)


# gpg's status keywords (doc/DETAILS) that say why a signature is not good, the
# most telling first: one verdict names the worst thing gpg found.
_PROBLEMS: tuple[tuple[str, str], ...] = (
    ("BADSIG", "bad_signature"),
    ("REVKEYSIG", "key_revoked"),
    ("EXPKEYSIG", "key_expired"),
    ("EXPSIG", "signature_expired"),
    ("NO_PUBKEY", "unknown_key"),
    ("ERRSIG", "check_error"),
    ("NODATA", "no_signature"),
    ("UNEXPECTED", "no_signature"),
)
_ERRSIG_MISSING_KEY = "9"  # ERRSIG's rc when the public key is missing
_MAX_USER = 80  # characters of a key's user id kept in a message


def _user(text: str) -> str:
    flat = "".join(c if c.isprintable() else "?" for c in text.strip())
    return flat if len(flat) <= _MAX_USER else flat[: _MAX_USER - 3] + "..."


def explain_status(lines: Iterable[str]) -> tuple[str, str]:
    """``(reason, detail)`` from gpg's ``[GNUPG:]`` status lines of a verify. Pure.

    ``reason`` is bounded: ``good`` (a GOODSIG and nothing wrong), one of the
    reasons of ``_PROBLEMS``, or ``no_answer``; ``detail`` says it for a person.
    """
    seen: dict[str, list[str]] = {}  # keyword -> its arguments, the first time it came
    for line in lines:
        if line.startswith("[GNUPG:] "):
            keyword, _, rest = line[len("[GNUPG:] ") :].partition(" ")
            seen.setdefault(keyword, rest.split(" "))
    for keyword, reason in _PROBLEMS:
        if keyword not in seen:
            continue
        args = seen[keyword]
        keyid = args[0] or "?"
        if keyword == "ERRSIG":  # keyid pkalgo hashalgo class time rc [fingerprint]
            rc = args[5] if len(args) > 5 else "?"
            if rc == _ERRSIG_MISSING_KEY:
                return "unknown_key", f"made by key {keyid}, which is not in the keyring"
            return reason, f"gpg could not check the signature by key {keyid} (error code {rc})"
        by = f"key {keyid} ({_user(' '.join(args[1:]))})" if len(args) > 1 else f"key {keyid}"
        return reason, {
            "bad_signature": f"bad signature by {by}: the data or the signature was changed",
            "key_revoked": f"made by {by}, which is revoked",
            "key_expired": f"made by {by}, which has expired",
            "signature_expired": f"the signature by {by} has expired",
            "unknown_key": f"made by key {keyid}, which is not in the keyring",
            "no_signature": "no OpenPGP signature found",
        }[reason]
    if "GOODSIG" in seen:
        args = seen["GOODSIG"]
        return "good", f"good signature by key {args[0]} ({_user(' '.join(args[1:]))})"
    return "no_answer", "gpg reported no signature"


def explain_signers(lines: Iterable[str]) -> tuple[Signer, ...]:
    """Each signature of a detached signature file, from gpg's status lines. Pure.

    gpg starts each signature with ``NEWSIG``; a signature is good when gpg
    says GOODSIG and VALIDSIG and nothing worse (expired or revoked key, bad
    signature). The fingerprint is the primary key's (VALIDSIG's last field),
    else the one ERRSIG names, else the key id.
    """
    blocks: list[list[str]] = []
    for line in lines:
        if not line.startswith("[GNUPG:] "):
            continue
        keyword = line[len("[GNUPG:] ") :].partition(" ")[0]
        if keyword == "NEWSIG" or not blocks:
            blocks.append([])
        if keyword != "NEWSIG":
            blocks[-1].append(line)
    signers: list[Signer] = []
    for block in blocks:
        reason, _ = explain_status(block)
        fields = {
            k: r.split(" ")
            for k, _, r in (b[len("[GNUPG:] ") :].partition(" ") for b in reversed(block))
        }
        fingerprint = ""
        if "VALIDSIG" in fields:
            args = fields["VALIDSIG"]
            fingerprint = args[9] if len(args) > 9 else args[0]
        elif "ERRSIG" in fields:
            args = fields["ERRSIG"]
            fingerprint = args[6] if len(args) > 6 and args[6] else args[0]
        else:
            for keyword in ("BADSIG", "REVKEYSIG", "EXPKEYSIG", "EXPSIG", "NO_PUBKEY"):
                if keyword in fields and fields[keyword][0]:
                    fingerprint = fields[keyword][0]  # a long key id
                    break
        if fingerprint or reason == "good":
            signers.append(Signer(fingerprint.upper(), reason == "good" and bool(fingerprint)))
    return tuple(signers)


def is_key(fingerprint: str, key_id: str) -> bool:
    """Whether ``key_id`` (a fingerprint or a long key id gpg named) is ``fingerprint``'s."""
    return len(key_id) >= 16 and fingerprint.upper().endswith(key_id.upper())


class SignatureChecker(Protocol):
    def verify(self, data: bytes, signature: bytes) -> SignatureVerdict:
        """Check a detached signature; raises VerificationError(no_keyring)."""
        ...


@contextlib.contextmanager
def private_home(prefix: str = "updater-gpg-") -> Iterator[Path]:
    """A fresh GNUPGHOME that is removed, with any agent it started, afterwards."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(home, 0o700)
    try:
        yield home
    finally:
        with contextlib.suppress(Exception):
            run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False, timeout=10)
        shutil.rmtree(home, ignore_errors=True)


class GnupgVerifier:
    """Verifies detached armored signatures against pinned public key files (or the
    public keys of a trust root: ``keys``, of which only ``trusted`` count).

    ``threshold`` distinct trusted keys must have signed; a signature by a key
    of ``retired`` (removed by a key rotation) is named as such.
    """

    def __init__(
        self,
        keyring: Sequence[Path] = (),
        gpg_binary: str = "gpg",
        *,
        keys: Sequence[bytes] = (),
        trusted: frozenset[str] | None = None,
        threshold: int = 1,
        retired: frozenset[str] = frozenset(),
        root_version: int | None = None,
    ) -> None:
        self._keyring = tuple(keyring)
        self._keys = tuple(keys)
        self._trusted = trusted
        self._threshold = threshold
        self._retired = retired
        self._root_version = root_version
        self._gpg_binary = gpg_binary

    def fingerprints(self) -> frozenset[str]:
        """The fingerprints of the configured keys (imported into a throwaway home)."""
        with private_home() as home:
            gpg = gnupg.GPG(
                gpgbinary=self._gpg_binary, gnupghome=str(home), options=["--no-autostart"]
            )
            return self._import(gpg)

    def _import(self, gpg: gnupg.GPG) -> frozenset[str]:
        if self._keys:
            fingerprints: set[str] = set()
            for blob in self._keys:
                result = gpg.import_keys(blob)
                fingerprints.update(fp.upper() for fp in result.fingerprints if fp)
            return frozenset(fingerprints)
        if not self._keyring:
            raise VerificationError(
                "no_keyring",
                "no keyring is configured",
                hint="set [source] keyring to the release public key file(s), "
                "or [source] trust_root",
            )
        fingerprints = set()
        for path in self._keyring:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise VerificationError(
                    "no_keyring",
                    f"keyring {path} cannot be read: {exc.strerror}",
                    hint="install the release public key there",
                ) from None
            result = gpg.import_keys(data)
            fingerprints.update(fp.upper() for fp in result.fingerprints if fp)
        if not fingerprints:
            raise VerificationError(
                "no_keyring",
                f"the keyring ({', '.join(map(str, self._keyring))}) holds no public key",
                hint="export the release key with `gpg --export --armor KEYID`",
            )
        return frozenset(fingerprints)

    def verify(self, data: bytes, signature: bytes) -> SignatureVerdict:
        with private_home() as home:
            # Verifying needs no gpg-agent: never start one, so that a process
            # killed mid-check (SIGKILL skips the cleanup) leaves none behind.
            gpg = gnupg.GPG(
                gpgbinary=self._gpg_binary, gnupghome=str(home), options=["--no-autostart"]
            )
            trusted = self._import(gpg)
            sig_path = home / "detached.asc"
            sig_path.write_bytes(signature)
            result = gpg.verify_data(str(sig_path), data)
        if self._trusted is not None:
            trusted = trusted & self._trusted  # a key block may carry keys the root does not name
        lines = str(result.stderr or "").splitlines()
        signers = explain_signers(lines)
        good = frozenset(s.fingerprint for s in signers if s.good and s.fingerprint in trusted)
        # python-gnupg's .status is the last status it saw: "signature valid"
        # (VALIDSIG) follows REVKEYSIG, so read gpg's own status lines instead.
        reason, detail = explain_status(lines)
        valid = len(good) >= self._threshold
        fingerprint = min(good) if good else next((s.fingerprint for s in signers), None)
        if valid:
            if reason != "good" or len(good) > 1:  # one of several signatures is not good
                detail = f"good signatures by {', '.join(sorted(good))}"
            reason = "good"
        else:
            leaked = sorted(
                s.fingerprint
                for s in signers
                if any(is_key(r, s.fingerprint) for r in self._retired)
            )
            if leaked:
                reason = "key_retired"
                detail = f"made by key {leaked[0]}, which a key rotation removed"
                fingerprint = leaked[0]
            elif good:
                reason = "below_threshold"
                detail = f"{len(good)} valid signature(s), {self._threshold} needed"
            elif reason == "good":
                reason = "unknown_key"
                detail = f"made by key {fingerprint}, which is not a trusted key"
        log.info(
            "signature_checked",
            valid=valid,
            fingerprint=fingerprint,
            signers=sorted(good),
            threshold=self._threshold,
            root_version=self._root_version,
            reason=reason,
            status=detail,
        )
        return SignatureVerdict(
            valid=valid,
            fingerprint=fingerprint,
            detail=detail,
            keyring=trusted,
            reason=reason,
            good=good,
            threshold=self._threshold,
            signers=signers,
        )


def sign_detached(
    data_path: Path,
    out_path: Path,
    *,
    gnupghome: Path,
    key_id: str | Sequence[str],
    passphrase: str | None = None,
    gpg_binary: str = "gpg",
) -> None:
    """Write an armored detached signature of ``data_path`` (publisher side): one
    signature per key of ``key_id`` in one file (a threshold of keys signs so)."""
    key_ids = [key_id] if isinstance(key_id, str) else list(key_id)
    if not key_ids:
        raise VerificationError(
            "signature_invalid", "no signing key given", hint="give --key (repeatable)"
        )
    gpg = gnupg.GPG(gpgbinary=gpg_binary, gnupghome=str(gnupghome))
    # --local-user: an unknown key is an error, never a silent fallback to the default key;
    # given several times, gpg makes one signature per key
    extra = [arg for k in key_ids for arg in ("--local-user", k)]
    if passphrase is not None:
        extra += ["--pinentry-mode", "loopback"]
    with data_path.open("rb") as fh:
        result = gpg.sign_file(
            fh,
            keyid=key_ids[0],
            passphrase=passphrase,
            detach=True,
            clearsign=False,
            binary=False,
            extra_args=extra,
        )
    made_by = [
        line.split(" ")[-1].upper()
        for line in str(result.stderr or "").splitlines()
        if line.startswith("[GNUPG:] SIG_CREATED ")
    ]
    missing = []
    for k in key_ids:
        hex_id = k.upper().removeprefix("0X")
        if all(c in "0123456789ABCDEF" for c in hex_id) and not any(
            m.endswith(hex_id) for m in made_by
        ):
            missing.append(k)
    if not result.data or missing or len(made_by) < len(key_ids):
        raise VerificationError(
            "signature_invalid",
            f"gpg could not sign with key {', '.join(missing or key_ids)}: "
            f"{result.status or result.stderr.strip()}",
            hint="check --gnupghome and --key (gpg --list-secret-keys)",
        )
    out_path.write_bytes(result.data)
