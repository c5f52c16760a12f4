# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""exit_json and fail_json turned into exceptions, so a module test reads the result a module would print."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import pytest

from ansible.module_utils import basic


class ExitJson(Exception):
    pass


class FailJson(Exception):
    pass


@pytest.fixture(autouse=True)
def exits(monkeypatch):
    def exit_json(self, **kwargs):
        exc = ExitJson(kwargs)
        exc.module = self   # the AnsibleModule, e.g. for the values it keeps out of logs (no_log_values)
        raise exc

    def fail_json(self, **kwargs):
        kwargs["failed"] = True
        exc = FailJson(kwargs)
        exc.module = self
        raise exc

    monkeypatch.setattr(basic.AnsibleModule, "exit_json", exit_json)
    monkeypatch.setattr(basic.AnsibleModule, "fail_json", fail_json)
