# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""canary_command as Ansible runs it: arguments in, exit_json/fail_json out, the API faked."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import copy
import json

import pytest

from ansible.module_utils.testing import patch_module_args
from ansible_collections.onprem.mesh.tests.unit.plugins.modules.module_exits import ExitJson, FailJson
from ansible_collections.onprem.mesh.plugins.module_utils import rollout as ro
from ansible_collections.onprem.mesh.plugins.modules import canary_command
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.fake_istio import FakeIstio, serve
from ansible_collections.onprem.mesh.tests.unit.plugins.modules.test_canary_rollout import OBJECTS


def held():
    objs = copy.deepcopy(OBJECTS)
    objs[0]["spec"]["http"][0]["route"][0]["weight"], objs[0]["spec"]["http"][0]["route"][1]["weight"] = 75, 25
    objs[0]["metadata"]["annotations"] = {ro.STATE_ANNOTATION: json.dumps(dict(canary="v2", stable="v1", phase="held", step=2, holder="job-1",
                                                                               plan=[5, 10, 25]))}
    return objs


def run(args, check_mode=False, diff=False):
    args = dict(args, _ansible_check_mode=check_mode, _ansible_diff=diff)
    with patch_module_args(args):
        with pytest.raises((ExitJson, FailJson)) as outcome:
            canary_command.main()
    return outcome.value.args[0]


def test_check_mode_with_diff_shows_a_direct_abort_and_writes_nothing(monkeypatch):
    store = serve(monkeypatch, FakeIstio(held()), (canary_command,))
    out = run(dict(name="payment", namespace="shop", command="abort"), check_mode=True, diff=True)
    assert out["changed"] and out["direct"] and out["diff"] == {"before": {"weights": {"v1": 75, "v2": 25}}, "after": {"weights": {"v1": 100, "v2": 0}}}
    assert store.calls["write"] == 0


def test_promote_records_who_asked(monkeypatch):
    store = serve(monkeypatch, FakeIstio(held()), (canary_command,))
    out = run(dict(name="payment", namespace="shop", command="promote", by="erin", reason="signed off"))
    assert out["changed"] and out["phase"] == "promoted" and out["api_calls"]["write"] == 1
    recorded = json.loads(store.objects[("virtualservices", "shop", "payment")]["metadata"]["annotations"][ro.STATE_ANNOTATION])
    assert recorded["command"]["by"] == "erin" and recorded["reason"] == "promoted by hand by erin: signed off (no rollout was running)"


def test_pause_without_a_running_rollout_fails_and_says_why(monkeypatch):
    store = serve(monkeypatch, FakeIstio(held()), (canary_command,))
    out = run(dict(name="payment", namespace="shop", command="pause"))
    assert out["failed"] and out["msg"].startswith("command: no rollout is running on VirtualService shop/payment (the last rollout")
    assert store.calls["write"] == 0


@pytest.mark.parametrize("args, message", [
    (dict(command="stop"), "value of command must be one of: abort, pause, resume, promote, got: stop"),
    (dict(command="abort", wait_timeout=0), "wait_timeout: a number of seconds of 1 or more, got 0"),
])
def test_bad_input_is_refused_before_any_call(monkeypatch, args, message):
    store = serve(monkeypatch, FakeIstio(held()), (canary_command,))
    out = run(dict(dict(name="payment", namespace="shop"), **args))
    assert out["failed"] and out["msg"] == message and store.calls == {"read": 0, "write": 0}
