"""``updatectl release``: publish a signed release into a repository directory."""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import TextIO

from updater import config, keyrotation, release, versions
from updater.cli_output import emit_json
from updater.clock import SystemClock
from updater.errors import ConfigError
from updater.manifest import Compression, format_time
from updater.progress import human


def _passphrase(args: argparse.Namespace) -> str | None:
    if args.passphrase_file is None:
        return None
    try:
        text: str = args.passphrase_file.read_text().rstrip("\n")
    except OSError as exc:
        raise ConfigError(
            "unreadable", exc.strerror or str(exc), file=str(args.passphrase_file)
        ) from None
    return text


def cmd_keys_rotate(args: argparse.Namespace, cfg: config.Config | None, out: TextIO) -> int:
    rotated = keyrotation.rotate(
        keyrotation.RotateRequest(
            repo=args.repo,
            gnupghome=args.gnupghome,
            sign_with=tuple(args.key),
            add=tuple(args.add),
            remove=tuple(args.remove),
            threshold=args.threshold,
            expires_in=timedelta(days=args.expires_days),
            passphrase=_passphrase(args),
        ),
        SystemClock().now(),
    )
    root, previous = rotated.root, rotated.previous
    expires = format_time(root.expires) if root.expires else None
    if args.json:
        emit_json(
            out,
            {
                "version": root.version,
                "threshold": root.threshold,
                "keys": sorted(root.fingerprints),
                "added": sorted(root.fingerprints - previous.fingerprints),
                "removed": sorted(previous.fingerprints - root.fingerprints),
                "expires": expires,
                "signed_by": list(rotated.signed_by),
                "root": str(rotated.path),
                "signature": str(rotated.signature_path),
            },
        )
        return 0
    out.write(
        f"Published root {root.version} ({rotated.path}): {len(root.keys)} key(s), "
        f"threshold {root.threshold}, expires {expires}\n"
    )
    for f in sorted(root.fingerprints - previous.fingerprints):
        out.write(f"  added   {f}\n")
    for f in sorted(previous.fingerprints - root.fingerprints):
        out.write(f"  removed {f}\n")
    return 0


def cmd_release(args: argparse.Namespace, cfg: config.Config | None, out: TextIO) -> int:
    passphrase = _passphrase(args)
    published = release.publish(
        release.ReleaseRequest(
            image=args.image,
            version=args.version,
            repo=args.repo,
            gnupghome=args.gnupghome,
            key_id=tuple(args.key),
            channel=args.channel,
            compression=Compression(args.compression),
            expires_in=timedelta(days=args.expires_days),
            passphrase=passphrase,
            boot_files=release.boot_files(args.kernel, args.initrd, args.uki),
        ),
        SystemClock().now(),
    )
    m = published.manifest
    warnings = versions.omaha_warnings(m.version)
    for warning in warnings:
        args.err.write(f"updatectl: warning: {warning}\n")
    if args.json:
        emit_json(
            out,
            {
                "warnings": list(warnings),
                "version": m.version,
                "channel": m.channel,
                "manifest": str(published.manifest_path),
                "signature": str(published.signature_path),
                "image": str(published.image_path),
                "size": m.image.size,
                "raw_size": m.image.raw_size,
                "expires": format_time(m.expires),
                "boot": [{"name": b.name, "size": b.size, "sha256": b.sha256} for b in m.boot],
            },
        )
    else:
        out.write(
            f"Published {m.version} on {m.channel}: {published.image_path} "
            f"({human(m.image.size)}, {m.image.compression.value}, raw {human(m.image.raw_size)}),"
            f" expires {format_time(m.expires)}\n"
        )
        for b in m.boot:
            out.write(f"  boot file {b.name} ({human(b.size)})\n")
    return 0
