"""Child processes for the lab: started from one long-lived thread, with PID files, stopped in order.

Why a launcher thread: Envoy 1.40 calls prctl(PR_SET_PDEATHSIG, SIGTERM) on itself at start-up (visible
with `strace -f -e trace=prctl envoy ...`). The kernel delivers that signal when the *thread* that forked
the child exits, not the process - so an Envoy spawned from a short-lived thread (a pytest timeout thread,
a ThreadPoolExecutor worker, an Ansible callback...) dies a moment later with SIGTERM. The launcher forks
every child from one thread that lives exactly as long as the lab, and sets the same PDEATHSIG on the
other children, so nothing outlives the lab even if its process is killed with SIGKILL.
"""
import ctypes
import json
import os
import queue
import signal
import subprocess
import threading
import time

PR_SET_PDEATHSIG = 1
# Loaded here, in the parent: the child between fork and exec must not dlopen (other threads may hold locks).
_LIBC = ctypes.CDLL(None, use_errno=True)


def _pdeathsig():
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Child:
    def __init__(self, name, popen, log_path, pid_file):
        self.name, self.popen, self.log_path, self.pid_file = name, popen, log_path, pid_file

    @property
    def pid(self):
        return self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def log_tail(self, lines=30):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return ""


class Launcher:
    """Forks children from a dedicated long-lived thread; stops them (reverse order) on close()."""

    def __init__(self, run_dir, max_seconds=24 * 3600):
        self.run_dir = run_dir
        self.pid_dir = os.path.join(run_dir, "pids")
        self.log_dir = os.path.join(run_dir, "logs")
        os.makedirs(self.pid_dir, exist_ok=True)
        os.makedirs(self.log_dir, exist_ok=True)
        self.children = []
        self._requests = queue.Queue()
        self._closed = threading.Event()
        self._max_seconds = max_seconds
        self._thread = threading.Thread(target=self._loop, name="lab-launcher", daemon=True)
        self._thread.start()

    def _loop(self):
        deadline = time.monotonic() + self._max_seconds
        while not self._closed.is_set() and time.monotonic() < deadline:
            try:
                job, reply = self._requests.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                reply.put((True, job()))
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                reply.put((False, exc))

    def spawn(self, name, argv, env=None, cwd=None):
        """Start argv from the launcher thread; output goes to logs/<name>.log, PID to pids/<name>.pid."""
        if self._closed.is_set() or not self._thread.is_alive():
            raise RuntimeError("the lab launcher is closed")
        log_path = os.path.join(self.log_dir, f"{name}.log")
        pid_file = os.path.join(self.pid_dir, f"{name}.pid")

        def job():
            with open(log_path, "ab") as log:
                popen = subprocess.Popen(  # noqa: S603 - argv built by the lab
                    [str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=env, cwd=cwd, preexec_fn=_pdeathsig,  # noqa: PLW1509 - only prctl, no locks
                    start_new_session=True)  # Ctrl-C goes to the lab, which stops children in order
            return popen

        reply = queue.Queue()
        self._requests.put((job, reply))
        ok, value = reply.get(timeout=30)
        if not ok:
            raise value
        child = Child(name, value, log_path, pid_file)
        with open(pid_file, "w", encoding="utf-8") as fh:
            fh.write(f"{value.pid}\n")
        self.children.append(child)
        return child

    def record_pid(self, name, pid, marker=None):
        """PID file for a process started elsewhere (e.g. by the Prometheus harness); marker: a string its
        command line contains, checked before `labctl down` signals a PID left from a crashed run."""
        with open(os.path.join(self.pid_dir, f"{name}.pid"), "w", encoding="utf-8") as fh:
            fh.write(f"{pid}\n{marker or ''}\n")

    @staticmethod
    def stop_child(child, timeout=10.0):
        if child.alive():
            try:
                child.popen.send_signal(signal.SIGTERM)
                child.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                child.popen.kill()
                child.popen.wait(5)
            except ProcessLookupError:
                pass
        try:
            os.unlink(child.pid_file)
        except OSError:
            pass

    def close(self):
        for child in reversed(self.children):
            self.stop_child(child)
        self.children = []
        self._closed.set()
        self._thread.join(5)


def wait_for(predicate, timeout, interval=0.05, what="condition", child=None):
    """Poll predicate() until truthy (returns its value); bounded by timeout. Fails early if child died."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.popen.returncode} while waiting for {what}; "
                               f"log {child.log_path}:\n{child.log_tail()}")
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - not ready yet
            last_exc = exc
        time.sleep(interval)
    extra = f"; last error: {last_exc}" if last_exc else ""
    log = f"; log {child.log_path}:\n{child.log_tail()}" if child is not None else ""
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{extra}{log}")


def read_json(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def kill_stale(run_dir, timeout=10.0):
    """Stop processes left by an earlier run in run_dir (PID files), only if their command line names run_dir."""
    pid_dir = os.path.join(run_dir, "pids")
    stopped = []
    if not os.path.isdir(pid_dir):
        return stopped
    for entry in sorted(os.listdir(pid_dir)):
        path = os.path.join(pid_dir, entry)
        try:
            with open(path, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
            pid = int(lines[0])
            marker = (lines[1] if len(lines) > 1 else "").strip() or os.path.join(os.path.abspath(run_dir), "")
        except (OSError, ValueError, IndexError):
            pid, marker = None, None
        if pid and pid != os.getpid() and pid_alive(pid) and marker in cmdline(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
            stopped.append((entry, pid))
        try:
            os.unlink(path)
        except OSError:
            pass
    return stopped
