#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) onprem.mesh contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: canary_rollout
short_description: Staged, health-gated canary rollout on an Istio VirtualService, with rollback, hold and resume
version_added: "0.1.0"
description:
  - Shifts traffic from the O(stable) subset to the O(canary) subset of one HTTP route of a VirtualService in
    steps (for example 5, 10, 25, 50 percent), waits O(interval) at every step, then evaluates the health
    checks (the same O(checks) as M(onprem.mesh.canary_gate)) over the window. A healthy canary gets 100%
    at the end.
  - When more analyses fail than O(failure_limit) allows, it either puts all traffic back on O(stable)
    (O(on_failure=rollback)) or freezes the weights where they are (O(on_failure=hold)). An inconclusive
    analysis is never taken as healthy.
  - Records its progress in the annotation C(mesh.onprem.io/canary-rollout) of the VirtualService. A rerun
    with the same O(canary), O(stable) and steps after the job was killed, or after a hold, resumes at the
    recorded step - it neither starts over nor jumps ahead. A promoted rollout is not run again.
  - Holds a lease in the annotation C(mesh.onprem.io/canary-lease) while it runs, renewed at every step.
    Another rollout refuses to start on the same VirtualService while the lease is held, unless O(force=true).
  - Each step costs one read and one write of the VirtualService (weights, state and lease in one JSON patch
    that begins with C(test) operations), plus the reads of O(wait_for_mesh).
  - Every other route, match, mirror, retry, timeout, header and destination of the VirtualService is left as it was.
  - Other clients may write the VirtualService while the rollout runs. Each write tests the target route's
    destinations and the rollout's two annotations as just read; if another client changed them in between, the
    API server refuses the write (HTTP 422 for a failed C(test), or 409) and the rollout reads again, checks, rebuilds
    the write and retries, up to O(conflict_retries) times. Changes to other routes, other fields and other
    annotations are kept and never stop the rollout.
  - Before every write the rollout checks that the target route's weights and its annotations are still what it
    last wrote. If another client changed them (an operator's C(kubectl edit), a GitOps sync), the rollout stops,
    says which field changed, what it found and what it had written, and follows O(on_failure) - O(on_failure=hold)
    keeps the other client's weights. Another run that takes the lease over (O(force=true)) stops this one without
    a rollback.
  - Every failure returns RV(result), RV(timeline) and RV(weights_after) (the weights in force), and its message says
    where the traffic is now.
author:
  - onprem.mesh contributors (@onprem-mesh)
extends_documentation_fragment:
  - onprem.mesh.k8s_auth
  - onprem.mesh.vs_route
  - onprem.mesh.canary_checks
attributes:
  check_mode:
    support: full
    description: Validates the objects and the schedule and returns the planned schedule; writes nothing and runs no check.
  diff_mode:
    support: full
    description: Shows the weights of the route before and after the rollout.
options:
  stable:
    description: The DestinationRule subset that serves the traffic now.
    type: str
    required: true
  canary:
    description: The DestinationRule subset being released.
    type: str
    required: true
  canary_workload:
    description:
      - Name of the canary Deployment (Istio's C(destination_workload) label). Needed by the built-in
        V(success_rate), V(latency), V(workload_ready) and V(no_restarts) checks.
    type: str
  canary_version:
    description:
      - The canary's C(version) label (Istio's C(destination_version)). Defaults to the C(version) label of the
        O(canary) subset in the DestinationRule.
    type: str
  steps:
    description:
      - The canary weights to analyse, increasing, for example V([5, 10, 25, 50]). A final V(100) is the promotion.
      - An item may also be a dictionary with C(weight) and its own C(interval).
      - "Before the weights, steps that give the canary requests while its weight stays 0, each a dictionary with its
        own C(interval) if wanted, analysed like any step:"
      - "C({mirror: N}) - a mirror step: the target route copies N percent (0 < N <= 100) of its requests to the
        canary (Istio's C(mirror) and C(mirrorPercentage)). Users get stable's answers only; the canary's are
        discarded. The gate judges the canary on the copies, before any user request reaches it. Istio reports a
        mirrored request only on the canary's inbound side (C(reporter=destination), the built-in checks' default),
        so a check with C(reporter: source) is refused for a plan with a mirror step, and a V(promql) check must count
        the canary's inbound requests. The mirror ends with its step. When the route mirrors somewhere of its own,
        that mirror goes on during the step (both become Istio's C(mirrors)) and is put back as it was afterwards."
      - "C({match: {headers: {NAME: {exact|prefix|regex: TEXT}}}}) or C({match: {cookie: NAME=VALUE}}) - a match step
        (A/B): a copy of the target route (timeouts, retries, header rules and its own mirror) named
        C(onprem-mesh-canary-match-<route name>), with the route's own match conditions ANDed with these and all of
        its traffic to the canary, is put in front of the target route. The cookie form is written the way Istio matches a cookie, a regex
        on the C(cookie) header. The match route stays through the weight steps (testers keep reaching the canary)
        until the rollout ends. Header names are lower case; quote values YAML reads as booleans (C(exact: \"true\"))."
      - Promotion and rollback remove the match route and the mirror (the route's own mirror fields back as they were);
        every other route is left byte for byte. A hold keeps them. A rerun after a kill resumes with the recorded plan,
        step kinds included (another plan is refused), and puts back what the recorded step set.
      - "Match and mirror steps come before the weight steps. A plan of them alone, for example
        V([{mirror: 10}, {match: {cookie: canary=always}}, 100]), promotes after them."
      - Mutually exclusive with O(step_weight).
    type: list
    elements: raw
  step_weight:
    description: Like Flagger's C(stepWeight) - analyse O(step_weight), twice that, and so on up to O(max_weight).
    type: int
  max_weight:
    description: The last analysed weight with O(step_weight); promotion follows. Defaults to V(50).
    type: int
  interval:
    description: How long each step runs before it is analysed, for example V(30s), V(2m).
    type: str
    default: 1m
  failure_limit:
    description: How many failed analyses are tolerated (each is repeated at the same weight) before O(on_failure).
    type: int
    default: 0
  on_failure:
    description:
      - V(rollback) puts all traffic back on O(stable). V(hold) freezes the weights, for releases whose rollback
        is unsafe; a rerun resumes at the held step.
    type: str
    choices: [rollback, hold]
    default: rollback
  wait_for_mesh:
    description:
      - After each weight change, wait until the mesh reports the new generation in the VirtualService's
        C(status.observedGeneration) before the analysis window starts. Only for a mesh that writes that field
        for every VirtualService it programs. Istio 1.30 does not. Its per-proxy distribution report is gone, and
        istiod's analysis (C(PILOT_ENABLE_ANALYSIS)) writes status only for resources it has messages about, so
        with a current Istio the wait times out and the step fails. Leave it off there; istiod programs the
        proxies within a second of the change (0.1 to 0.3 s measured on the project's lab), well inside O(interval).
    type: bool
    default: false
  mesh_timeout:
    description: Seconds to wait for O(wait_for_mesh).
    type: int
    default: 60
  lease_seconds:
    description: How long the lease lasts after each renewal; defaults to the step interval times (1 + O(failure_limit)) plus two minutes.
    type: int
  lease_holder:
    description: Name this run holds the lease under, for example C(awx-job-{{ tower_job_id }}); a random name by default.
    type: str
  force:
    description: Take over a lease held by another run. Use only when that run is known to be dead.
    type: bool
    default: false
  restart:
    description: Start from the first step even though the VirtualService records an unfinished or finished rollout.
    type: bool
    default: false
  probe_interval:
    description:
      - While a step runs, evaluate its Prometheus checks (V(success_rate), V(latency), V(promql)) every
        O(probe_interval) seconds too, and act on a measured threshold breach at once instead of at the end of
        the step. Missing data, low traffic and query errors in such a probe decide nothing; the full analysis
        at the end of the step does. V(0) turns probing off.
    type: int
    default: 5
  fail_on_rollback:
    description: Fail the task when the rollout ends rolled back or held (the results are returned either way).
    type: bool
    default: true
notes:
  - "RBAC: C(get) and C(patch) on C(virtualservices.networking.istio.io), C(list) on C(destinationrules.networking.istio.io);
    for workload checks C(get) on C(deployments.apps) and C(list) on C(pods), in the namespace."
seealso:
  - module: onprem.mesh.traffic_split
  - module: onprem.mesh.canary_gate
"""

EXAMPLES = r"""
- name: Release payment-service v2 in five steps, rolled back on bad health
  onprem.mesh.canary_rollout:
    name: payment
    namespace: shop
    route_name: primary
    stable: v1
    canary: v2
    canary_workload: payment-v2
    steps: [5, 10, 25, 50, 100]
    interval: 2m
    prometheus_url: http://prometheus.istio-system:9090
    analysis_window: 2m
    min_requests: 100
    checks:
      - name: success-rate
        type: success_rate
        min: 99
      - name: p99
        type: latency
        max: 500
      - name: ready
        type: workload_ready
  register: rollout

- name: Hand the timeline to an AWX workflow
  ansible.builtin.set_stats:
    data:
      canary_timeline: "{{ rollout.timeline }}"

- name: Mirror, then testers by header, then users by weight
  onprem.mesh.canary_rollout:
    name: payment
    namespace: shop
    route_name: primary
    stable: v1
    canary: v2
    canary_workload: payment-v2
    steps:
      - mirror: 20            # 20 % of the route's requests copied to v2; users see v1's answers only
        interval: 5m
      - match:                # requests with x-canary: true go to v2, in a route of their own in front of primary
          headers:
            x-canary: {exact: "true"}
      - 10                    # then 10 % of the other requests (x-canary: true keeps going to v2)
      - 50
      - 100                   # promotion: the match route and the mirror removed
    interval: 2m
    prometheus_url: http://prometheus.istio-system:9090
    checks:
      - name: success-rate
        type: success_rate
        min: 99

- name: A/B by cookie before any weight
  onprem.mesh.canary_rollout:
    name: payment
    namespace: shop
    stable: v1
    canary: v2
    canary_workload: payment-v2
    steps:
      - match: {cookie: canary=always}
      - 25
      - 100
    prometheus_url: http://prometheus.istio-system:9090
    checks:
      - name: success-rate
        type: success_rate
        min: 99

- name: Show the schedule without changing anything
  onprem.mesh.canary_rollout:
    name: payment
    namespace: shop
    stable: v1
    canary: v2
    step_weight: 10
    max_weight: 50
    interval: 1m
    on_failure: hold
    prometheus_url: http://prometheus:9090
    checks:
      - name: success-rate
        type: success_rate
        min: 99.5
  check_mode: true
"""

RETURN = r"""
result:
  description:
    - V(promoted), V(rolled_back), V(held), or V(planned) in check mode.
    - On a failure that is no rollback or hold - V(not_started) when this run wrote nothing (the lease held by another
      run, an unknown subset, a refused first write), V(stopped) when it stopped after writing without a rollback or
      hold (the rollback could not be written, for example after a permission was revoked, or another run took over).
  returned: always, once the VirtualService was read
  type: str
  sample: promoted
reason:
  description:
    - Why the rollout was rolled back, held or stopped, with the failing checks and their values; for a change by
      another client, the field, what was found and what the rollout had written.
  returned: when rolled back, held or stopped
  type: str
  sample: >-
    another client changed VirtualService shop/payment while the rollout ran: the weights of the target route
    http[1] (name: primary) (spec.http[1].route[].weight): found v1=100, v2=0, the rollout had written v1=90, v2=10
note:
  description: Where the run started - from the first step, resumed at a recorded step, or already promoted.
  returned: success
  type: str
  sample: resuming progressing at step 3 (weight 25), as recorded
weights_before:
  description: Subset weights of the route when the run started.
  returned: always, once the VirtualService was read
  type: dict
  sample: {"v1": 100, "v2": 0}
weights_after:
  description:
    - Subset weights of the route when the run ended - on a failure, the weights in force (or, when the
      VirtualService could not be read any more, the ones this run last wrote; the message says which).
  returned: always, once the VirtualService was read
  type: dict
  sample: {"v1": 0, "v2": 100}
schedule:
  description:
    - The planned steps from where this run starts, with weights and intervals (seconds), then the promotion.
    - A mirror step's row has C(mirror) (the percentage), a match step's C(match) (Istio's match, C(headers)); their C(weight) is 0.
  returned: success, and failures after the plan was made
  type: list
  elements: dict
planned_seconds:
  description: In check mode, the sum of the planned intervals.
  returned: check mode
  type: float
timeline:
  description:
    - One entry per analysed step, then the final action - step, weight, weights, started, mesh_ready, ended,
      seconds, verdict, checks (every check with its query, value, threshold and verdict), action, api_calls.
    - C(conflicts) - how many of the step's writes were refused because another client wrote first, and retried.
    - C(mirror) or C(match) - on a mirror or match step, what it set (its C(weight) is 0).
    - C(concurrent_change) - on the step whose write found the rollout's own fields changed by another client,
      each field with what was C(found) and C(expected).
  returned: always, once the VirtualService was read
  type: list
  elements: dict
failures:
  description: Failed analyses during this run.
  returned: when the rollout ran
  type: int
holder:
  description: The name this run held the lease under.
  returned: always, once the VirtualService was read
  type: str
api_calls:
  description: Calls made to the API server for the VirtualService and DestinationRules, by kind.
  returned: always, once the VirtualService was read
  type: dict
  sample: {"read": 7, "write": 5}
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.onprem.mesh.plugins.module_utils.canary_checks import CHECKS_ARGSPEC, CanaryCheckError, CanaryGate, CanaryTarget
from ansible_collections.onprem.mesh.plugins.module_utils.k8s_client import (
    HAS_K8S, K8S_AUTH_ARGSPEC, K8S_IMP_ERR, IstioObjects, K8sError, build_api_client)
from ansible_collections.onprem.mesh.plugins.module_utils.rollout import Rollout, check_stable_and_canary, outcome_message, plan_steps, probe_checks
from ansible_collections.onprem.mesh.plugins.module_utils.traffic import VS_ROUTE_ARGSPEC, TrafficError, WeightChange, default_host, subset_labels
from ansible_collections.onprem.mesh.plugins.module_utils.rollout import check_plan


def argument_spec():
    spec = dict(K8S_AUTH_ARGSPEC)
    spec.update(CHECKS_ARGSPEC)
    spec.update(VS_ROUTE_ARGSPEC)
    spec.update(
        stable=dict(type="str", required=True),
        canary=dict(type="str", required=True),
        canary_workload=dict(type="str"),
        canary_version=dict(type="str"),
        steps=dict(type="list", elements="raw"),
        step_weight=dict(type="int"),
        max_weight=dict(type="int"),
        interval=dict(type="str", default="1m"),
        failure_limit=dict(type="int", default=0),
        on_failure=dict(type="str", default="rollback", choices=["rollback", "hold"]),
        wait_for_mesh=dict(type="bool", default=False),
        mesh_timeout=dict(type="int", default=60),
        lease_seconds=dict(type="int"),
        lease_holder=dict(type="str"),
        force=dict(type="bool", default=False),
        restart=dict(type="bool", default=False),
        probe_interval=dict(type="int", default=5),
        fail_on_rollback=dict(type="bool", default=True),
    )
    return spec


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True,
                           mutually_exclusive=[("route_name", "route_index"), ("steps", "step_weight")],
                           required_one_of=[("steps", "step_weight")])
    if not HAS_K8S:
        module.fail_json(msg=missing_required_lib("kubernetes"), exception=K8S_IMP_ERR)
    p = module.params
    if not p["checks"]:
        module.fail_json(msg="checks: a rollout needs at least one health check (success_rate, latency, promql, workload_ready,"
                             " no_restarts or http); without one every step would pass unseen")
    store = None
    try:
        plan = plan_steps(p["steps"], p["step_weight"], p["max_weight"], p["interval"])
        api_client = build_api_client(p)
        store = IstioObjects(api_client)
        change = WeightChange(store, p["namespace"], p["name"], host=p["service_host"], route_name=p["route_name"],
                              route_index=p["route_index"], retries=p["conflict_retries"])
        vs = change.read()
        check_stable_and_canary(change, vs, p["stable"], p["canary"])
        check_plan(plan, p["checks"], change, vs, p["canary"])  # match and mirror steps against the route and the checks
        host = default_host(vs, p["service_host"])
        version = p["canary_version"] or subset_labels(change.destination_rules, host, p["namespace"], p["canary"]).get("version")
        stable_version = subset_labels(change.destination_rules, host, p["namespace"], p["stable"]).get("version")
        target = CanaryTarget(p["namespace"], p["canary_workload"], version=version, stable_version=stable_version, host=host)
        check_params = dict((k, p[k]) for k in CHECKS_ARGSPEC)
        gate = CanaryGate(check_params, target, k8s=api_client)
        probe_params = probe_checks(check_params)
        probe = CanaryGate(probe_params, target, k8s=api_client) if probe_params["checks"] and p["probe_interval"] > 0 else None
        rollout = Rollout(change, gate, p["stable"], p["canary"], plan, on_failure=p["on_failure"], failure_limit=p["failure_limit"],
                          wait_for_mesh=p["wait_for_mesh"], mesh_timeout=p["mesh_timeout"], lease_seconds=p["lease_seconds"],
                          force=p["force"], restart=p["restart"], holder=p["lease_holder"], log=module.log,
                          probe=probe, probe_every=p["probe_interval"])
        result = rollout.run(check_mode=module.check_mode)
    except CanaryCheckError as exc:
        module.fail_json(msg="invalid canary checks: %s" % exc)
    except (TrafficError, K8sError) as exc:
        # once the VirtualService was read: result (not_started, stopped, rolled_back, held), timeline, weights in force
        extra = dict(getattr(exc, "result", None) or {})
        if extra and store is not None:
            extra["api_calls"] = store.calls
        module.fail_json(msg=str(exc), **extra)
    result["api_calls"] = store.calls
    if module._diff and result["changed"]:
        result["diff"] = dict(before={"weights": result["weights_before"]}, after={"weights": result["weights_after"]})
    if result["result"] in ("rolled_back", "held") and p["fail_on_rollback"]:
        module.fail_json(msg=outcome_message(result, p["canary"]), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
