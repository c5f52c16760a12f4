# -*- coding: utf-8 -*-
# Copyright (c) onprem.mesh contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Keep a long-running module tied to the job that started it (Linux; plain Python, no Ansible).

A canary rollout runs for many minutes inside one module process. Three ways its job can end under it:

* a signal to the module (SIGTERM, Ctrl-C's SIGINT, SIGHUP): ``cancel_on_signals`` turns the first one into a
  ``Cancelled`` exception in the main thread, and ignores the next ones while that is being dealt with;
* the controlling ``ansible-playbook`` dies (``kill -9``) while the module lives on (Ansible's worker processes
  and the module do not die with it): ``JobWatch.gone()`` notices when a process of the chain that started the
  module has ended - the rollout calls it every second or so while it waits;
* the module itself is killed outright (SIGKILL, the OOM killer). No handler runs then, so ``Guardian`` forks, before the rollout's first write, a small process
  in a session of its own that outlives the group; when the module's end of a pipe closes without the module
  having said it finished, the guardian runs the given action (the rollout's ``abandoned``: on_cancel, lease
  released) and exits.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import signal

ANSIBLE_COMMANDS = ("ansible-playbook", "ansible", "ansible-console", "ansible-pull", "ansible-runner")
PROC = "/proc"


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except (IOError, OSError):
        return None


def process_stat(pid, proc=PROC):
    """``(ppid, starttime)`` of a process from /proc/<pid>/stat, or None when it is gone (or there is no /proc)."""
    raw = _read(os.path.join(proc, str(pid), "stat"))
    if not raw:
        return None
    fields = raw[raw.rindex(b")") + 2:].split()  # the command name, in parentheses, may hold spaces
    if fields[0] in (b"Z", b"X"):  # a zombie has ended: its parent has not collected it yet
        return None
    return int(fields[1]), int(fields[19])


def process_argv(pid, proc=PROC):
    raw = _read(os.path.join(proc, str(pid), "cmdline")) or b""
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def _is_ansible(argv):
    """ansible-playbook and its kin, run directly or by an interpreter (``python3 /venv/bin/ansible-playbook ...``)."""
    return any(os.path.basename(a) in ANSIBLE_COMMANDS for a in argv[:2])


def _is_sshd(argv):
    return bool(argv) and os.path.basename(argv[0].split()[0]).startswith("sshd")


def controlling_chain(pid=None, proc=PROC):
    """The processes whose end means the module's job has ended: ``[(pid, starttime, command), ...]`` from the parent up.

    Up to and including the outermost of the consecutive ``ansible-playbook`` processes above the module (the worker
    that runs the task and the main process it was forked from); on a managed host reached by SSH, up to the sshd
    session; otherwise only the parent. Not beyond: an ``ansible-playbook`` started with ``nohup ... &`` from a shell
    that then ended is still a living job."""
    pid = os.getpid() if pid is None else pid
    stat = process_stat(pid, proc)
    chain = []
    seen_ansible = False
    parent = stat[0] if stat else 0
    while parent > 1:
        stat = process_stat(parent, proc)
        if stat is None:
            break
        argv = process_argv(parent, proc)
        ansible = _is_ansible(argv)
        if seen_ansible and not ansible:
            break
        chain.append((parent, stat[1], " ".join(argv)[:120] or "pid %d" % parent))
        seen_ansible = seen_ansible or ansible
        if _is_sshd(argv):
            return chain
        parent = stat[0]
    return chain if seen_ansible else chain[:1]


class JobWatch:
    """``gone()``: None while every process of the controlling chain lives (the same process: pid and start time),
    else a sentence naming the first one that ended."""

    def __init__(self, chain=None, proc=PROC):
        self.proc = proc
        self.chain = controlling_chain(proc=proc) if chain is None else list(chain)

    def gone(self):
        for pid, started, command in self.chain:
            stat = process_stat(pid, self.proc)
            if stat is None or stat[1] != started:
                return "the process that ran this job ended: %s (pid %d)" % (command, pid)
        return None


def cancel_on_signals(make_exception, signals=(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)):
    """Raise ``make_exception(name)`` in the main thread on the first of ``signals``; ignore the ones after it (the
    rollback or hold it leads to must not be cut short). Returns the previous handlers, for ``restore``."""
    fired = []

    def handler(signum, _frame):
        if fired:
            return
        fired.append(signum)
        raise make_exception(signal.Signals(signum).name)

    return dict((s, signal.signal(s, handler)) for s in signals)


def restore(previous):
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


class Guardian:
    """A process that outlives the module's process group and runs ``action(reason)`` if the module ends without
    ``done()``. ``start()`` forks it (twice, so that it is nobody's zombie) in a new session, with stdin, stdout and
    stderr on /dev/null (Ansible reads the module's stdout until every holder closes it)."""

    def __init__(self, action, reason="the module process was killed outright (SIGKILL)"):
        self.action = action
        self.reason = reason
        self.write_end = None
        self.pid = None

    def start(self):
        read_end, write_end = os.pipe()
        ready_r, ready_w = os.pipe()
        first = os.fork()
        if first == 0:  # pragma: no cover - runs in the forked process, proven by tests/integration/test_canary_cancel.py
            try:
                os.close(write_end)
                os.close(ready_r)
                os.setsid()
                if os.fork() > 0:
                    os._exit(0)
                for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(signum, signal.SIG_IGN if signum != signal.SIGTERM else signal.SIG_DFL)
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.write(ready_w, str(os.getpid()).encode())
                os.close(ready_w)
                said = b""
                while True:
                    chunk = os.read(read_end, 64)
                    if not chunk:
                        break
                    said += chunk
                if b"done" not in said:
                    self.action(self.reason)
            finally:
                os._exit(0)
        os.close(read_end)
        os.close(ready_w)
        os.waitpid(first, 0)
        self.pid = int(_read_all(ready_r) or 0) or None
        self.write_end = write_end
        return self.pid

    def done(self):
        """The module ends by itself: the guardian exits without acting."""
        if self.write_end is not None:
            try:
                os.write(self.write_end, b"done")
            finally:
                os.close(self.write_end)
                self.write_end = None


def _read_all(fd):
    data = b""
    while True:
        chunk = os.read(fd, 64)
        if not chunk:
            os.close(fd)
            return data
        data += chunk
