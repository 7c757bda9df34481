"""Faults around writing outputs: signals, killed runs, stale partial directories, permissions.

exporter/atomic.py is exercised through real processes (python -c ...) that are sent SIGTERM,
SIGHUP, SIGINT and SIGKILL while inside `atomic_output_dir` with a worker from `spawn_worker`.
The child scripts load atomic.py by path (no torch import), so each takes well under a second.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from exporter.atomic import (
    AtomicOutputDir, OutputDirError, Terminated, _proc_start, _where, atomic_output_dir, clean_stale_partials,
    spawn_worker,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="signals, /proc and PR_SET_PDEATHSIG: Linux")

ATOMIC = Path(__file__).resolve().parents[1] / "exporter" / "atomic.py"

# argv: out_dir, info file, "torch" to import torch first (threads in the parent, as in an export)
CHILD = f"""
import importlib.util, json, signal, sys, time
from pathlib import Path
# a shell that starts the suite in the background makes children ignore SIGINT: restore Python's
signal.signal(signal.SIGINT, signal.default_int_handler)
if len(sys.argv) > 3 and sys.argv[3] == "torch":
    import torch
    torch.set_num_threads(2)
    torch.ones(256, 256) @ torch.ones(256, 256)
spec = importlib.util.spec_from_file_location("hatrt_atomic", {str(ATOMIC)!r})
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
with atomic.atomic_output_dir(sys.argv[1]) as tmp:
    (tmp / "prefill.onnx").write_text("partial")
    w = atomic.spawn_worker([sys.executable, "-c", "import time; time.sleep(60)"])
    Path(sys.argv[2] + ".tmp").write_text(json.dumps({{"worker": w.pid, "tmp": str(tmp)}}))
    Path(sys.argv[2] + ".tmp").rename(sys.argv[2])
    time.sleep(60)
