#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) onprem.mesh contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: canary_command
short_description: Abort, pause, resume or promote a canary rollout of onprem.mesh.canary_rollout
version_added: "0.2.0"
description:
  - Sends an operator's command to the M(onprem.mesh.canary_rollout) that runs on a VirtualService, found through the
    state and the lease that rollout keeps on it (the annotations C(mesh.onprem.io/canary-rollout) and
    C(mesh.onprem.io/canary-lease)). The command is posted in the annotation C(mesh.onprem.io/canary-command); the
    running rollout looks for it every C(command_interval) seconds (5 by default), acts on it, removes it and records
    its id in its state, which is how this module knows it was done (O(wait)).
  - V(abort) - all traffic back on the stable subset, the lease released; the rollout ends V(aborted) whatever its
    C(on_failure) says.
  - V(pause) - the rollout stays at its current step with its weights and waits, up to its C(pause_timeout);
    V(resume) - the paused rollout goes on, starting the step again with a fresh analysis window.
  - V(promote) - 100 % to the canary now, the lease released, recorded as a manual promotion (who, when, why).
  - With no rollout running (its job ended, was killed, or held), V(abort) and V(promote) set the weights themselves
    - 0 or 100 to the canary the state records - and record the phase; V(pause) and V(resume) fail and say so (a held
    or paused rollout whose job ended goes on when its job is run again).
author:
  - onprem.mesh contributors (@onprem-mesh)
extends_documentation_fragment:
  - onprem.mesh.k8s_auth
  - onprem.mesh.vs_route
attributes:
  check_mode:
    support: full
    description: Reads the VirtualService and reports what the command would do - post it to the running rollout, or set which weights; writes nothing.
  diff_mode:
    support: full
    description: Shows the weights of the route before and after (after the rollout acted on the command, with O(wait)).
options:
  command:
    description: What the rollout is to do.
    type: str
    required: true
    choices: [abort, pause, resume, promote]
  reason:
    description: Why, recorded with the command and in the rollout's state and timeline.
    type: str
  by:
    description: Who sends the command (recorded), for example C({{ awx_user_name }}); defaults to the user running the task.
    type: str
  wait:
    description: Wait until the running rollout acted on the command, and return the phase and the weights it left.
    type: bool
    default: true
  wait_timeout:
    description: Seconds to wait with O(wait); fail after that, leaving the command posted for the rollout's next look.
    type: int
    default: 60
notes:
  - "RBAC: C(get) and C(patch) on C(virtualservices.networking.istio.io); for a direct abort or promote, C(list) on
    C(destinationrules.networking.istio.io) too, in the namespace."
seealso:
  - module: onprem.mesh.canary_rollout
  - module: onprem.mesh.traffic_split
"""

EXAMPLES = r"""
- name: Stop the release of payment v2 now, all traffic back on v1
  onprem.mesh.canary_command:
    name: payment
    namespace: shop
    command: abort
    reason: checkout errors reported by the support desk

- name: Hold the rollout at its current step while the database migration runs
  onprem.mesh.canary_command:
    name: payment
    namespace: shop
    command: pause

- name: Go on
  onprem.mesh.canary_command:
    name: payment
    namespace: shop
    command: resume

- name: Release to everyone now
  onprem.mesh.canary_command:
    name: payment
    namespace: shop
    command: promote
    by: "{{ awx_user_name | default(omit) }}"
    reason: verified by the product owner
"""

RETURN = r"""
command:
  description: The command.
  returned: always
  type: str
  sample: abort
id:
  description: The command's id, as recorded in the rollout's state once it acted on it.
  returned: when a command was posted or done
  type: str
  sample: 3f2a9c0d1e4b
posted:
  description: The command was posted to a running rollout (its lease holder is RV(holder)).
  returned: when a rollout was running
  type: bool
holder:
  description: The lease holder of the running rollout the command was posted to.
  returned: when posted
  type: str
direct:
  description: No rollout was running, so this module set the weights itself (abort or promote).
  returned: when no rollout was running
  type: bool
acknowledged:
  description: The rollout acted on the command (or, for a direct abort or promote, the weights were written).
  returned: always
  type: bool
phase:
  description: The rollout's phase after the command (V(aborted), V(paused), V(progressing), V(promoted)...).
  returned: always
  type: str
  sample: aborted
weights_before:
  description: Subset weights of the route before the command.
  returned: always
  type: dict
  sample: {"v1": 90, "v2": 10}
weights_after:
  description: Subset weights of the route after the command (as the rollout left them, with O(wait); planned, in check mode).
  returned: always
  type: dict
  sample: {"v1": 100, "v2": 0}
state:
  description: The rollout's state annotation after the command, as JSON.
  returned: when recorded
  type: dict
replaced:
  description: An earlier command the running rollout had not acted on yet, replaced by this one.
  returned: when one was pending
  type: dict
"""

import getpass

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.onprem.mesh.plugins.module_utils.k8s_client import (
    HAS_K8S, K8S_AUTH_ARGSPEC, K8S_IMP_ERR, IstioObjects, K8sError, build_api_client)
from ansible_collections.onprem.mesh.plugins.module_utils.rollout import COMMANDS, operator_command
from ansible_collections.onprem.mesh.plugins.module_utils.traffic import VS_ROUTE_ARGSPEC, TrafficError, WeightChange


def main():
    argument_spec = dict(
        K8S_AUTH_ARGSPEC,
        command=dict(type="str", required=True, choices=list(COMMANDS)),
        reason=dict(type="str"),
        by=dict(type="str"),
        wait=dict(type="bool", default=True),
        wait_timeout=dict(type="int", default=60),
    )
    argument_spec.update(VS_ROUTE_ARGSPEC)
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True, mutually_exclusive=[("route_name", "route_index")])
    if not HAS_K8S:
        module.fail_json(msg=missing_required_lib("kubernetes"), exception=K8S_IMP_ERR)
    p = module.params
    if p["wait_timeout"] < 1:
        module.fail_json(msg="wait_timeout: a number of seconds of 1 or more, got %s" % p["wait_timeout"])
    try:
        store = IstioObjects(build_api_client(p))
        change = WeightChange(store, p["namespace"], p["name"], host=p["service_host"], route_name=p["route_name"],
                              route_index=p["route_index"], retries=p["conflict_retries"])
        result = operator_command(change, p["command"], by=p["by"] or getpass.getuser(), reason=p["reason"], check_mode=module.check_mode,
                                  wait=p["wait"], timeout=p["wait_timeout"])
    except (TrafficError, K8sError) as exc:
        module.fail_json(msg=str(exc), **dict(getattr(exc, "result", None) or {}))
    result["api_calls"] = store.calls
    if module._diff and result["weights_before"] != result["weights_after"]:
        result["diff"] = dict(before={"weights": result["weights_before"]}, after={"weights": result["weights_after"]})
    module.exit_json(**result)


if __name__ == "__main__":
    main()
