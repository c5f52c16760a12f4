# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""job_watch: the chain of processes that started a module (on a /proc tree written here, and on the real /proc),
signals turned into a cancel, and the guardian process that outlives a killed module."""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import signal
import time

import pytest

from ansible_collections.onprem.mesh.plugins.module_utils import job_watch as jw


def proc(tmp_path, processes):
    """A /proc with ``processes``: pid -> (ppid, starttime, argv[, state])."""
    for pid, spec in processes.items():
        ppid, started, argv = spec[:3]
        state = spec[3] if len(spec) > 3 else "S"
        d = tmp_path / str(pid)
        d.mkdir(parents=True)
        rest = [state, str(ppid)] + ["0"] * 17 + [str(started)] + ["0"] * 10
        (d / "stat").write_text("%d (%s) %s\n" % (pid, os.path.basename(argv[0])[:15] + " x", " ".join(rest)))
        (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    return str(tmp_path)


PLAYBOOK = ["/venv/bin/python3", "/venv/bin/ansible-playbook", "-i", "hosts", "canary.yml"]


def test_the_chain_runs_up_to_the_outermost_ansible_playbook(tmp_path):
    root = proc(tmp_path, {
        1: (0, 1, ["/sbin/init"]),
        50: (1, 5, ["bash"]),
        100: (50, 10, PLAYBOOK),                                  # the main process
        200: (100, 20, PLAYBOOK),                                 # its worker, forked from it
        300: (200, 30, ["/bin/sh", "-c", "python3 AnsiballZ_canary_rollout.py"]),
        400: (300, 40, ["python3", "AnsiballZ_canary_rollout.py"]),
    })
    chain = jw.controlling_chain(400, proc=root)
    assert [(pid, started) for pid, started, _c in chain] == [(300, 30), (200, 20), (100, 10)]
    assert chain[2][2] == "/venv/bin/python3 /venv/bin/ansible-playbook -i hosts canary.yml"


def test_the_chain_ends_at_the_sshd_session_on_a_managed_host(tmp_path):
    root = proc(tmp_path, {
        10: (1, 1, ["sshd: /usr/sbin/sshd -D [listener]"]),
        20: (10, 2, ["sshd: deploy@notty"]),
        30: (20, 3, ["/bin/sh", "-c", "python3 x.py"]),
        40: (30, 4, ["python3", "x.py"]),
    })
    assert [pid for pid, _s, _c in jw.controlling_chain(40, proc=root)] == [30, 20]


def test_without_ansible_or_sshd_only_the_parent_counts(tmp_path):
    root = proc(tmp_path, {5: (1, 1, ["tmux"]), 6: (5, 2, ["bash"]), 7: (6, 3, ["python3", "x.py"])})
    assert [pid for pid, _s, _c in jw.controlling_chain(7, proc=root)] == [6]
    assert jw.controlling_chain(7, proc=str(tmp_path / "nothing")) == []


def test_gone_names_the_first_process_that_ended_or_was_replaced(tmp_path):
    root = proc(tmp_path, {100: (1, 10, PLAYBOOK), 200: (100, 20, PLAYBOOK), 300: (200, 30, ["sh"]), 400: (300, 40, ["python3"])})
    watch = jw.JobWatch(jw.controlling_chain(400, proc=root), proc=root)
    assert watch.gone() is None
    for name in ("stat", "cmdline"):
        os.remove(os.path.join(root, "100", name))
    assert watch.gone() == "the process that ran this job ended: /venv/bin/python3 /venv/bin/ansible-playbook -i hosts canary.yml (pid 100)"
    proc(tmp_path / "other", {100: (1, 99, PLAYBOOK)})   # the pid taken by another process (another start time)
    assert jw.JobWatch([(100, 10, "ansible-playbook")], proc=str(tmp_path / "other")).gone() == (
        "the process that ran this job ended: ansible-playbook (pid 100)")
    proc(tmp_path / "zombie", {100: (1, 10, PLAYBOOK, "Z")})
    assert jw.JobWatch([(100, 10, "ansible-playbook")], proc=str(tmp_path / "zombie")).gone() is not None


def test_on_the_real_proc_the_parent_is_watched_and_lives():
    watch = jw.JobWatch()
    assert watch.chain and watch.chain[0][0] == os.getppid()
    assert watch.gone() is None


class Cancel(BaseException):
    pass


def test_the_first_signal_raises_and_the_next_ones_are_ignored():
    previous = jw.cancel_on_signals(Cancel)
    try:
        with pytest.raises(Cancel, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        os.kill(os.getpid(), signal.SIGINT)   # ignored: the rollback it led to must not be cut short
        time.sleep(0.05)
    finally:
        jw.restore(previous)
    assert signal.getsignal(signal.SIGTERM) == previous[signal.SIGTERM]


def wait_for(path, seconds=10.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                return f.read()
        time.sleep(0.05)
    return None


def test_the_guardian_acts_when_its_module_dies_without_saying_done(tmp_path):
    marker = str(tmp_path / "acted")

    def act(reason):
        with open(marker + ".part", "w") as f:
            f.write("%s|%d|%d" % (reason, os.getsid(0), os.getppid()))
        os.rename(marker + ".part", marker)   # whole, or not there: the test reads it as soon as it exists

    child = os.fork()
    if child == 0:  # the module: starts its guardian, then is killed
        try:
            jw.Guardian(act).start()
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(3)
    _pid, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    said = wait_for(marker)
    assert said is not None, "the guardian did not act"
    reason, session, _parent = said.split("|")
    assert reason == "the module process was killed outright (SIGKILL)"
    assert int(session) != os.getsid(0)   # a session of its own: a kill of the job's process group misses it


def test_the_guardian_does_nothing_when_the_module_ends_by_itself(tmp_path):
    marker = str(tmp_path / "acted")
    guardian = jw.Guardian(lambda reason: open(marker, "w").close())
    pid = guardian.start()
    assert pid and pid != os.getpid()
    guardian.done()
    deadline = time.time() + 10
    while time.time() < deadline and jw.process_stat(pid) is not None:   # ended (a zombie until its new parent reaps it)
        time.sleep(0.05)
    assert jw.process_stat(pid) is None and not os.path.exists(marker)
    guardian.done()   # twice is harmless
