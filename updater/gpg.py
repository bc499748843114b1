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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import gnupg
import structlog

from updater.errors import VerificationError
from updater.run import run
from updater.verify import SignatureVerdict

log = structlog.get_logger(__name__)


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
    """Verifies detached armored signatures against pinned public key files."""

    def __init__(self, keyring: Sequence[Path], gpg_binary: str = "gpg") -> None:
        self._keyring = tuple(keyring)
        self._gpg_binary = gpg_binary

    def _import(self, gpg: gnupg.GPG) -> frozenset[str]:
        if not self._keyring:
            raise VerificationError(
                "no_keyring",
                "no keyring is configured",
                hint="set [source] keyring to the release public key file(s)",
            )
        fingerprints: set[str] = set()
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
        fingerprint = result.pubkey_fingerprint or result.fingerprint
        fingerprint = fingerprint.upper() if fingerprint else None
        valid = bool(result.valid) and fingerprint in trusted
        detail = str(result.status or "no signature found")
        log.info("signature_checked", valid=valid, fingerprint=fingerprint, status=detail)
        return SignatureVerdict(
            valid=valid, fingerprint=fingerprint, detail=detail, keyring=trusted
        )


def sign_detached(
    data_path: Path,
    out_path: Path,
    *,
    gnupghome: Path,
    key_id: str,
    passphrase: str | None = None,
    gpg_binary: str = "gpg",
) -> None:
    """Write an armored detached signature of ``data_path`` (publisher side)."""
    gpg = gnupg.GPG(gpgbinary=gpg_binary, gnupghome=str(gnupghome))
    # --local-user: an unknown key is an error, never a silent fallback to the default key
    extra = ["--local-user", key_id]
    if passphrase is not None:
        extra += ["--pinentry-mode", "loopback"]
    with data_path.open("rb") as fh:
        result = gpg.sign_file(
            fh,
            keyid=key_id,
            passphrase=passphrase,
            detach=True,
            clearsign=False,
            binary=False,
            extra_args=extra,
        )
    made_by = (result.fingerprint or "").upper()
    hex_id = key_id.upper().removeprefix("0X")
    wrong_key = all(c in "0123456789ABCDEF" for c in hex_id) and not made_by.endswith(hex_id)
    if not result.data or wrong_key:
        raise VerificationError(
            "signature_invalid",
            f"gpg could not sign with key {key_id}: {result.status or result.stderr.strip()}",
            hint="check --gnupghome and --key (gpg --list-secret-keys)",
        )
    out_path.write_bytes(result.data)
