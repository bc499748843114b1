"""`make demo`: one full update cycle on built-in defaults, narrated.

Two throwaway signing keys: the host pins the first (its keyring, root 0 of
the trust roots); a key rotation (`updatectl keys rotate`, signed by both)
replaces it with the second, which signs release 1.1.0. Releases 1.0.0 and
1.1.0 (small real ext4 images) published into a local repository served over
loopback HTTP; a GPT disk image with USR-A/USR-B booted from A with 1.0.0.
Then, with the real `updatectl`: check --install (walking the rotation),
"reboot" through the firmware emulation, mark-good, status.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devtools.diskimage import cgpt_show
from devtools.fsimage import make_usr_image, read_version
from devtools.gpgkeys import ceremony_home, kill_agents, signing_key
from devtools.host import LABELS, provision
from devtools.repo_server import RepoServer
from updater.log import configure

SLOT_SIZE = 64 * 1024 * 1024
UPDATECTL = str(Path(sys.executable).with_name("updatectl"))


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"\n==> {text}", flush=True)


def sh(*argv: str, check: bool = True) -> int:
    print("$ " + " ".join(argv), flush=True)
    return subprocess.run(argv, check=check).returncode


def show_flags(disk: Path) -> None:
    if shutil.which("cgpt") is None:
        return
    for i, label in enumerate(LABELS, start=1):
        p, t, s = (cgpt_show(disk, i, f) for f in ("P", "T", "S"))
        print(
            f"  cgpt show -i {i} -P/-T/-S {disk.name}: {label} priority={p} tries={t} "
            f"successful={s}"
        )


def release(image: Path, version: str, repo: Path, gnupghome: Path, fingerprint: str) -> None:
    sh(
        UPDATECTL,
        "release",
        "--image",
        str(image),
        "--version",
        version,
        "--repo",
        str(repo),
        "--gnupghome",
        str(gnupghome),
        "--key",
        fingerprint,
    )


def run_demo(work: Path) -> None:
    t0 = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    say("Two throwaway release signing keys (real gpg, ed25519): the old and the new")
    with (
        signing_key(work / "publisher-gnupg", "updater demo <release@localhost>") as key,
        signing_key(work / "new-key-gnupg", "updater demo 2027 <release@localhost>") as new_key,
    ):
        print(f"  old key {key.fingerprint} (the hosts' keyring: {key.public_key.name})")
        print(f"  new key {new_key.fingerprint}")

        say("Release 1.0.0, signed by the old key")
        repo = work / "repo"
        images = {}
        for version in ("1.0.0", "1.1.0"):
            images[version] = make_usr_image(
                work / f"usr-{version}.img", version, size=48 * 1024 * 1024
            )
        release(images["1.0.0"], "1.0.0", repo, key.gnupghome, key.fingerprint)

        say("Key rotation: root 1 trusts only the new key, signed by the old and the new")
        ceremony = ceremony_home(work / "ceremony-gnupg", key, new_key)
        try:
            sh(
                UPDATECTL,
                "keys",
                "rotate",
                "--repo",
                str(repo),
                "--gnupghome",
                str(ceremony),
                "--key",
                key.fingerprint,
                "--key",
                new_key.fingerprint,
                "--add",
                new_key.fingerprint,
                "--remove",
                key.fingerprint,
                "--expires-days",
                "365",
            )
        finally:
            kill_agents(ceremony)

        say("Release 1.1.0, signed by the new key only")
        release(images["1.1.0"], "1.1.0", repo, new_key.gnupghome, new_key.fingerprint)
        print(
            "  repository:",
            *sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()),
            sep="\n    ",
        )

        with RepoServer(repo) as server:
            say(f"The repository is served at {server.url} (loopback HTTP)")
            host = provision(
                work / "host",
                slot_size=SLOT_SIZE,
                first_image=images["1.0.0"],
                first_version="1.0.0",
                repo_url=server.url,
                keyring=key.public_key,
            )
            print(
                f"  disk image {host.disk} (GPT, {', '.join(LABELS)}); the firmware booted:"
                f" {host.cmdline.read_text().strip()}"
            )
            cfg = ["--config", str(host.config)]

            say("Before: booted from USR-A with 1.0.0")
            sh(UPDATECTL, *cfg, "status")
            show_flags(host.disk)

            say(
                "updatectl check --install: walk the trust roots (old key -> new key), verify,"
                " stream into USR-B, make it the next boot"
            )
            sh(UPDATECTL, *cfg, "check", "--install")
            sh(UPDATECTL, *cfg, "status")
            show_flags(host.disk)

            say("Reboot: the firmware emulation picks the highest-priority bootable slot")
            sh(
                sys.executable,
                "-m",
                "partitions.firmware",
                "--disk",
                str(host.disk),
                "--cmdline-out",
                str(host.cmdline),
            )
            show_flags(host.disk)
            sh(UPDATECTL, *cfg, "status")
            slot_b = host.layout.by_label("USR-B")
            with tempfile.NamedTemporaryFile(dir=work, suffix=".img") as copy:
                copy.write(host.slot_bytes("USR-B", slot_b.size))
                copy.flush()
                print(f"  USR-B's filesystem says IMAGE_VERSION={read_version(Path(copy.name))}")

            say("The new boot is healthy: updatectl mark-good")
            sh(UPDATECTL, *cfg, "mark-good")
            show_flags(host.disk)

            say("Final status")
            sh(UPDATECTL, *cfg, "status")
    say(f"Done in {time.monotonic() - t0:.1f}s. Everything is under {work}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", type=Path, default=Path("demo-run"))
    args = p.parse_args()
    configure()
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    run_demo(args.workdir.resolve())


if __name__ == "__main__":
    main()
