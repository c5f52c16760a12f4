#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: onprem.mesh contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: canary_gate
short_description: Judge a canary's health from Istio metrics, its Deployment and HTTP probes
version_added: 0.1.0
description:
  - Runs health checks against one canary and returns a verdict, V(pass), V(fail) or V(inconclusive), with the
    measured value, threshold and reason of every check.
  - V(success_rate) and V(latency) query Prometheus for the canary's Istio telemetry
    (C(istio_requests_total), C(istio_request_duration_milliseconds_bucket)) selected by
    C(destination_workload_namespace), C(destination_workload) and C(destination_version);
    V(promql) runs a custom query; V(workload_ready) and V(no_restarts) read the canary Deployment and its pods;
    V(http) calls a URL or webhook.
  - Missing data, NaN, errors and too little traffic are never a pass unless a policy says so. Inconclusive checks
    are retried for a bounded time and then fail.
  - The module changes nothing, so it also runs in check mode. It fails when the verdict is not V(pass), unless
    O(fail_on_verdict=false).
  - M(onprem.mesh.canary_rollout) runs the same checks, with the same options, between its steps.
author:
  - onprem.mesh contributors (@onprem-mesh)
extends_documentation_fragment:
  - onprem.mesh.k8s_auth
  - onprem.mesh.canary_checks
attributes:
  check_mode:
    support: full
    description: The checks only read; in check mode they run as usual.
  diff_mode:
    support: none
    description: Nothing changes, so there is no diff.
options:
  namespace:
    description:
      - Namespace of the canary Deployment; the C(destination_workload_namespace) label.
      - Needed by V(success_rate), V(latency), V(workload_ready) and V(no_restarts) checks and by the
        C({{ namespace }}) placeholder.
    type: str
  workload:
    description:
      - Name of the canary Deployment; the C(destination_workload) label Istio reports for it.
    type: str
  version:
    description:
      - The canary's C(version) label; when set, the built-in queries also select C(destination_version) on it.
    type: str
  stable_version:
    description:
      - The stable version's label, for custom queries (C({{ stable_version }})).
    type: str
  service_host:
    description:
      - The service host, for custom queries and V(http) URLs (C({{ host }})), for example V(reviews.shop.svc.cluster.local).
    type: str
  fail_on_verdict:
    description:
      - Fail the task when the verdict is not V(pass). With V(false), the task succeeds and the caller reads RV(verdict).
    type: bool
    default: true
requirements:
  - kubernetes >= 29.0.0 (Python library), only for V(workload_ready) and V(no_restarts) checks
notes:
  - Write custom queries with C(!unsafe) (or C({% raw %})) so that Ansible leaves the C({{ namespace }}) placeholders
    to this module.
  - Without a baseline (as in this module), V(no_restarts) counts restarts whose last termination falls in the last
    O(analysis_window), and all restarts of pods created in it. M(onprem.mesh.canary_rollout) compares restart counts with
    a baseline taken at the start of each step instead.
seealso:
  - module: onprem.mesh.canary_rollout
"""

EXAMPLES = r"""
- name: Gate the reviews v2 canary on its Istio metrics
  onprem.mesh.canary_gate:
    prometheus_url: http://prometheus.istio-system:9090
    namespace: shop
    workload: reviews-v2
    version: v2
    analysis_window: 2m
    min_requests: 50
    checks:
      - name: errors
        type: success_rate
        min: 99
      - name: p99
        type: latency
        max: 500
      - name: ready
        type: workload_ready
      - name: restarts
        type: no_restarts

- name: Custom query and a webhook; report the verdict without failing
  onprem.mesh.canary_gate:
    prometheus_url: https://prometheus.example.com
    prometheus_headers:
      Authorization: "Bearer {{ prometheus_token }}"
    namespace: shop
    workload: reviews-v2
    version: v2
    service_host: reviews.shop.svc.cluster.local
    retry_inconclusive_for: 120
    retry_interval: 15
    fail_on_verdict: false
    checks:
      - name: upstream-resets
        type: promql
        query: !unsafe >-
          sum(rate(istio_requests_total{destination_workload_namespace="{{ namespace }}",
          destination_workload="{{ workload }}",response_flags=~"UF|URX"}[{{ window }}]))
        max: 0.5
        on_no_data: pass
      - name: smoke
        type: http
        url: https://smoke.example.com/run
        method: POST
        body: {service: reviews, version: v2}
        expect_json: {status: ok}
  register: gate

