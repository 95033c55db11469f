"""Boot a Debian kernel under qemu (software emulation) with the host root, run one scenario.

virtme-ng (``vng``) exports the host's / read-only over 9p, with in-memory overlays on
/etc, /tmp, /var..., so a scenario can make loop devices, VGs and pools in guest memory
without touching the host. Everything the tier needs is installed by
``bash scripts/vm-setup.sh``; without it the tests are skipped, never failed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

VM_DIR = Path(os.environ.get("QUIESCE_VM_DIR", "/opt/quiesce-vm"))
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SETUP_HINT = "run `bash scripts/vm-setup.sh` as root to install the VM test tier"


def _newest(pattern: str) -> Path | None:
    found = sorted(glob.glob(pattern), key=_version_key)
    return Path(found[-1]) if found else None


def _version_key(path: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", os.path.basename(path))]


def kernel_image(series: str) -> Path | None:
    """The vmlinuz of Debian's ``series`` kernel ("6.1" installed, "6.12" extracted)."""
    pattern = {
        "6.1": "/boot/vmlinuz-6.1.*",
        "6.12": str(VM_DIR / "kernel-6.12/boot/vmlinuz-6.12.*"),
    }[series]
    return _newest(pattern)


def kernel_release(image: Path) -> str:
    return image.name.removeprefix("vmlinuz-")


def module_dir(image: Path) -> Path:
    """Where the modules of ``image`` live: /lib/modules, or beside the extracted kernel."""
    rel = kernel_release(image)
    if image.parent == Path("/boot"):
        return Path("/lib/modules") / rel
    return image.parent.parent / "lib/modules" / rel


def vng_binary() -> Path | None:
    for cand in (VM_DIR / "venv/bin/vng", *(Path(p) / "vng" for p in os.get_exec_path())):
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def missing(series: str, modules: tuple[str, ...] = (), tools: tuple[str, ...] = ()) -> str | None:
    """Why the VM tier cannot run for ``series`` here (None: it can)."""
    if os.geteuid() != 0:
        return "the VM tier needs root"
    if vng_binary() is None:
        return f"virtme-ng (vng) is not installed; {SETUP_HINT}"
    if not any(Path(d, "qemu-system-x86_64").exists() for d in os.get_exec_path()):
        return f"qemu-system-x86_64 is not installed; {SETUP_HINT}"
    image = kernel_image(series)
    if image is None:
        return f"Debian's {series} kernel is not available; {SETUP_HINT}"
    for mod in modules:
        if not any(module_dir(image).rglob(f"{mod}.ko*")):
            return f"kernel module {mod} for {kernel_release(image)} is missing; {SETUP_HINT}"
    for tool in tools:
        if not any(Path(d, tool).exists() for d in (*os.get_exec_path(), "/sbin", "/usr/sbin")):
            return f"{tool} is not installed; {SETUP_HINT}"
    return None


def guest_python() -> str:
    """The interpreter the guest runs: Debian's /usr/bin/python3 (>= 3.11, with quiesce's
    dependencies) starts in ~3 s under emulation; a pyenv/venv one with many site-packages
    takes ~15 s over 9p, so it is the fallback."""
    system = "/usr/bin/python3"
    if os.path.exists(system):
        p = subprocess.run(
            [system, "-c", "import sys, pydantic; print(sys.version_info >= (3, 11))"],
            capture_output=True,
            text=True,
        )
        if p.stdout.strip() == "True":
            return system
    return os.path.realpath(sys.executable)


@dataclass
class VmResult:
    """One scenario's outcome: its exit code and its share of the VM's output."""

    script: str
    returncode: int
    output: str
    kernel: str
    boot_seconds: float  # wall time of the whole VM run this scenario was part of
    results: dict[str, str] = field(default_factory=dict)  # RESULT key=value lines

    def explain(self) -> str:
        return f"{self.script}: exit {self.returncode} on {self.kernel}:\n{self.output[-12000:]}"


