"""`updatectl release`: the repository layout, the manifest and its signature."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import zstandard

from devtools.gpgkeys import SigningKey
from tests.conftest import updatectl
from updater.gpg import GnupgVerifier
from updater.manifest import parse

DECOMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "zstd": lambda b: zstandard.ZstdDecompressor().stream_reader(b).read(),
    "xz": lzma.decompress,
    "gzip": gzip.decompress,
    "none": lambda b: b,
}


@pytest.fixture(scope="module")
def raw_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("raw") / "usr.img"
    p.write_bytes(
        b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(40_000)) + bytes(300_000)
    )
    return p


@pytest.mark.parametrize("compression", ["zstd", "xz", "gzip", "none"])
def test_release_layout(
    tmp_path: Path, release_key: SigningKey, raw_image: Path, compression: str
) -> None:
    repo = tmp_path / "repo"
    before = datetime.now(UTC).replace(microsecond=0)
    r = updatectl(
        None,
        "release",
        "--json",
        "--image",
        str(raw_image),
        "--version",
        "2.0.1",
        "--repo",
        str(repo),
        "--gnupghome",
        str(release_key.gnupghome),
        "--key",
        release_key.fingerprint,
        "--compression",
        compression,
    )
    assert r.code == 0, r.err
    suffix = {"zstd": ".zst", "xz": ".xz", "gzip": ".gz", "none": ""}[compression]
    image = repo / "images" / "2.0.1" / f"usr.img{suffix}"
    manifest_bytes = (repo / "stable" / "release.json").read_bytes()
    signature = (repo / "stable" / "release.json.asc").read_bytes()
    # a zstd image carries its chunk index for delta updates (updater.chunkindex)
    chunks = ["images/2.0.1/usr.img.zst.chunks"] if compression == "zstd" else []
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()) == [
        f"images/2.0.1/usr.img{suffix}",
        *chunks,
        f"images/2.0.1/usr.img{suffix}.json",  # beside the package, for Omaha
        f"images/2.0.1/usr.img{suffix}.json.asc",
        "stable/release.json",
        "stable/release.json.asc",
    ]
    beside = repo / "images" / "2.0.1" / f"usr.img{suffix}.json"
    omaha_manifest = parse(beside.read_bytes())
    assert omaha_manifest.image.url == f"usr.img{suffix}"  # relative to itself
    assert omaha_manifest.image.sha256 == parse(manifest_bytes).image.sha256
    beside_sig = beside.with_name(beside.name + ".asc").read_bytes()
    assert GnupgVerifier([release_key.public_key]).verify(beside.read_bytes(), beside_sig).valid

    doc = json.loads(manifest_bytes)
    assert set(doc) == {"schema", "channel", "version", "created", "expires", "image"}
    index = {"index"} if compression == "zstd" else set()
    assert set(doc["image"]) == {
        "url",
        "size",
        "sha256",
        "compression",
        "raw_size",
        "raw_sha256",
        *index,
    }
    m = parse(manifest_bytes)
    data = image.read_bytes()
    raw = raw_image.read_bytes()
    assert (m.schema, m.channel, m.version) == (1, "stable", "2.0.1")
    assert m.image.url == f"../images/2.0.1/usr.img{suffix}"
    assert (m.image.size, m.image.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert (m.image.raw_size, m.image.raw_sha256) == (len(raw), hashlib.sha256(raw).hexdigest())
    assert m.image.compression.value == compression
    assert DECOMPRESS[compression](data) == raw
    if compression != "none":
        assert len(data) < len(raw)
    # default expiry: 30 days
    assert before <= m.created <= datetime.now(UTC)
    assert m.expires - m.created == timedelta(days=30)
    # the signature is real and made by the given key
    verdict = GnupgVerifier([release_key.public_key]).verify(manifest_bytes, signature)
    assert verdict.valid and verdict.fingerprint == release_key.fingerprint


def test_expiry_is_settable(tmp_path: Path, release_key: SigningKey, raw_image: Path) -> None:
    r = updatectl(
        None,
        "release",
        "--image",
        str(raw_image),
        "--version",
        "1.0",
        "--repo",
        str(tmp_path),
        "--channel",
        "beta",
        "--gnupghome",
        str(release_key.gnupghome),
        "--key",
        release_key.fingerprint,
        "--expires-days",
        "2",
        "--compression",
        "none",
    )
    assert r.code == 0, r.err
    m = parse((tmp_path / "beta" / "release.json").read_bytes())
    assert m.expires - m.created == timedelta(days=2) and m.channel == "beta"


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--version", "1 0"], 3),
        (["--version", "1.0", "--channel", "a/b"], 3),
        (["--version", "1.0", "--expires-days", "0"], 3),
        (["--version", "1.0", "--key", "0" * 40], 4),
    ],
)
def test_release_refuses_bad_input(
    tmp_path: Path, release_key: SigningKey, raw_image: Path, args: list[str], code: int
) -> None:
    base = [
        "release",
        "--image",
        str(raw_image),
        "--repo",
        str(tmp_path / "repo"),
        "--gnupghome",
        str(release_key.gnupghome),
        "--key",
        release_key.fingerprint,
    ]
    r = updatectl(None, *base, *args)
    assert r.code == code, r.err
    assert not (tmp_path / "repo" / "stable" / "release.json").exists()


def test_missing_image(tmp_path: Path, release_key: SigningKey) -> None:
    r = updatectl(
        None,
        "release",
        "--image",
        str(tmp_path / "nope"),
        "--version",
        "1",
        "--repo",
        str(tmp_path),
        "--gnupghome",
        str(release_key.gnupghome),
        "--key",
        release_key.fingerprint,
    )
    assert r.code == 3 and "no image file" in r.err


@pytest.mark.parametrize(
    ("version", "warned"),
    [
        ("1.0.0", None),
        ("2.10.3", None),
        ("1.0.0~rc1", "not a semver"),  # our README's pre-release spelling: Nebraska refuses it
        ("1.0", "not a semver"),
        ("1.0.0^1", "not a semver"),
        ("01.0.0", "not a semver"),
        ("1.0.0-rc1", "semver pre-release"),  # Nebraska and UAPI order it differently
    ],
)
@pytest.mark.parametrize("json_output", [True, False])
def test_release_warns_when_nebraska_would_refuse_or_misorder_the_version(
    tmp_path: Path,
    release_key: SigningKey,
    raw_image: Path,
    version: str,
    warned: str | None,
    json_output: bool,
) -> None:
    r = updatectl(
        None,
        "release",
        *(["--json"] if json_output else []),
        "--image",
        str(raw_image),
        "--version",
        version,
        "--repo",
        str(tmp_path / "repo"),
        "--gnupghome",
        str(release_key.gnupghome),
        "--key",
        release_key.fingerprint,
        "--compression",
        "none",
    )
    assert r.code == 0, r.err  # a warning, never a refusal: fine for a static repository
    warnings = [line for line in r.err.splitlines() if line.startswith("updatectl: warning:")]
    if warned is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warned in warnings[0] and "Nebraska" in warnings[0]
    if json_output:
        assert len(r.json()["warnings"]) == (warned is not None)


def release_args(tmp_path: Path, key: SigningKey, image: Path, *extra: str) -> list[str]:
    return [
        "release",
        "--json",
        "--image",
        str(image),
        "--version",
        "1.1.0",
        "--repo",
        str(tmp_path / "repo"),
        "--gnupghome",
        str(key.gnupghome),
        "--key",
        key.fingerprint,
        *extra,
    ]


def test_release_with_kernel_and_initrd(
    tmp_path: Path, release_key: SigningKey, raw_image: Path
) -> None:
    kernel, initrd = tmp_path / "vmlinuz-6.1", tmp_path / "initrd.img-6.1"
    kernel.write_bytes(b"MZ kernel" * 1000)
    initrd.write_bytes(b"\x1f\x8b initrd" * 3000)
    args = release_args(tmp_path, release_key, raw_image, "--kernel", str(kernel))
    r = updatectl(None, *args, "--initrd", str(initrd))
    assert r.code == 0, r.err
    repo = tmp_path / "repo"
    m = parse((repo / "stable" / "release.json").read_bytes())
    assert [(b.name, b.url, b.size) for b in m.boot] == [
        ("vmlinuz", "../images/1.1.0/boot/vmlinuz", kernel.stat().st_size),
        ("initrd.img", "../images/1.1.0/boot/initrd.img", initrd.stat().st_size),
    ]
    for b, src in zip(m.boot, (kernel, initrd), strict=True):
        published = (repo / "stable" / b.url).resolve()
        assert published.read_bytes() == src.read_bytes()
        assert b.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    # the manifest beside the image (an Omaha codebase) names them relative to itself
    beside = parse((repo / "images" / "1.1.0" / "usr.img.zst.json").read_bytes())
    assert [b.url for b in beside.boot] == ["boot/vmlinuz", "boot/initrd.img"]
    assert [b["name"] for b in r.json()["boot"]] == ["vmlinuz", "initrd.img"]
    assert not [p for p in (repo / "images" / "1.1.0" / "boot").iterdir() if p.name[0] == "."]


def test_release_with_a_uki(tmp_path: Path, release_key: SigningKey, raw_image: Path) -> None:
    uki = tmp_path / "os.efi"
    uki.write_bytes(b"MZ uki" * 100)
    r = updatectl(None, *release_args(tmp_path, release_key, raw_image, "--uki", str(uki)))
    assert r.code == 0, r.err
    m = parse((tmp_path / "repo" / "stable" / "release.json").read_bytes())
    assert [b.name for b in m.boot] == ["uki.efi"]


@pytest.mark.parametrize(
    ("which", "words"),
    [
        (["--uki", "K", "--kernel", "K"], "--uki, or --kernel and --initrd"),
        (["--initrd", "K"], "an initrd needs a kernel"),
        (["--kernel", "MISSING"], "no boot file"),
        (["--kernel", "EMPTY"], "a boot file has 1 to"),
    ],
)
def test_release_refuses_bad_boot_files(
    tmp_path: Path, release_key: SigningKey, raw_image: Path, which: list[str], words: str
) -> None:
    (tmp_path / "K").write_bytes(b"kernel")
    (tmp_path / "EMPTY").write_bytes(b"")
    paths = [str(tmp_path / w) if w[0] != "-" else w for w in which]
    r = updatectl(None, *release_args(tmp_path, release_key, raw_image, *paths))
    assert r.code == 3, r.err
    assert words in r.err
    assert not (tmp_path / "repo" / "stable" / "release.json").exists()
