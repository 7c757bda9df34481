"""Write an output directory atomically, surviving signals: for `hatrt export` (and quantize/build).

    with atomic_output_dir(out_dir, overwrite=force, report=progress) as tmp:
        ...write files under tmp, start helpers with spawn_worker(...)...
    # out_dir now holds exactly what was written under tmp

- The files are written into a hidden sibling `.NAME.partial-PID-START-WHERE-RANDOM` (same file
  system, so the final rename is atomic) created with the usual permissions (0o777 & ~umask; never
  0700). Nothing else is put in it: what the block writes is exactly what out_dir holds.
- Normal exit: the partial directory is renamed to out_dir; an existing out_dir is replaced only
  with overwrite=True (renamed aside, the new one renamed in, the old one removed).
- An exception, Ctrl-C, SIGTERM or SIGHUP (what docker, Kubernetes and Slurm send) kills the
  workers started with `spawn_worker` and removes the partial directory. While the block runs,
  SIGTERM and SIGHUP raise `Terminated` (a SystemExit with code 128 + signum: 143 for SIGTERM,
  129 for SIGHUP), so an uncaught one exits the process with that code after cleanup. Handlers
  are installed only in the main thread and only over the default action (a signal that is
  ignored, e.g. SIGHUP under nohup, or that has a handler of its own is left alone); the previous
  handlers are restored on the way out. Signals arriving while the rename or the cleanup runs are
  held until it is done.
- SIGKILL cannot be caught: the partial directory stays. Its name records the owner: PID, the
  process's start time (/proc/PID/stat, so a reused PID is told apart) and WHERE, a hash of the
  host name and PID namespace. The next atomic_output_dir for the same out_dir removes partials
  whose owner is dead (PID gone or reused) and reports those whose owner still runs or cannot be
  checked (another host, container or PID namespace).
- `spawn_worker` starts a child that the kernel kills (SIGKILL) when this process dies, even by
  SIGKILL (Linux: prctl PR_SET_PDEATHSIG; elsewhere only the context manager's cleanup applies).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["OutputDirError", "Terminated", "AtomicOutputDir", "atomic_output_dir", "spawn_worker",
           "clean_stale_partials"]
_CAUGHT = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)
_WORKER_WAIT_S = 10.0


class OutputDirError(ValueError):
    """The output directory cannot be written or put in place; the message names the path."""


class Terminated(SystemExit):
    """Raised by the SIGTERM/SIGHUP handlers of `atomic_output_dir`; exit code 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"terminated by {signal.Signals(self.signum).name}"


# ============================================================================ process identity
def _proc_start(pid: int) -> str | None:
    """Start time of `pid` in clock ticks since boot (/proc/PID/stat field 22); None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _pid_alive(pid: int) -> bool:
    """A running (not zombie) process with this PID exists in our PID namespace."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except OSError:
        return False
    return not _is_zombie(pid)


