# -*- coding: utf-8 -*-
# Copyright: onprem.mesh maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Print, at the end of each playbook run, how long each host took and how many tasks changed it."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
name: guest_times
type: aggregate
short_description: Per-host run time and changed count of a playbook
description:
  - Prints one line per host at the end of the run, C(GUEST-TIME playbook=... host=... seconds=... changed=...).
  - Used by the Molecule scenarios of onprem.mesh to report first-converge and rerun times per guest.
requirements:
  - enable in configuration
"""

import os
import time

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    """Time from a host's first task start to its last task result."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "guest_times"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super(CallbackModule, self).__init__()
        self._playbook = "?"
        self._task_start = None
        self._first = {}
        self._last = {}
        self._changed = {}

    def v2_playbook_on_start(self, playbook):
        self._playbook = os.path.basename(playbook._file_name)  # pylint: disable=protected-access

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._task_start = time.time()

    def v2_playbook_on_handler_task_start(self, task):
        self._task_start = time.time()

    def _result(self, result, changed=False):
        host = result._host.get_name()  # pylint: disable=protected-access
        self._first.setdefault(host, self._task_start or time.time())
        self._last[host] = time.time()
        self._changed[host] = self._changed.get(host, 0) + (1 if changed else 0)

    def v2_runner_on_ok(self, result):
        self._result(result, result._result.get("changed", False))  # pylint: disable=protected-access

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._result(result)

    def v2_runner_on_skipped(self, result):
        self._result(result)

    def v2_runner_on_unreachable(self, result):
        self._result(result)

    def v2_playbook_on_stats(self, stats):
        for host in sorted(self._first):
            self._display.display("GUEST-TIME playbook=%s host=%s seconds=%.1f changed=%d" % (
                self._playbook, host, self._last[host] - self._first[host], self._changed.get(host, 0)))
