"""A throw-away systemd 252 booted with ``systemd-nspawn``, for tests that need a real PID 1.

The root directory is a copy of the host's ``/etc`` (services we do not want masked), empty
``/var``, ``/tmp`` and ``/root``, and the host's ``/usr`` bound read-only; the project (with its
``.venv``) is bound at the same path so that the venv's absolute paths work inside. With
``--private-network`` the container has only its own loopback, so whatever the unit under
test talks to runs inside as well.

Never boot ``/lib/systemd/systemd`` outside such a container: in the host's own namespaces
its tmpfiles set-up empties the host's ``/tmp`` and it starts every installed service.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Services installed on this machine type that must not start in the container (test
#: peers other suites start themselves, and consoles). Everything the host enabled in
#: /etc/systemd/system/*.wants is masked as well.
MASKED = ("postgresql.service", "postgresql@.service", "prometheus.service",
          "prometheus-node-exporter.service", "tinyproxy.service", "danted.service",
          "microsocks.service", "ssh.service", "cron.service", "getty@.service",
          "console-getty.service", "serial-getty@.service", "e2scrub_reap.service",
          "systemd-timesyncd.service", "apt-daily.timer", "apt-daily-upgrade.timer",
          "man-db.timer", "fstrim.timer", "logrotate.timer", "e2scrub_all.timer",
          "dpkg-db-backup.timer")
#: Environment of every command run inside: nothing inherited from the test runner.
INNER_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin", "LC_ALL": "C.UTF-8",
             "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "SYSTEMD_LOG_COLOR": "0"}
BOOT_TIMEOUT = 60.0
HOME_DIRS = (Path("/home"), Path("/root"), Path("/run/user"))


class ContainerUnavailable(Exception):
    """systemd cannot be booted in a container here; the message says why (a skip reason)."""


def unavailable_reason() -> str | None:
    """Why a container cannot even be attempted on this machine, or None."""
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    if shutil.which("systemd-nspawn") is None:
        return ("systemd-nspawn is not installed (Debian package systemd-container; "
                "scripts/install-system-deps.sh installs it)")
    if shutil.which("nsenter") is None:
        return "nsenter is not installed (Debian package util-linux)"
    if not Path("/lib/systemd/systemd").exists():
        return "no /lib/systemd/systemd to boot (Debian package systemd)"
    return None


def is_under(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


@dataclass
class Container:
    """A booted container: ``root`` is its root directory as seen from the host."""

    root: Path
    init_pid: int
    nspawn: subprocess.Popen[bytes]
    console: Path

    def path(self, inner: str) -> Path:
        """The host path of an absolute path inside the container's root directory."""
        return self.root / inner.lstrip("/")

    def run(self, *argv: str, input: str | None = None, check: bool = True,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a command inside every namespace of the container, as its root."""
        proc = subprocess.run(
            ["nsenter", "-t", str(self.init_pid), "-m", "-u", "-i", "-n", "-p", "--", *argv],
            input=input, capture_output=True, text=True, timeout=timeout, env=INNER_ENV,
            stdin=None if input is not None else subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}{proc.stderr}")
        return proc

    def systemctl(self, *args: str, check: bool = True,
                  timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, "--property=" + ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, *match: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, *match).stdout


def _children(pid: int) -> list[tuple[int, str]]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid:
            found.append((int(entry.name), comm))
    return found


def _wait(predicate: Callable[[], bool], timeout: float, what: str,
          nspawn: subprocess.Popen[bytes], console: Path) -> None:
    """Wait for the boot to reach a point; a dead nspawn or a timeout is a reason to skip."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if nspawn.poll() is not None:
            raise ContainerUnavailable(f"systemd-nspawn exited {nspawn.returncode} before "
                                       f"{what}: {_tail(console)}")
        if time.monotonic() > deadline:
            raise ContainerUnavailable(f"no {what} within {timeout:.0f}s: {_tail(console)}")
        time.sleep(0.05)


def _tail(console: Path, lines: int = 8) -> str:
    try:
        return " | ".join(console.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no console output)"


def _make_root(root: Path, masked: Sequence[str]) -> None:
    root.mkdir(mode=0o755)
    for d in ("usr", "var", "tmp", "root", "home", "opt", "srv", "mnt"):
        (root / d).mkdir()
    (root / "tmp").chmod(0o1777)
    subprocess.run(["cp", "-a", "/etc", str(root / "etc")], check=True)
    os_release = root / "etc" / "os-release"  # a symlink to /usr/lib: nspawn wants a file
    os_release.unlink(missing_ok=True)
    shutil.copy("/usr/lib/os-release", os_release)
    for d in ("bin", "lib", "lib64", "sbin"):
        if Path("/" + d).is_symlink():
            (root / d).symlink_to(f"usr/{d}")
    units = root / "etc" / "systemd" / "system"
    enabled = {link.name for wants in units.glob("*.wants") for link in wants.iterdir()}
    for name in sorted(enabled | set(masked)):
        path = units / name
        if path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to("/dev/null")


@contextlib.contextmanager
def booted(binds_ro: Sequence[tuple[Path, str]],
           masked: Sequence[str] = MASKED) -> Iterator[Container]:
    """Boot a container, yield it, power it off and delete its root directory.

    ``binds_ro``: (host path, path inside) pairs, bound read-only besides ``/usr``.
    Raises :class:`ContainerUnavailable` (a reason to skip) when it cannot boot here."""
    reason = unavailable_reason()
    if reason is not None:
        raise ContainerUnavailable(reason)
    base = Path(tempfile.mkdtemp(prefix="tgd-nspawn-"))
    root = base / "root"
    console = base / "console.log"
    nspawn: subprocess.Popen[bytes] | None = None
    init_pid = 0
    try:
        _make_root(root, masked)
        binds = ["--bind-ro=/usr", *(f"--bind-ro={host}:{inner}" for host, inner in binds_ro)]
        binds += [f"--bind-ro=/{d}" for d in ("bin", "lib", "lib64", "sbin")
                  if Path("/" + d).is_dir() and not Path("/" + d).is_symlink()]
        with console.open("wb") as out:
            nspawn = subprocess.Popen(
                ["systemd-nspawn", "--quiet", "-D", str(root),
                 f"--machine=tgd-{secrets.token_hex(4)}", "--private-network",
                 "--register=no", *_scope_options(), *binds, "--boot"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={"PATH": INNER_ENV["PATH"], "LC_ALL": "C.UTF-8"})
        started = nspawn

        def init_found() -> bool:
            nonlocal init_pid
            init_pid = next((pid for pid, comm in _children(started.pid)
                             if comm == "systemd"), 0)
            return init_pid != 0

        _wait(init_found, BOOT_TIMEOUT, "container init", nspawn, console)
        container = Container(root, init_pid, nspawn, console)

        def booted_up() -> bool:
            # Fails until the container's manager listens; then waits for the boot to end.
            proc = container.run("systemctl", "is-system-running", "--wait", check=False,
                                 timeout=BOOT_TIMEOUT)
            return proc.stdout.strip() in ("running", "degraded")

        _wait(booted_up, BOOT_TIMEOUT, "finished boot", nspawn, console)
        yield container
    finally:
        _power_off(nspawn, init_pid)
        _remove(base)


def _scope_options() -> list[str]:
    """Without systemd as the host's PID 1 (this machine type) there is no manager to create
    a scope for the container: ``--keep-unit`` keeps it in the caller's cgroup. Under a
    systemd host nspawn asks it for a transient scope instead (``--keep-unit`` is refused
    from a login session there). Only the first case is exercised on this machine type."""
    return [] if Path("/run/systemd/system").is_dir() else ["--keep-unit"]


def _power_off(nspawn: subprocess.Popen[bytes] | None, init_pid: int) -> None:
    """SIGRTMIN+4 to the container's init (poweroff); SIGKILL as a last resort. Killing
    systemd-nspawn alone would leave the container running, orphaned."""
    if nspawn is None:
        return
    steps = [(init_pid, signal.SIGRTMIN + 4, 30.0), (init_pid, signal.SIGKILL, 10.0),
             (nspawn.pid, signal.SIGKILL, 10.0)]
    for pid, sig, timeout in steps:
        if nspawn.poll() is not None:
            break
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            nspawn.wait(timeout)
    nspawn.wait()


def _remove(base: Path) -> None:
    """Delete the root directory, but never through a mount point still under it."""
    mounted = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
               if is_under(Path(line.split()[4]), base)]
    if mounted:
        raise AssertionError(f"not deleting {base}: still mounted: {mounted}")
    shutil.rmtree(base)