def _where() -> str:
    """8 hex digits naming this host and PID namespace: PIDs are only comparable within one."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return hashlib.sha1(f"{socket.gethostname()}\0{ns}".encode()).hexdigest()[:8]


def _tag() -> str:
    """PID-START-WHERE of this process, as put in partial directory names."""
    return f"{os.getpid()}-{_proc_start(os.getpid()) or 'x'}-{_where()}"


def _owner_state(pid: int, start: str, where: str) -> str:
    """"dead", "alive" or "unknown" (another host, container or PID namespace: cannot be checked)."""
    if where != _where():
        return "unknown"
    if not _pid_alive(pid):
        return "dead"
    if start != "x" and _proc_start(pid) not in (None, start):
        return "dead"  # the PID now belongs to another process
    return "alive"


# ============================================================================ stale partials
_TAIL = r"(\d+)-(\d+|x)-([0-9a-f]{8})-[0-9a-f]{8}"


def _partial_re(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.(partial|old)-{_TAIL}$")


def _legacy_re(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.partial-(?!{_TAIL}$).+$")  # tempfile.mkdtemp names


def clean_stale_partials(out_dir: str | os.PathLike, report: Callable[[str], None] | None = None) -> list[Path]:
    """Remove the leftovers of killed writers of `out_dir`; report the ones that may still be in use.

    `.NAME.partial-PID-*` whose owner is dead are removed. A `.NAME.old-PID-*` (the previous output,
    set aside while being replaced) whose owner is dead is put back when out_dir is missing, else
    removed. Partials of live owners, of owners that cannot be checked, and unnumbered ones from
    older hatrt versions (`.NAME.partial-XXXXXXXX`) are reported and left alone. Returns the
    paths removed or restored."""
    out_dir = Path(out_dir)
    say = report or log.warning
    parent, name = out_dir.parent, out_dir.name
    try:
        entries = sorted(parent.iterdir())
    except OSError:  # no parent yet, or unreadable: nothing we could clean
        return []
    ours, legacy = _partial_re(name), _legacy_re(name)
    done: list[Path] = []
    for entry in entries:
        m = ours.match(entry.name)
        if m is None:
            if legacy.match(entry.name) and entry.is_dir():
                say(f"{entry}: an unfinished output of an older hatrt (no owner recorded); remove it by hand "
                    "if no export to this directory is running")
            continue
        kind, pid = m[1], int(m[2])
        state = _owner_state(pid, m[3], m[4])
        if state == "alive":
            if pid != os.getpid():
                say(f"{entry}: another process (PID {pid}) is writing {out_dir} right now; if both finish, "
                    "the second replaces the first's output only with overwrite, else it fails")
            continue
        if state == "unknown":
            say(f"{entry}: left by PID {pid} of another machine, container or PID namespace (cannot tell "
                "whether it still runs); remove it by hand if it does not")
            continue
        try:
            if kind == "old" and not out_dir.exists() and not out_dir.is_symlink():
                os.rename(entry, out_dir)  # killed mid-swap: the previous output goes back in place
                say(f"{entry}: restored to {out_dir} (a replacement by PID {pid} was killed halfway)")
            else:
                shutil.rmtree(entry)
                say(f"{entry}: removed (left by PID {pid}, which was killed before it finished)")
            done.append(entry)
        except OSError as e:
            say(f"{entry}: left by dead PID {pid}, but cannot be removed ({e.strerror or e})")
    return done


# ============================================================================ signals
class _SignalGuard:
    """SIGTERM/SIGHUP -> Terminated while active (main thread only); holds signals in critical sections."""

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}
        self.deferring = False
        self.pending: int | None = None
        self._sigint: Any = None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.deferring:
            self.pending = self.pending or signum
            return
        raise Terminated(signum) if signum != signal.SIGINT else KeyboardInterrupt

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in _CAUGHT:
            if signal.getsignal(signum) == signal.SIG_DFL:
                self.previous[signum] = signal.signal(signum, self._handler)

    def hold(self) -> None:
        """Hold SIGTERM/SIGHUP (ours) and Ctrl-C (if default) until `release`: for the rename/cleanup."""
        self.deferring = True  # first: a signal arriving from here on is recorded, not raised
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._sigint = signal.signal(signal.SIGINT, self._handler)

    def release(self) -> None:
        if self._sigint is not None:
            signal.signal(signal.SIGINT, self._sigint)
            self._sigint = None
        self.deferring = False

    def restore(self) -> None:
        for signum, old in self.previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, old)
        self.previous.clear()

    def raise_pending(self) -> None:
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise Terminated(signum) if signum != signal.SIGINT else KeyboardInterrupt


# ============================================================================ workers
_PR_SET_PDEATHSIG = 1
_prctl: Any = None
_active: list["AtomicOutputDir"] = []
_active_lock = threading.Lock()


def _load_prctl() -> Any:
    global _prctl
    if _prctl is None and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fn = libc.prctl
            fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
            fn.restype = ctypes.c_int
            _prctl = fn
        except (OSError, AttributeError):
            _prctl = False
    return _prctl or None


def spawn_worker(args: Sequence[str] | str, *, owner: "AtomicOutputDir | None" = None,
                 **popen_kwargs: Any) -> subprocess.Popen:
    """subprocess.Popen(args, **popen_kwargs) for a child that dies with this process.

    On Linux the child asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG; set in
    preexec_fn before exec, and the child kills itself if the parent is already gone). Note the
    kernel ties this to the *thread* that started the child: start workers from the thread that
    outlives them (the main thread in hatrt). Elsewhere this is a plain Popen. The child stays in
    this process's session and process group (start_new_session=False), so a terminal's Ctrl-C
    reaches it too. The child is registered with `owner`, by default the innermost active
    atomic_output_dir of this process, which kills it on the way out if it still runs."""
    prctl = _load_prctl()
    user_preexec = popen_kwargs.pop("preexec_fn", None)
    popen_kwargs.setdefault("start_new_session", False)
    if prctl is not None:
        parent = os.getpid()

        def preexec() -> None:  # in the child, between fork and exec: keep it minimal
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the parent died before prctl took effect
                os.kill(os.getpid(), signal.SIGKILL)
            if user_preexec is not None:
                user_preexec()

        popen_kwargs["preexec_fn"] = preexec
    elif user_preexec is not None:
        popen_kwargs["preexec_fn"] = user_preexec
    proc = subprocess.Popen(args, **popen_kwargs)
    if owner is None:
        with _active_lock:
            owner = _active[-1] if _active else None
    if owner is not None:
        owner.register(proc)
    return proc


def _kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            proc.wait(timeout=_WORKER_WAIT_S)


# ============================================================================ the context manager
def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"output path {out_dir} exists and is not a directory")
    if out_dir.is_dir() and not overwrite:
        try:
            nonempty = any(out_dir.iterdir())
        except OSError as e:
            raise OutputDirError(f"cannot read the output directory {out_dir}: {e.strerror or e}") from None
        if nonempty:
            raise OutputDirError(f"output directory {out_dir} is not empty (pass overwrite=True / --force to "
                                 "replace it)")


class AtomicOutputDir:
    """See the module docstring; made by `atomic_output_dir`. `path` is the partial directory."""

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool = False, *,
                 report: Callable[[str], None] | None = None, mode: int | None = None):
        out_dir = Path(out_dir)
        if out_dir.is_symlink():  # write next to what the link points at; the link stays valid
            out_dir = Path(os.path.realpath(out_dir))
        self.out_dir, self.overwrite, self.report, self.mode = out_dir, overwrite, report, mode
        self.path: Path | None = None
        self.workers: list[subprocess.Popen] = []
        self._guard = _SignalGuard()

    def register(self, proc: subprocess.Popen) -> subprocess.Popen:
        """Kill `proc` on the way out of the block if it still runs."""
        self.workers.append(proc)
        return proc

    # -- enter --------------------------------------------------------------------------------
    def __enter__(self) -> Path:
        _check_target(self.out_dir, self.overwrite)
        self._guard.install()  # before anything exists on disk: a signal from here on cleans up
        try:
            try:
                self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OutputDirError(f"cannot create {self.out_dir.parent} for the output directory "
                                     f"{self.out_dir}: {e.strerror or e}") from None
            clean_stale_partials(self.out_dir, self.report)
            self.path = self._make_partial()
            with _active_lock:
                _active.append(self)
        except BaseException:
            self._guard.hold()
            try:
                self._cleanup()
            finally:
                self._guard.restore()
                self._guard.release()
            raise
        return self.path

    def _make_partial(self) -> Path:
        for _ in range(100):
            path = self.out_dir.parent / f".{self.out_dir.name}.partial-{_tag()}-{secrets.token_hex(4)}"
            try:
                os.mkdir(path, 0o777)  # the kernel applies the umask (mkdtemp would give 0700)
            except FileExistsError:
                continue
            except OSError as e:
                raise OutputDirError(f"cannot write the output directory {self.out_dir}: {e.strerror or e}") from None
            self.path = path
            if self.mode is not None:
                os.chmod(path, self.mode)
            return path
        raise OutputDirError(f"cannot create a temporary directory next to {self.out_dir}")

    # -- exit ---------------------------------------------------------------------------------
    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        self._guard.hold()
        try:
            if exc_type is None:
                running = [p for p in self.workers if p.poll() is None]
                if running:
                    log.warning("killing %d worker process(es) still running at the end of the output "
                                "block for %s", len(running), self.out_dir)
                try:
                    _kill(self.workers)
                    self._finalize()
                except BaseException:
                    self._cleanup()
                    raise
            else:
                self._cleanup()
        finally:
            with _active_lock:
                if self in _active:
                    _active.remove(self)
            self._guard.restore()  # first: a signal from here on takes its usual course
            self._guard.release()
        if exc_type is None:
            self._guard.raise_pending()  # a signal held during the rename: honour it now
        return False

    def _cleanup(self) -> None:
        _kill(self.workers)
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None

    def _finalize(self) -> None:
        assert self.path is not None
        tmp, out = self.path, self.out_dir
        _check_target(out, self.overwrite)  # again: someone may have written there meanwhile
        try:
            if out.is_dir() and any(out.iterdir()):
                old = out.parent / f".{out.name}.old-{_tag()}-{secrets.token_hex(4)}"
                os.rename(out, old)
                try:
                    os.rename(tmp, out)
                except OSError:
                    os.rename(old, out)
                    raise
                self.path = None
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)  # replaces an empty directory
                self.path = None
        except OSError as e:
            raise OutputDirError(f"cannot put the output directory {out} in place: {e.strerror or e}") from None


def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False, *,
                      report: Callable[[str], None] | None = None, mode: int | None = None) -> AtomicOutputDir:
    """`with atomic_output_dir(out_dir, overwrite=...) as tmp:` write under tmp; see the module docstring.

    report: called with a message for each stale partial directory removed or left alone (default:
    logging.warning). mode: chmod the directory to this (default: 0o777 & ~umask). Raises
    OutputDirError (naming the path) when out_dir is a file, is not empty without overwrite, or
    cannot be written or renamed."""
    return AtomicOutputDir(out_dir, overwrite, report=report, mode=mode)