"""


def alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie may linger where PID 1 does not reap)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(cond, timeout=10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def start_child(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path, dict]:
    out, info = tmp_path / "export", tmp_path / "info.json"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(out), str(info), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait_until(info.exists, timeout=60 if extra else 10):
        proc.kill()
        raise AssertionError(f"child never got ready: {proc.communicate()}")
    return proc, out, json.loads(info.read_text())


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------- signals, real processes
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)], ids=["TERM", "HUP"])
def test_signal_kills_worker_and_removes_partial(tmp_path, signum, code):
    proc, out, info = start_child(tmp_path)
    assert alive(info["worker"]) and Path(info["tmp"]).is_dir()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert not alive(info["worker"])
    assert not partials(out) and not out.exists()


def test_sigterm_with_torch_threads_in_the_parent(tmp_path):
    """preexec_fn runs between fork and exec; a multi-threaded parent (torch) must not hang it."""
    pytest.importorskip("torch")
    proc, out, info = start_child(tmp_path, "torch")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=15)
    assert proc.returncode == 143
    assert not alive(info["worker"]) and not partials(out)


def test_sigint_cleans_up(tmp_path):
    proc, out, info = start_child(tmp_path)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=15)
    assert proc.returncode in (-signal.SIGINT, 130, 1)  # KeyboardInterrupt: Python's usual exit
    assert not alive(info["worker"]) and not partials(out)


def test_sigkill_orphans_nothing_and_the_next_run_removes_the_partial(tmp_path):
    proc, out, info = start_child(tmp_path)
    proc.kill()
    proc.communicate(timeout=15)
    assert wait_until(lambda: not alive(info["worker"]), timeout=5), "worker outlived its SIGKILLed parent"
    left = partials(out)
    assert [p.name for p in left] == [Path(info["tmp"]).name]
    assert left[0].name.startswith(f".export.partial-{proc.pid}-")  # the owner is in the name ...
    assert sorted(p.name for p in left[0].iterdir()) == ["prefill.onnx"]  # ... not in the directory
    msgs: list[str] = []
    with atomic_output_dir(out, report=msgs.append) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert not partials(out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    assert len(msgs) == 1 and f"removed (left by PID {proc.pid}" in msgs[0]


# ----------------------------------------------------------------------------- signals, in process
def test_sigterm_in_process_raises_terminated_and_restores_handlers(tmp_path):
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as e:
        with atomic_output_dir(out) as tmp:
            (tmp / "a").write_text("x")
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, before)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted by the handler
    assert e.value.code == 143 and e.value.signum == signal.SIGTERM and "SIGTERM" in str(e.value)
    assert isinstance(e.value, SystemExit)
    assert not partials(out) and not out.exists()
    assert signal.getsignal(signal.SIGTERM) == before


def test_ignored_sighup_stays_ignored(tmp_path):
    """Under nohup SIGHUP is ignored: atomic_output_dir must not turn it into an exit."""
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.05)
            (tmp / "a").write_text("x")
        assert (tmp_path / "out" / "a").read_text() == "x"
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old)


def test_signal_during_the_rename_is_held_until_the_output_is_in_place(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = AtomicOutputDir._finalize

    def finalize(self):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-rename: must not interrupt it
        time.sleep(0.05)
        real(self)

    monkeypatch.setattr(AtomicOutputDir, "_finalize", finalize)
    with pytest.raises(Terminated):
        with atomic_output_dir(out) as tmp:
            (tmp / "a").write_text("x")
    assert (out / "a").read_text() == "x" and not partials(out)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_works_outside_the_main_thread(tmp_path):
    errors: list[BaseException] = []

    def run():
        try:
            with atomic_output_dir(tmp_path / "out") as tmp:
                (tmp / "a").write_text("x")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert not errors and (tmp_path / "out" / "a").read_text() == "x"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# ----------------------------------------------------------------------------- workers
def test_workers_still_running_at_the_end_are_killed(tmp_path):
    with atomic_output_dir(tmp_path / "out") as tmp:
        w = spawn_worker([sys.executable, "-c", "import time; time.sleep(60)"])
        (tmp / "a").write_text("x")
    assert w.poll() is not None and not alive(w.pid)


def test_workers_are_killed_on_an_exception(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(tmp_path / "out"):
            w = spawn_worker([sys.executable, "-c", "import time; time.sleep(60)"], stdout=subprocess.DEVNULL)
            raise RuntimeError("boom")
    assert w.poll() is not None and not partials(tmp_path / "out")


def test_spawn_worker_outside_a_block_is_a_plain_popen(tmp_path):
    calls = []
    p = spawn_worker([sys.executable, "-c", "print('hi')"], stdout=subprocess.PIPE, text=True,
                     preexec_fn=lambda: calls.append(1))
    assert p.communicate(timeout=10)[0] == "hi\n" and p.returncode == 0


# ----------------------------------------------------------------------------- stale partials
def _fake_partial(out: Path, pid: int, start: str | None = None, where: str | None = None,
                  kind: str = "partial") -> Path:
    start = start or _proc_start(pid) or "x"
    p = out.parent / f".{out.name}.{kind}-{pid}-{start}-{where or _where()}-deadbeef"
    p.mkdir()
    (p / "prefill.onnx").write_text("x")
    return p


def test_partial_of_a_live_process_is_reported_and_kept(tmp_path):
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        p = _fake_partial(out, sleeper.pid)
        msgs: list[str] = []
        assert clean_stale_partials(out, report=msgs.append) == []
        assert p.is_dir() and len(msgs) == 1 and f"PID {sleeper.pid}" in msgs[0] and "right now" in msgs[0]
    finally:
        sleeper.kill()
        sleeper.wait()
    msgs.clear()
    assert clean_stale_partials(out, report=msgs.append) == [p]  # its owner is gone now
    assert not p.exists() and "removed" in msgs[0]


def test_reused_pid_counts_as_dead(tmp_path):
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        p = _fake_partial(out, sleeper.pid, start="1")  # another process's start time
        assert clean_stale_partials(out, report=lambda m: None) == [p] and not p.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_partial_from_another_host_is_only_reported(tmp_path):
    out = tmp_path / "out"
    p = _fake_partial(out, dead_pid(), start="x", where="0badf00d")
    msgs: list[str] = []
    assert clean_stale_partials(out, report=msgs.append) == []
    assert p.is_dir() and "another machine, container or PID namespace" in msgs[0]


def test_legacy_mkdtemp_partial_is_only_reported(tmp_path):
    out = tmp_path / "out"
    legacy = tmp_path / ".out.partial-k2j_x9qa"
    legacy.mkdir()
    msgs: list[str] = []
    assert clean_stale_partials(out, report=msgs.append) == []
    assert legacy.is_dir() and "older hatrt" in msgs[0]


def test_old_output_set_aside_by_a_killed_swap_is_restored(tmp_path):
    out = tmp_path / "out"
    old = _fake_partial(out, dead_pid(), kind="old")
    msgs: list[str] = []
    assert clean_stale_partials(out, report=msgs.append) == [old]
    assert (out / "prefill.onnx").read_text() == "x" and "restored" in msgs[0]
    old2 = _fake_partial(out, dead_pid(), kind="old")  # the swap finished: the old copy is garbage
    clean_stale_partials(out, report=lambda m: None)
    assert not old2.exists() and (out / "prefill.onnx").exists()


def test_other_outputs_partials_are_untouched(tmp_path):
    other = _fake_partial(tmp_path / "out2", dead_pid())
    clean_stale_partials(tmp_path / "out", report=lambda m: None)
    assert other.is_dir()


# ----------------------------------------------------------------------------- permissions, overwrite
@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750), (0o002, 0o775)])
def test_final_directory_respects_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            assert tmp.stat().st_mode & 0o777 == mode
        assert (tmp_path / "out").stat().st_mode & 0o777 == mode
    finally:
        os.umask(old)


def test_explicit_mode(tmp_path):
    with atomic_output_dir(tmp_path / "out", mode=0o700):
        pass
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o700


def test_output_holds_exactly_what_was_written(tmp_path):
    with atomic_output_dir(tmp_path / "a" / "b" / "out") as tmp:  # parents are created
        assert tmp.parent == tmp_path / "a" / "b" and tmp.name.startswith(".out.partial-")
        (tmp / "x").write_text("1")
    assert sorted(p.name for p in (tmp_path / "a" / "b" / "out").iterdir()) == ["x"]  # no owner file
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["out"]


def test_non_empty_output_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(OutputDirError, match=rf"output directory {out} is not empty .*overwrite=True"):
        with atomic_output_dir(out):
            pytest.fail("entered")
    assert (out / "keep").read_text() == "old" and not partials(out)
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert not list(tmp_path.glob(".out.old-*"))


def test_empty_existing_directory_is_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("1")
    assert (tmp_path / "out" / "x").exists()


def test_failure_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(ValueError, match="half way"):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new").write_text("new")
            raise ValueError("half way")
    assert sorted(p.name for p in out.iterdir()) == ["keep"] and not partials(out)


def test_output_path_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputDirError, match=rf"output path {tmp_path / 'out'} exists and is not a directory"):
        with atomic_output_dir(tmp_path / "out", overwrite=True):
            pass


def test_unwritable_parent_names_the_path(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputDirError, match=rf"{ro / 'out'}"):
            with atomic_output_dir(ro / "out"):
                pass
    finally:
        ro.chmod(0o755)


def test_someone_else_fills_the_target_meanwhile(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputDirError, match="is not empty"):
        with atomic_output_dir(out) as tmp:
            (tmp / "mine").write_text("1")
            out.mkdir()
            (out / "theirs").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["theirs"] and not partials(out)


def test_symlinked_output_is_written_behind_the_link(tmp_path):
    real = tmp_path / "real"
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with atomic_output_dir(link) as tmp:
        (tmp / "x").write_text("1")
    assert link.is_symlink() and (real / "x").exists()


@pytest.mark.slow
def test_sigterm_during_hatrt_export_exits_143_and_leaves_nothing(tmp_path):
    """The real command: `hatrt export` killed with SIGTERM while it traces (what docker, Kubernetes
    and Slurm send) exits 143, and neither the output nor a hidden partial directory remains."""
    out = tmp_path / "export"
    proc = subprocess.Popen([sys.executable, "-c", "from engines.cli import main; main()", "export", "tiny-flash",
                             "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".export.partial-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob(".export.partial-*")), "the export never started writing"
    time.sleep(1.0)  # inside the model load / trace
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())