- name: Show the checks that did not pass
  ansible.builtin.debug:
    msg: "{{ gate.checks | rejectattr('verdict', 'equalto', 'pass') | list }}"
  when: gate.verdict != 'pass'
"""

RETURN = r"""
verdict:
  description: V(pass) when every check passed; V(fail) when one failed; V(inconclusive) only with O(on_still_inconclusive=inconclusive).
  returned: when the checks ran
  type: str
  sample: fail
reason:
  description: The checks that did not pass, with their values and reasons.
  returned: when the checks ran
  type: str
  sample: "errors (success_rate): fail - 80 % is not >= 99 %"
checks:
  description: One entry per check, in the order of O(checks).
  returned: when the checks ran
  type: list
  elements: dict
  contains:
    name:
      description: The check's name.
      type: str
      sample: errors
    type:
      description: The check's type.
      type: str
      sample: success_rate
    query:
      description: The PromQL query of the check (also when the traffic guard decided), or the URL of an V(http) check.
      type: str
      sample: sum(rate(istio_requests_total{...,response_code!~"5.."}[1m])) / sum(rate(istio_requests_total{...}[1m])) * 100
    value:
      description: The measured value (percent, milliseconds, replicas, restarts, HTTP status); null when nothing was measured.
      type: raw
      sample: 80.0
    threshold:
      description: What the value had to meet.
      type: str
      sample: ">= 99 %"
    verdict:
      description: V(pass), V(fail) or V(inconclusive).
      type: str
      sample: fail
    reason:
      description: Why, in words; names the policy that decided when there was no usable value.
      type: str
      sample: 80 % is not >= 99 %
    attempts:
      description: How many times the check ran (inconclusive checks are retried).
      type: int
      sample: 1
    requests:
      description: Requests the canary answered in the window, when the traffic guard ran.
      type: float
      returned: for V(success_rate), V(latency), and V(promql) with O(checks[].min_requests)
      sample: 1200.0
started:
  description: When the evaluation started (UTC, ISO 8601).
  returned: when the checks ran
  type: str
  sample: "2026-11-28T16:00:00.000000+00:00"
ended:
  description: When the evaluation ended (UTC, ISO 8601).
  returned: when the checks ran
  type: str
  sample: "2026-11-28T16:00:01.200000+00:00"
duration:
  description: Seconds the evaluation took, retries included.
  returned: when the checks ran
  type: float
  sample: 1.2
rounds:
  description: Rounds of evaluation (1 plus the retries of inconclusive checks).
  returned: when the checks ran
  type: int
  sample: 1
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible.module_utils.common.text.converters import to_native
from ansible_collections.onprem.mesh.plugins.module_utils.canary_checks import (
    CHECKS_ARGSPEC,
    HAS_K8S,
    K8S_IMPORT_ERROR,
    K8S_TYPES,
    CanaryCheckError,
    CanaryTarget,
    evaluate_gate,
)
from ansible_collections.onprem.mesh.plugins.module_utils.k8s_client import K8S_AUTH_ARGSPEC, K8sError, build_api_client


def argument_spec():
    spec = dict(K8S_AUTH_ARGSPEC)
    spec.update(CHECKS_ARGSPEC)
    spec.update(
        namespace=dict(type="str"),
        workload=dict(type="str"),
        version=dict(type="str"),
        stable_version=dict(type="str"),
        service_host=dict(type="str"),
        fail_on_verdict=dict(type="bool", default=True),
    )
    return spec


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    params = module.params
    target = CanaryTarget(params["namespace"], params["workload"], version=params["version"],
                          stable_version=params["stable_version"], host=params["service_host"])
    api_client = None
    if any(c["type"] in K8S_TYPES for c in params["checks"] or []):
        if not HAS_K8S:
            module.fail_json(msg=missing_required_lib("kubernetes"), exception=to_native(K8S_IMPORT_ERROR))
        try:
            api_client = build_api_client(params)
        except K8sError as e:
            module.fail_json(msg=to_native(e))
    try:
        gate = evaluate_gate(dict((k, params[k]) for k in CHECKS_ARGSPEC), target, k8s=api_client)
    except CanaryCheckError as e:
        module.fail_json(msg="invalid canary checks: %s" % to_native(e))
    if gate["verdict"] != "pass" and params["fail_on_verdict"]:
        module.fail_json(msg="canary gate verdict %s: %s" % (gate["verdict"], gate["reason"]), changed=False, **gate)
    module.exit_json(changed=False, **gate)


if __name__ == "__main__":
    main()
