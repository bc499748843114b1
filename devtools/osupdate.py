"""The OS image updating itself under QEMU: what tests/test_os_update.py and
``make demo-os`` / ``make boot-os`` share.

- :func:`test_settings`: the image of :mod:`devtools.osimage` plus what lets a
  test (or a person) see inside the guest on its serial console: every boot's
  facts (``BOOT`` lines), the agent's journal events as they are logged
  (``EVENT`` lines), a report once the agent has settled (``REPORT`` lines,
  then the guest powers off) and one from a pre-reboot hook while an update is
  staged (``STAGED`` lines).
- :class:`Machine`: one VM (disk, OVMF variables, machine id, the credential
  that points its agent at the repository), booted one fresh QEMU per boot.
- :func:`publish`: ``updatectl release`` of an image's slot file system.

The repository is served from this machine's loopback; the guest reaches it
through QEMU's user network as 10.0.2.2. Its address reaches the agent at boot
as the system credential ``updater.config`` (SMBIOS type 11), so one cached
image serves every port.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import re
import shutil
import sys
import tempfile
import time
import uuid as uuid_mod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

from devtools import osimage
from devtools.gpgkeys import SigningKey, create_key, kill_agents
from devtools.repo_server import RepoServer
from updater import cli

GUEST_HOST = "10.0.2.2"  # this machine's loopback, seen from QEMU's user network
GUEST_CPUS = 2  # this machine's cores: TCG runs one thread per virtual CPU
BOOT_TIMEOUT_S = 600.0  # one boot, an install included, under TCG
SETTLE_LIMIT_S = 240  # the guest's report gives up waiting for the agent after this

# ---- what the test image adds -----------------------------------------------------------------

# Started early on every boot: the boot's facts, then the agent's events as
# journald gets them (the journal's own EVENT field, as `journalctl EVENT=` sees it).
CONSOLE_SCRIPT = r"""#!/bin/sh
dev=$(findmnt -n -o SOURCE /)
echo
echo "BOOT slot=$(sed -n 's/^PARTNAME=//p' "/sys/class/block/${dev#/dev/}/uevent")"
echo "BOOT version=$(sed -n 's/^IMAGE_VERSION=//p' /usr/lib/os-release)"
echo "BOOT kernel=$(uname -r)"
echo "BOOT kernel-build=$(uname -v)"
echo "BOOT initrd-version=$(cat /run/image-initrd-version 2>/dev/null || echo -)"
echo "BOOT cmdline=$(cat /proc/cmdline)"
# systemd-boot's choice (a counted entry's name shows the tries left: on trial)
efivar=/sys/firmware/efi/efivars/LoaderEntrySelected-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f
echo "BOOT entry=$(cat "$efivar" | tail -c +5 | tr -d '\0')"
echo "BOOT machine-id=$(cat /etc/machine-id)"
echo "BOOT uptime=$(cut -d' ' -f1 /proc/uptime)"
exec journalctl -b -f -n all -o json --output-fields=EVENT,MESSAGE,_SYSTEMD_UNIT \
    SYSLOG_IDENTIFIER=updater | python3 -u /usr/libexec/osimage-test-events
"""
EVENTS_SCRIPT = r"""import json, sys
for line in sys.stdin:
    try:
        entry = json.loads(line)
    except ValueError:
        continue
    message = entry.get("MESSAGE")
    if not entry.get("EVENT") or not isinstance(message, str):
        continue
    unit = (entry.get("_SYSTEMD_UNIT") or "-").removesuffix(".service")
    # one write, from a fresh line (a login prompt may have left one open)
    sys.stdout.write(f"\nEVENT {unit} {message.splitlines()[0]}\n")
    sys.stdout.flush()
"""
CONSOLE_UNIT = """[Unit]
Description=The boot's facts and the agent's events on the console (test image only)
After=systemd-journald.service local-fs.target
Before=updater.service updater-mark-good.service

[Service]
ExecStart=/usr/libexec/osimage-test-console
StandardOutput=tty
StandardError=tty
TTYPath=/dev/console

[Install]
WantedBy=multi-user.target
"""

# Once the agent has checked this boot and is idle: what the tests assert on,
# then the guest powers itself off. (A boot that installs ends in the agent's
# reboot before that.)
REPORT_CREDENTIAL = "osimage-test.report"
REPORT_SCRIPT = r"""#!/usr/bin/python3
import json, subprocess, sys, time

LIMIT_S = @SETTLE_LIMIT_S@
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
AGENT = ["org.updater.Agent1", "/org/updater/Agent1", "org.updater.Agent1"]


def run(*argv):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout.strip(), p.stderr.strip()


def say(key, value):
    # one write, from a fresh line (a login prompt may have left one open)
    sys.stdout.write(f"\nREPORT {key}=" + " ".join(str(value).split()) + "\n")
    sys.stdout.flush()


def status():
    rc, out, err = run("updatectl", "status", "--json")
    try:
        return json.loads(out)
    except ValueError:
        return {"error": err}


def show(prop, unit="updater.service"):
    return run("systemctl", "show", "-p", prop, "--value", unit)[1]


with open("/proc/uptime") as f:
    booted_at = time.time() - float(f.read().split()[0])
started = time.monotonic()
while True:
    doc = status()
    agent = doc.get("agent") or {}
    if (
        agent.get("state") in ("IDLE", "REPORTING_ERROR_EVENT")
        and agent.get("last_check_time", 0) >= booted_at - 1
    ):
        say("settled", "yes")
        break
    if time.monotonic() - started > LIMIT_S:
        say("settled", "no")
        break
    time.sleep(3)
say("waited", round(time.monotonic() - started))
say("mark-good", show("ActiveState,Result", "updater-mark-good.service").replace("\n", ","))
say("updater", show("ActiveState"))
say("status-text", show("StatusText"))
say("notify-access", show("NotifyAccess"))
say("watchdog-usec", show("WatchdogUSec"))
say("ready-at", show("ActiveEnterTimestampMonotonic"))
say("boot-complete-at", show("ActiveEnterTimestampMonotonic", "boot-complete.target"))
say("mark-good-at", show("ExecMainStartTimestampMonotonic", "updater-mark-good.service"))
say("watchdog-at", show("WatchdogTimestampMonotonic"))
rc, out, err = run("journalctl", "-b", "-u", "updater", "EVENT=update_checked", "-o", "json")
say("journal-update-checked", len(out.splitlines()))
rc, out, err = run(*NOBODY, "busctl", "get-property", *AGENT, "State")
say("nobody-state", f"{rc} {out or err}")
rc, out, err = run(*NOBODY, "busctl", "call", *AGENT, "CheckNow")
say("nobody-checknow", f"{rc} {out or err}")
rc, out, err = run(
    "busctl", "call", "com.coreos.update1", "/com/coreos/update1",
    "com.coreos.update1.Manager", "GetStatus",
)
say("coreos-getstatus", f"{rc} {out or err}")
rc, out, err = run("systemctl", "list-units", "--state=failed", "--plain", "--no-legend")
say("failed", " ".join(line.split()[0] for line in out.splitlines() if line.strip()))
say("status", json.dumps(status(), separators=(",", ":")))
say("end", "yes")
subprocess.run(["systemctl", "poweroff", "--no-block"])
"""
REPORT_UNIT = f"""[Unit]
Description=Report once the agent has settled, then power off (test image only)
After=multi-user.target updater.service updater-mark-good.service
# Only when the test asks (not under `make boot-os`, where a person looks around)
ConditionPathExists=/run/credentials/@system/{REPORT_CREDENTIAL}

[Service]
ExecStart=/usr/libexec/osimage-test-report
StandardOutput=tty
StandardError=tty
TTYPath=/dev/console

[Install]
WantedBy=multi-user.target
"""
# Root logs in on the serial console without a password (test image only).
AUTOLOGIN_DROPIN = """[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 %I $TERM
"""
# Root is logged in on the serial console (AUTOLOGIN_DROPIN): an interactive session
# that the agent's default ([reboot] wait_for_users = true) would wait for, forever.
USERS_DROPIN = """# The test image: root's console login (autologin) must not hold back the reboots.
[reboot]
wait_for_users = false
"""
# The agent runs it after staging an update, before asking logind to reboot.
STAGED_HOOK = r"""#!/bin/sh
exec >/dev/console 2>&1
say() { printf '\n%s\n' "$*"; }  # one line, from a fresh line
say "STAGED reboot-required=$(test -e /run/reboot-required && echo yes || echo no)"
say "STAGED updater="$(systemctl show -p ActiveState,SubState,Type --value updater.service)
say "STAGED status-text=$(systemctl show -p StatusText --value updater.service)"
say "STAGED status=$(updatectl status --json | python3 -m json.tool --compact)"
"""
# Pings every 15 s (half of it): a test sees them within a boot.
AGENT_TEST_DROPIN = "[Service]\nWatchdogSec=30s\n"
# The machine's own job: a small HTTP service (what the fleet test's client
# calls, failing over between machines as a load balancer would). It answers
# with the booted version and slot, so a client sees the rollout.
WEB_PORT = 8080
WEB_SCRIPT = r"""import http.server, os

def fact(path, key):
    try:
        for line in open(path):
            if line.startswith(key + "="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return "-"

BODY = (
    f"version={fact('/usr/lib/os-release', 'IMAGE_VERSION')} "
    f"machine={open('/etc/machine-id').read().strip()}\n"
).encode()

class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("", @PORT@), Answer).serve_forever()
""".replace("@PORT@", str(WEB_PORT))
WEB_UNIT = """[Unit]
Description=The machine's service, answering HTTP on port 8080 (test image only)
After=network.target

[Service]
ExecStart=/usr/bin/python3 /usr/libexec/osimage-test-web
DynamicUser=yes

[Install]
WantedBy=multi-user.target
"""
# A health check as an admin would write one: the new slot is good only once the
# machine's service answers.
WEB_CHECK = r"""#!/usr/bin/python3
import sys, time, urllib.request

for _ in range(40):
    try:
        with urllib.request.urlopen("http://127.0.0.1:@PORT@/", timeout=2) as answer:
            if answer.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(1)
print("the service on port @PORT@ does not answer", file=sys.stderr)
sys.exit(1)
""".replace("@PORT@", str(WEB_PORT))
FAILING_CHECK = (
    '#!/bin/sh\necho "the application does not answer (this release broke it)" >&2\nexit 1\n'
)


def test_settings(
    version: str, *, keyring: bytes, failing_health_check: bool = False
) -> osimage.ImageConfig:
    """The image a test boots: :mod:`devtools.osimage`'s, plus the console reporting."""
    files: list[tuple[str, bytes, int]] = [
        ("/usr/libexec/osimage-test-console", CONSOLE_SCRIPT.encode(), 0o755),
        ("/usr/libexec/osimage-test-events", EVENTS_SCRIPT.encode(), 0o644),
        ("/usr/lib/systemd/system/osimage-test-console.service", CONSOLE_UNIT.encode(), 0o644),
        (
            "/usr/libexec/osimage-test-report",
            REPORT_SCRIPT.replace("@SETTLE_LIMIT_S@", str(SETTLE_LIMIT_S)).encode(),
            0o755,
        ),
        ("/usr/lib/systemd/system/osimage-test-report.service", REPORT_UNIT.encode(), 0o644),
        ("/etc/updater/pre-reboot.d/50-osimage-test-staged", STAGED_HOOK.encode(), 0o755),
        ("/usr/libexec/osimage-test-web", WEB_SCRIPT.encode(), 0o644),
        ("/usr/lib/systemd/system/osimage-test-web.service", WEB_UNIT.encode(), 0o644),
        ("/etc/updater/health.d/40-web-answers", WEB_CHECK.encode(), 0o755),
        (
            "/usr/lib/systemd/system/updater.service.d/50-osimage-test.conf",
            AGENT_TEST_DROPIN.encode(),
            0o644,
        ),
        (
            "/usr/lib/systemd/system/serial-getty@ttyS0.service.d/50-autologin.conf",
            AUTOLOGIN_DROPIN.encode(),
            0o644,
        ),
        ("/usr/lib/updater/config.d/50-osimage-test-users.toml", USERS_DROPIN.encode(), 0o644),
    ]
    if failing_health_check:
        files.append(("/etc/updater/health.d/50-app-answers", FAILING_CHECK.encode(), 0o755))
    return osimage.ImageConfig(
        version=version,
        keyring=keyring,
        extra_files=tuple(files),
        enable=(
            "osimage-test-console.service",
            "osimage-test-report.service",
            "osimage-test-web.service",
        ),
    )


def agent_config(repo_url: str, extra: str = "", *, poll_interval_s: int = 600) -> bytes:
    """The credential ``updater.config``: the repository, and short delays for a test;
    ``extra``: more TOML after it (a fleet's lock settings)."""
    return (
        "[source]\n"
        f'url = "{repo_url}"\n'
        "\n"
        "[agent]\n"
        "first_check_delay_s = 3\n"
        f"poll_interval_s = {poll_interval_s}\n"
        "jitter = 0\n"
        "retry_base_s = 10\n"
        "retry_cap_s = 60\n"
        "coreos_compat = true\n" + extra
    ).encode()


# ---- the release signing key ------------------------------------------------------------------


@contextlib.contextmanager
def cached_signing_key(cache: Path | None = None) -> Iterator[SigningKey]:
    """A throwaway release key kept in the cache: it is baked into the cached
    images, which a new key would rebuild. GnuPG's agents are stopped on the way out."""
    home = osimage.osimage_cache(cache) / "test-signing-key"
    home.parent.mkdir(parents=True, exist_ok=True)
    with open(home.parent / ".key-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta = home / "key.json"
        try:
            if meta.is_file():
                doc = json.loads(meta.read_text())
                key = SigningKey(home, doc["fingerprint"], Path(doc["public_key"]))
            else:
                if home.exists():
                    shutil.rmtree(home)
                key = create_key(home, "updater OS image test <release@localhost>")
                meta.write_text(
                    json.dumps({"fingerprint": key.fingerprint, "public_key": str(key.public_key)})
                )
            yield key
        finally:
            kill_agents(home)


def publish(repo: Path, image: osimage.OsImage, key: SigningKey) -> None:
    """``updatectl release`` of the image's slot file system and boot files as its version."""
    argv = [
        "release",
        "--image", str(image.root_fs),
        "--version", image.version,
        "--repo", str(repo),
        "--gnupghome", str(key.gnupghome),
        "--key", key.fingerprint,
        # the version's own kernel and initrd: the agent writes them to the
        # ESP as /<slot>/vmlinuz and /<slot>/initrd.img before the slot's entry
        "--kernel", str(image.vmlinuz),
        "--initrd", str(image.initrd),
    ]  # fmt: skip
    out, err = io.StringIO(), io.StringIO()
    try:
        code = cli.main(argv, out=out, err=err)
    finally:
        kill_agents(key.gnupghome)
    if code != 0:
        raise RuntimeError(f"updatectl release {image.version} exited {code}: {err.getvalue()}")


@dataclass
class World:
    """What the OS image tests share: the release key, the built images, a scratch dir."""

    key: SigningKey
    images: dict[str, osimage.OsImage]
    tmp: Path


FAILING_VERSION = "1.2.0"  # the test release whose health check fails


@contextlib.contextmanager
def test_world(
    versions: Sequence[str], prefix: str, times: dict[str, float] | None = None
) -> Iterator[World]:
    """The test images of ``versions`` (built once, then cached; :data:`FAILING_VERSION`
    with a failing health check) and a scratch directory for the machines' disks (~1 GiB
    each, sparse), removed on the way out; ``times`` gets how long the images took."""
    started = time.monotonic()
    with cached_signing_key() as key:
        keyring = key.public_key.read_bytes()
        images = {
            v: osimage.build_image(
                test_settings(v, keyring=keyring, failing_health_check=v == FAILING_VERSION)
            )
            for v in versions
        }
        if times is not None:
            times["images"] = time.monotonic() - started
        tmp = Path(tempfile.mkdtemp(prefix=prefix))
        try:
            yield World(key, images, tmp)
        finally:
            shutil.rmtree(tmp)


# ---- a machine --------------------------------------------------------------------------------

# Events a person watching the demo can do without.
BOOKKEEPING = frozenset(
    {"state_changed", "dbus_service_started", "dbus_service_stopped", "agent_stopped",
     "reported_steady", "health_checks_finished"}
)  # fmt: skip
_EVENT_RE = re.compile(r"^(?P<unit>\S+) (?P<event>[a-z_]+)(?: (?P<rest>.*))?$")


@dataclass(frozen=True)
class Event:
    unit: str  # updater, updater-mark-good
    name: str  # the journal's EVENT
    text: str  # the rest of its MESSAGE (key=value ...)

    def field(self, key: str) -> str | None:
        m = re.search(rf"(?:^| ){re.escape(key)}=(\"(?:[^\"\\]|\\.)*\"|\S*)", self.text)
        if m is None:
            return None
        value = m.group(1)
        return json.loads(value) if value.startswith('"') else value


@dataclass(frozen=True)
class Boot:
    """One power-on, as the guest's console told it."""

    number: int
    log: osimage.BootLog
    facts: dict[str, str]  # BOOT lines
    events: list[Event]
    report: dict[str, str]  # REPORT lines (a boot that settled)
    staged: dict[str, str]  # STAGED lines (the pre-reboot hook)

    @property
    def slot(self) -> str:
        return self.facts.get("slot", "?")

    @property
    def version(self) -> str:
        return self.facts.get("version", "?")

    @property
    def ended(self) -> str:
        """How the boot ended: power cut, timeout, reboot, poweroff or crash."""
        if self.log.power_cut:
            return "power cut"
        if self.log.timed_out:
            return "timeout"
        text = self.log.text()
        if "reboot: Restarting system" in text:
            return "reboot"
        if "reboot: Power down" in text:
            return "poweroff"
        return "unknown"

    def event_names(self) -> list[str]:
        return [e.name for e in self.events]

    def first(self, name: str) -> Event | None:
        return next((e for e in self.events if e.name == name), None)

    def status(self) -> dict[str, object]:
        doc: dict[str, object] = json.loads(self.report.get("status", "{}") or "{}")
        return doc

    def staged_status(self) -> dict[str, object]:
        doc: dict[str, object] = json.loads(self.staged.get("status", "{}") or "{}")
        return doc

    def summary(self, *, brief: bool = False) -> str:
        """The boot in a few lines; ``brief``: without the agent's bookkeeping events."""
        lines = [
            f"boot {self.number}: {self.slot} version {self.version}, kernel "
            f"{self.facts.get('kernel', '?')} (initrd of {self.facts.get('initrd-version', '?')})"
            f", {self.log.seconds:.0f}s, ended by {self.ended}"
        ]
        lines += [
            f"  {e.unit}: {e.name} {e.text}".rstrip()[:200]
            for e in self.events
            if not (brief and e.name in BOOKKEEPING)
        ]
        return "\n".join(lines)


def parse_boot(number: int, log: osimage.BootLog) -> Boot:
    events = []
    for line in log.lines("EVENT"):
        m = _EVENT_RE.match(line)
        if m:
            events.append(Event(m["unit"], m["event"], m["rest"] or ""))
    return Boot(number, log, log.reports("BOOT"), events, log.reports(), log.reports("STAGED"))


@dataclass
class Machine:
    """One VM: its disk, firmware variables and machine id, kept across boots."""

    workdir: Path
    disk: Path
    vars_file: Path
    uuid: UUID
    repo_url: str
    cpus: int = GUEST_CPUS
    boots: list[Boot] = field(default_factory=list)
    extra_config: str = ""  # more of the credential's TOML (agent_config)
    forwards: tuple[tuple[int, int], ...] = ()  # (host port, guest port): QEMU's hostfwd
    report: bool = True  # the report unit runs: the guest powers off once settled
    poll_interval_s: int = 600

    @classmethod
    def create(cls, workdir: Path, image: osimage.OsImage, repo_url: str) -> Machine:
        workdir.mkdir(parents=True, exist_ok=True)
        disk = workdir / "disk.img"
        disk.unlink(missing_ok=True)
        osimage.copy_sparse(image.disk, disk)  # a boot writes to it; the cache stays clean
        vars_file = workdir / "OVMF_VARS.fd"
        vars_file.unlink(missing_ok=True)
        machine = cls(workdir, disk, vars_file, uuid_mod.uuid4(), repo_url)
        (workdir / "machine.json").write_text(
            json.dumps({"disk": str(disk), "vars": str(vars_file), "uuid": str(machine.uuid)})
        )
        return machine

    def credentials(self) -> dict[str, bytes]:
        creds = {
            osimage.CREDENTIAL: agent_config(
                self.repo_url, self.extra_config, poll_interval_s=self.poll_interval_s
            )
        }
        if self.report:
            creds[REPORT_CREDENTIAL] = b"1"
        return creds

    def boot(
        self, *, timeout_s: float = BOOT_TIMEOUT_S, watch: osimage.Watcher | None = None
    ) -> Boot:
        number = len(self.boots) + 1
        log = osimage.boot(
            self.disk,
            uuid=self.uuid,
            vars_file=self.vars_file,
            timeout_s=timeout_s,
            credentials=self.credentials(),
            watch=watch,
            serial_log=self.workdir / f"console-{number}.log",
            cpus=self.cpus,
            forwards=self.forwards,
        )
        booted = parse_boot(number, log)
        self.boots.append(booted)
        return booted


def cut_power_after(event: str, delay_s: float) -> osimage.Watcher:
    """A watcher that pulls the plug ``delay_s`` after the console shows ``event``."""
    seen: list[float] = []

    def watch(line: str) -> bool:
        if not seen and line.startswith("EVENT ") and f" {event}" in line:
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] >= delay_s

    return watch


# ---- make demo-os, make boot-os ---------------------------------------------------------------

DEMO_DIR = Path("build/os-demo")


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def live_summary(line: str) -> bool:
    """Print what matters of a console line as it comes (for a person watching)."""
    m = _EVENT_RE.match(line.removeprefix("EVENT ")) if line.startswith("EVENT ") else None
    if m is not None and m["event"] in BOOKKEEPING:
        return False
    for prefix in ("BOOT ", "EVENT ", "STAGED reboot-required", "REPORT settled"):
        if line.startswith(prefix) and "cmdline=" not in line and "kernel-build" not in line:
            print(f"   {line[:160]}", flush=True)
    return False


def run_demo(workdir: Path) -> int:
    t0 = time.monotonic()
    with cached_signing_key() as key:
        keyring = key.public_key.read_bytes()
        say("The OS image 1.0.0 and its next release 1.1.0 (built once, then cached)")
        images = {}
        for version in ("1.0.0", "1.1.0"):
            images[version] = osimage.build_image(test_settings(version, keyring=keyring))
            img = images[version]
            print(f"   {version}: {img.disk} ({'cached' if img.cached else 'built'} in "
                  f"{img.build_seconds:.0f}s, kernel {img.kernel_release})")  # fmt: skip
        repo = workdir / "repo"
        if repo.exists():
            shutil.rmtree(repo)
        repo.mkdir(parents=True)
        with RepoServer(repo) as server:
            port = server.url.rsplit(":", 1)[1]
            url = f"http://{GUEST_HOST}:{port}"
            machine = Machine.create(workdir, images["1.0.0"], url)
            say(f"A machine (id {machine.uuid.hex}) boots 1.0.0 from ROOT-A; the vendor "
                f"publishes 1.1.0 at {server.url}, which the guest reaches as {url}")  # fmt: skip
            publish(repo, images["1.1.0"], key)
            for n in (1, 2):
                say(f"Boot {n}")
                boot = machine.boot(watch=live_summary)
                print(f"   ended by {boot.ended} after {boot.log.seconds:.0f}s")
    say("Summary")
    for b in machine.boots:
        print(b.summary(brief=True))
    last = machine.boots[-1]
    ok = (
        [b.slot for b in machine.boots] == ["ROOT-A", "ROOT-B"]
        and last.version == "1.1.0"
        and "marked_good" in last.event_names()
    )
    print(
        f"\n{'Updated itself' if ok else 'DID NOT update itself as expected'} in "
        f"{time.monotonic() - t0:.0f}s.\nThe machine's disk: {machine.disk} "
        f"(consoles: {workdir}/console-*.log); boot it again with `make boot-os`."
    )
    return 0 if ok else 1


def run_boot(workdir: Path) -> int:
    meta_file = workdir / "machine.json"
    if not meta_file.is_file():
        print(f"no machine in {workdir}: run `make demo-os` first", file=sys.stderr)
        return 1
    meta = json.loads(meta_file.read_text())
    repo = workdir / "repo"
    repo.mkdir(exist_ok=True)
    with RepoServer(repo) as server:
        port = server.url.rsplit(":", 1)[1]
        print(
            f"Booting {meta['disk']} (serial console here; log in as root needs a password "
            "the image has none of: look around from the report lines, or Ctrl-A X to quit).\n"
            f"Its repository {repo} is served at {server.url} (10.0.2.2:{port} in the guest).",
            flush=True,
        )
        return osimage.boot_interactive(
            Path(meta["disk"]),
            uuid=UUID(meta["uuid"]),
            vars_file=Path(meta["vars"]),
            credentials={osimage.CREDENTIAL: agent_config(f"http://{GUEST_HOST}:{port}")},
        )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devtools.osupdate", description=__doc__)
    p.add_argument("command", choices=["demo", "boot"])
    p.add_argument("--workdir", type=Path, default=DEMO_DIR)
    args = p.parse_args(argv)
    commands: dict[str, Callable[[Path], int]] = {"demo": run_demo, "boot": run_boot}
    return commands[args.command](args.workdir.resolve())


if __name__ == "__main__":
    sys.exit(main())
