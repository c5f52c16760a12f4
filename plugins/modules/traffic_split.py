#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) onprem.mesh contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: traffic_split
short_description: Set the subset weights of one HTTP route of an Istio VirtualService
version_added: "0.1.0"
description:
  - Changes the C(weight) of the destinations of one HTTP route of a VirtualService, and nothing else.
    Every other route, match, mirror, retry, timeout, header and destination stays as it was.
  - Validates before it writes - whole weights from 0 to 100 that sum to 100, every subset defined by a
    DestinationRule for the host, the VirtualService and the route exist.
  - Writes one JSON patch that begins with a C(test) of the route's destinations as they were read, so a
    concurrent change is refused by the API server instead of being overwritten or mixed. On such a conflict
    (kube-apiserver answers HTTP 422 for a failed C(test), or 409) it reads the VirtualService again, builds the
    patch anew from what it finds and retries, up to O(conflict_retries) times. Changes other clients make to other
    routes, to other fields or to annotations never conflict and are kept.
  - A subset that the route does not list yet is added as a copy of the route's first destination with
    the new subset name; subsets missing from O(weights) get weight 0.
author:
  - onprem.mesh contributors (@onprem-mesh)
extends_documentation_fragment:
  - onprem.mesh.k8s_auth
  - onprem.mesh.vs_route
attributes:
  check_mode:
    support: full
    description: Reads, validates and reports the change it would make; writes nothing.
  diff_mode:
    support: full
    description: Shows the route's destinations before and after.
options:
  weights:
    description:
      - "Subset name to weight, for example C({v1: 90, v2: 10}). Whole numbers from 0 to 100 that sum to 100."
    type: dict
    required: true
notes:
  - "RBAC: C(get) and C(patch) on C(virtualservices.networking.istio.io), C(list) on C(destinationrules.networking.istio.io)
    in the namespace."
seealso:
  - module: onprem.mesh.canary_rollout
  - module: onprem.mesh.canary_gate
"""

EXAMPLES = r"""
- name: Send 10% of the reviews traffic to v2
  onprem.mesh.traffic_split:
    name: reviews
    namespace: bookinfo
    weights:
      v1: 90
      v2: 10

- name: Change the default route only, next to a header-matched route
  onprem.mesh.traffic_split:
    name: reviews
    namespace: bookinfo
    service_host: reviews.bookinfo.svc.cluster.local
    route_name: default
    weights: {v2: 100, v3: 0}
    kubeconfig: /etc/kubernetes/admin.conf
"""

RETURN = r"""
weights_before:
  description: Subset weights of the route before the change.
  returned: success
  type: dict
  sample: {"v1": 100, "v2": 0}
weights_after:
  description: Subset weights of the route after the change (or as they would be, in check mode).
  returned: success
  type: dict
  sample: {"v1": 90, "v2": 10}
route_index:
  description: Position of the changed route in C(spec.http).
  returned: success
  type: int
  sample: 1
route_name:
  description: Name of the changed route, if it has one.
  returned: success
  type: str
  sample: default
patch:
  description: The JSON patch sent (or that would be sent in check mode); empty when nothing changes.
  returned: success
  type: list
  elements: dict
attempts:
  description: Reads and patch attempts made, more than one after conflicts.
  returned: success
  type: int
  sample: 1
api_calls:
  description: Calls made to the API server, by kind.
  returned: success
  type: dict
  sample: {"read": 2, "write": 1}
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.onprem.mesh.plugins.module_utils.k8s_client import (
    HAS_K8S, K8S_AUTH_ARGSPEC, K8S_IMP_ERR, IstioObjects, K8sError, build_api_client)
from ansible_collections.onprem.mesh.plugins.module_utils.traffic import VS_ROUTE_ARGSPEC, TrafficError, WeightChange


def main():
    argument_spec = dict(
        K8S_AUTH_ARGSPEC,
        weights=dict(type="dict", required=True),
    )
    argument_spec.update(VS_ROUTE_ARGSPEC)
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True, mutually_exclusive=[("route_name", "route_index")])
    if not HAS_K8S:
        module.fail_json(msg=missing_required_lib("kubernetes"), exception=K8S_IMP_ERR)
    params = module.params
    try:
        store = IstioObjects(build_api_client(params))
        change = WeightChange(store, params["namespace"], params["name"], host=params["service_host"], route_name=params["route_name"],
                              route_index=params["route_index"], retries=params["conflict_retries"])
        result = change.apply(params["weights"], check_mode=module.check_mode)
    except (TrafficError, K8sError) as exc:
        module.fail_json(msg=str(exc))
    out = dict(changed=result["changed"], weights_before=result["before"], weights_after=result["after"], route_index=result["route_index"],
               route_name=result["route_name"], patch=result["patch"], attempts=result["attempts"], api_calls=store.calls)
    if module._diff and result["changed"]:
        out["diff"] = dict(before={"weights": result["before"]}, after={"weights": result["after"]},
                           before_header="%s/%s http[%d]" % (params["namespace"], params["name"], result["route_index"]),
                           after_header="%s/%s http[%d]" % (params["namespace"], params["name"], result["route_index"]))
    module.exit_json(**out)


if __name__ == "__main__":
    main()