_BEGIN = "=== quiesce-vm scenario {} begin"
_END = re.compile(r"^=== quiesce-vm scenario (\S+) exit (\d+)$", re.MULTILINE)


def run_scenarios(
    series: str, scripts: list[str], *, timeout: float = 600, memory: str = "2G"
) -> dict[str, VmResult]:
    """Boot Debian's ``series`` kernel once and run each ``tests/vm/<script>`` in turn,
    as root, in a fresh interpreter with ``-B`` and the repo's ``src`` on PYTHONPATH
    (the host root is the guest root, so it imports this working tree).

    A scenario that did not report (the VM died or timed out) gets returncode -1.
    """
    image = kernel_image(series)
    vng = vng_binary()
    assert image is not None and vng is not None, missing(series)
    env_prefix = (
        f"env PYTHONPATH={shlex.quote(str(REPO / 'src'))} PYTHONDONTWRITEBYTECODE=1 "
        f"{shlex.quote(guest_python())} -B -s"
    )
    steps = []
    for script in scripts:
        steps.append(
            f"echo {shlex.quote(_BEGIN.format(script))}; "
            f"{env_prefix} {shlex.quote(str(HERE / script))} 2>&1; "
            f'echo "=== quiesce-vm scenario {script} exit $?"'
        )
    argv = [
        str(vng),
        "--force-9p",
        "--disable-kvm",
        "--memory",
        memory,
        # vng passes -cpu max; under TCG that emulates AVX-512 & co. and boots ~2x slower
        # than the baseline qemu64 model (measured: 23 s vs 13 s guest uptime to exec).
        "--qemu-opts=-cpu qemu64",
        "--cwd",
        "/",
        "--run",
        str(image),
        "--exec",
        "; ".join(steps),
    ]
    env = dict(os.environ)
    env["PATH"] = f"{vng.parent}:{env.get('PATH', '/usr/bin:/bin')}"
    t0 = time.monotonic()
    # Output through a pipe: vng garbles a redirect to a file (test-infra.md). Its own
    # session, so that a timeout or the end of the test session ends vng and its qemu.
    p = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env=env,
        cwd="/",
        start_new_session=True,
    )
    with _lock:
        _live.add(p)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(p)
        out, _ = p.communicate()
        out += f"\n=== VM timed out after {timeout:g}s"
    finally:
        with _lock:
            _live.discard(p)
    seconds = time.monotonic() - t0
    codes = {m.group(1): int(m.group(2)) for m in _END.finditer(out)}
    results = {}
    for script in scripts:
        begin = out.find(_BEGIN.format(script))
        end = out.find(f"=== quiesce-vm scenario {script} exit")
        part = out[begin:end] if begin >= 0 and end >= 0 else out
        kv = dict(m.groups() for m in re.finditer(r"^RESULT (\S+)=(.*?)\s*$", part, re.MULTILINE))
        results[script] = VmResult(script, codes.get(script, -1), part, image.name, seconds, kv)
    return results


_live: set[subprocess.Popen[str]] = set()
_lock = threading.Lock()


def _kill(p: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)  # vng and the qemu it started: a throwaway guest


def stop_all() -> None:
    """End every VM run still going (the test session ends or was interrupted)."""
    with _lock:
        live = list(_live)
    for p in live:
        _kill(p)
        p.wait()


class Background:
    """VM runs started when the session begins, one after another, so that the slow tier
    runs beside the rest of the suite (which passes on a busy machine: scripts/
    test-under-load.sh) instead of after it; a test waits for its series' run."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vm-tier")
        self._runs: dict[str, concurrent.futures.Future[dict[str, VmResult]]] = {}

    def start(self, series: str, scripts: list[str]) -> None:
        if series not in self._runs and scripts:
            self._runs[series] = self._pool.submit(run_scenarios, series, scripts)

    def result(self, series: str) -> dict[str, VmResult] | None:
        run = self._runs.get(series)
        return None if run is None else run.result()

    def shutdown(self) -> None:
        for run in self._runs.values():
            run.cancel()
        stop_all()
        self._pool.shutdown(wait=True)


background = Background()
