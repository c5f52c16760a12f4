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
  - "Cancel and kill: SIGTERM, SIGINT (Ctrl-C) and SIGHUP end the rollout by O(on_cancel) within seconds - all traffic
    back on O(stable), or the weights held - with the lease released and the reason recorded. When the
    C(ansible-playbook) that runs the task dies (C(kill -9)), the module notices within a second (the chain of
    processes that started it, up to C(ansible-playbook) or the C(sshd) session) and does the same: no traffic shift
    happens without a living job. ansible-runner's cancel (what AWX's cancel button leads to) kills
    C(ansible-playbook)'s process group with SIGKILL, which is such a death. When the module process itself is killed
    outright (SIGKILL, the OOM killer), a small guardian process the module started in a session of its own does it.
    Only a kill of everything at once (a deleted execution environment pod, a lost host) leaves the lease to expire;
    a rerun then resumes at the recorded step, and M(onprem.mesh.canary_command) aborts or promotes it by hand."
  - Operator commands - M(onprem.mesh.canary_command) posts V(abort), V(pause), V(resume) or V(promote) to the
    running rollout in the annotation C(mesh.onprem.io/canary-command); the rollout looks for it every
    O(command_interval) seconds. V(abort) puts all traffic on O(stable) (RV(result=aborted)), V(promote) gives the
    canary 100 % now (recorded as a manual promotion), V(pause) keeps the current step's weights until V(resume)
    (the step then starts again, with a fresh analysis window) or O(pause_timeout) (then a hold).
  - Before the canary gets its first traffic, a preflight (O(preflight)) checks that the checks could judge it at all.
    Prometheus must answer. Every V(success_rate), V(latency) and V(promql) query, aimed at the stable (O(stable_workload)
    and the stable's C(version) label), must be valid PromQL and return a value over O(analysis_window) with at least
    the check's minimum requests. The canary's Deployment (O(canary_workload)) must have ready pods, as a
    V(workload_ready) check sees them. The O(canary) subset must be in the DestinationRule, which is checked on every
    run. If anything fails, the run writes nothing at all. The canary keeps 0 %, RV(result) is V(not_started), and
    the message names the failed check, why it failed and how to fix it. A run that finds the canary already
    carrying traffic (resuming a killed or held run) skips the preflight. The analysis of its step judges the canary,
    and O(on_failure) applies.
  - Each step is judged on its own traffic only. Its queries look back no further than the moment its weight took
    effect (after the write, and after O(wait_for_mesh) when set). The step's probes and retries do the same. The
    range is O(analysis_window) or the time since that moment, whichever is shorter.
author:
  - onprem.mesh contributors (@onprem-mesh)
extends_documentation_fragment:
  - onprem.mesh.k8s_auth
  - onprem.mesh.vs_route
  - onprem.mesh.canary_checks
attributes:
  check_mode:
    support: full
    description:
      - Validates the objects and the schedule, runs the preflight (it only reads), and returns the planned schedule
        with the preflight's report in RV(preflight). Writes nothing and runs no step's analysis.
      - A failed preflight fails the task as the real run would, with RV(result=not_started).
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
  stable_workload:
    description:
      - Name of the stable Deployment (Istio's C(destination_workload) for the O(stable) subset). The preflight
        aims the checks' queries at it, and C({{ workload }}) in a V(promql) query stands for it there.
      - Defaults to O(canary_workload) with its version suffix replaced by the stable's version. For example,
        C(payment-v2) with version C(v2) and a stable C(v1) gives C(payment-v1). When O(canary_workload) does not end
        with its version, the stable's queries select the namespace and the stable's version label only.
    type: str
  preflight:
    description:
      - Check, before the canary's first traffic, that the health checks could judge it (see the description).
        A failure ends the run with RV(result=not_started) and nothing written.
      - V(false) skips the preflight. The first step then starts even when Prometheus is down. The step's analysis
        finds that out only after the canary has had its share for O(interval), and after O(retry_inconclusive_for).
    type: bool
    default: true
  preflight_low_traffic:
    description:
      - What the preflight does when a query aimed at the stable finds too little to measure. That is fewer requests
        than the check's minimum over O(analysis_window) (O(checks[].min_requests), else O(min_requests) for
        V(success_rate) and V(latency)), an empty result or NaN.
      - V(fail) refuses the rollout. If the stable, which has all the traffic, is too quiet, the canary at a step's share
        would be quieter still and could not be judged either. V(fail) also catches a misspelled metric or label name.
        Before it refuses, the quiet query is asked again every O(retry_interval) for O(retry_inconclusive_for) seconds,
        as a step's analysis retries an inconclusive check (traffic that paused a moment, Prometheus a scrape behind).
      - V(skip) reports those checks as V(skipped) (with a warning) and starts, for a service that is quiet now. An
        invalid query (HTTP 400), an unreachable Prometheus and a canary without ready pods still refuse.
    type: str
    choices: [fail, skip]
    default: fail
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
    description: Fail the task when the rollout ends rolled back, held or aborted (the results are returned either way).
    type: bool
    default: true
  on_cancel:
    description:
      - What a cancel does (SIGTERM, SIGINT, SIGHUP, AWX's cancel, or the death of the job that ran the task) - V(rollback)
        puts all traffic back on O(stable), V(hold) keeps the weights where they are (a rerun resumes at that step).
        Either way the lease is released, so the next run is not refused.
    type: str
    choices: [rollback, hold]
    default: rollback
  command_interval:
    description: Seconds between two looks at the VirtualService for an operator's command (M(onprem.mesh.canary_command)) or a
      takeover, while a step runs. Each look is one read.
    type: int
    default: 5
  pause_timeout:
    description: Seconds a paused rollout waits for V(resume), V(abort) or V(promote) before it ends held (weights kept, lease released).
    type: int
    default: 3600
notes:
  - "RBAC: C(get) and C(patch) on C(virtualservices.networking.istio.io), C(list) on C(destinationrules.networking.istio.io);
    for workload checks C(get) on C(deployments.apps) and C(list) on C(pods), and for the preflight with O(canary_workload)
    C(get) on C(deployments.apps), in the namespace."
seealso:
  - module: onprem.mesh.traffic_split
  - module: onprem.mesh.canary_gate
  - module: onprem.mesh.canary_command
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
    - V(aborted) after an operator's abort (M(onprem.mesh.canary_command)); V(cancelled) after a cancel or the death of the
      job (RV(on_cancel) says whether it rolled back or held).
    - On a failure that is no rollback or hold - V(not_started) when this run wrote nothing (the lease held by another
      run, an unknown subset, a failed preflight, a refused first write), V(stopped) when it stopped after writing
      without a rollback or hold (the rollback could not be written, for example after a permission was revoked, or
      another run took over).
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
on_cancel:
  description: After a cancel, what was done - V(rollback) or V(hold).
  returned: when cancelled
  type: str
promoted_by:
  description: After an operator's promote command, its id, who sent it (C(by)), when (C(at)) and why (C(reason)).
  returned: when promoted by hand
  type: dict
preflight:
  description:
    - What the preflight found before the canary's first traffic (also in check mode). It is returned with
      C(verdict=skipped) and no checks when the canary already had traffic. It is not returned with O(preflight=false)
      or when the rollout was already promoted.
  returned: when the preflight ran or was skipped, on success and on failure
  type: dict
  contains:
    verdict:
      description: V(pass), V(fail), or V(skipped) (the canary already had traffic).
      type: str
      sample: fail
    reason:
      description: The failed checks, each with its reason and fix; or how many passed and were skipped.
      type: str
      sample: >-
        prometheus (prometheus, http://prometheus:9090): Prometheus at prometheus_url http://prometheus:9090 is unreachable:
        [Errno 111] Connection refused; fix: start Prometheus or correct prometheus_url (and prometheus_headers,
        prometheus_validate_certs), then rerun
    checks:
      description:
        - One item per preflight check. C(prometheus) (Prometheus answers), then one per V(success_rate), V(latency) and
          V(promql) check with the name of that check (its query aimed at the stable), then C(canary-pods).
        - Each has C(name), C(type), C(target) (V(stable), V(canary), or the Prometheus URL), C(verdict) (V(pass),
          V(fail) or V(skipped)) and C(reason). Failed items have C(fix). Query items have C(query), C(value) (the
          stable's, not compared with the canary's threshold) and C(requests), and C(attempts) when a quiet query was
          asked more than once. C(canary-pods) has C(value) (available replicas) and C(threshold).
      type: list
      elements: dict
      sample:
        - {name: prometheus, type: prometheus, target: "http://prometheus:9090", verdict: pass, query: "1",
           reason: "Prometheus at http://prometheus:9090 answers queries"}
        - {name: success-rate, type: success_rate, target: stable, verdict: pass, value: 99.9, requests: 5400.0,
           query: "(sum(rate(istio_requests_total{...}[1m])) ...", reason: "answers for the stable shop/payment-v1 (version v1): 99.9 % ..."}
        - {name: canary-pods, type: workload_ready, target: canary, verdict: pass, value: 2, threshold: "== 2 (spec.replicas)",
           reason: "Deployment shop/payment-v2 has 2/2 replicas available and updated"}
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
from ansible_collections.onprem.mesh.plugins.module_utils.canary_checks import (
    CHECKS_ARGSPEC, PREFLIGHT_LOW_TRAFFIC, CanaryCheckError, CanaryGate, CanaryTarget, stable_workload_name)
from ansible_collections.onprem.mesh.plugins.module_utils.k8s_client import (
    HAS_K8S, K8S_AUTH_ARGSPEC, K8S_IMP_ERR, IstioObjects, K8sError, build_api_client)
from ansible_collections.onprem.mesh.plugins.module_utils.job_watch import Guardian, JobWatch, cancel_on_signals, restore
from ansible_collections.onprem.mesh.plugins.module_utils.rollout import (
    Cancelled, Rollout, check_stable_and_canary, outcome_message, plan_steps, probe_checks)
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
        stable_workload=dict(type="str"),
        preflight=dict(type="bool", default=True),
        preflight_low_traffic=dict(type="str", default="fail", choices=list(PREFLIGHT_LOW_TRAFFIC)),
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
        on_cancel=dict(type="str", default="rollback", choices=["rollback", "hold"]),
        command_interval=dict(type="int", default=5),
        pause_timeout=dict(type="int", default=3600),
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
    for field in ("command_interval", "pause_timeout"):
        if p[field] < 1:
            module.fail_json(msg="%s: a number of seconds of 1 or more, got %s" % (field, p[field]))
    store = None
    guardian = None
    signals = None

    def connect():
        api = build_api_client(p)
        return api, WeightChange(IstioObjects(api), p["namespace"], p["name"], host=p["service_host"], route_name=p["route_name"],
                                 route_index=p["route_index"], retries=p["conflict_retries"])

    try:
        plan = plan_steps(p["steps"], p["step_weight"], p["max_weight"], p["interval"])
        api_client, change = connect()
        store = change.store
        vs = change.read()
        check_stable_and_canary(change, vs, p["stable"], p["canary"])
        check_plan(plan, p["checks"], change, vs, p["canary"])  # match and mirror steps against the route and the checks
        host = default_host(vs, p["service_host"])
        version = p["canary_version"] or subset_labels(change.destination_rules, host, p["namespace"], p["canary"]).get("version")
        stable_version = subset_labels(change.destination_rules, host, p["namespace"], p["stable"]).get("version")
        target = CanaryTarget(p["namespace"], p["canary_workload"], version=version, stable_version=stable_version, host=host)
        stable = CanaryTarget(p["namespace"], p["stable_workload"] or stable_workload_name(p["canary_workload"], version, stable_version),
                              version=stable_version, stable_version=stable_version, host=host)
        check_params = dict((k, p[k]) for k in CHECKS_ARGSPEC)
        gate = CanaryGate(check_params, target, k8s=api_client)
        preflight = (lambda: gate.preflight(stable, low_traffic=p["preflight_low_traffic"])) if p["preflight"] else None
        probe_params = probe_checks(check_params)
        probe = CanaryGate(probe_params, target, k8s=api_client) if probe_params["checks"] and p["probe_interval"] > 0 else None
        rollout = Rollout(change, gate, p["stable"], p["canary"], plan, on_failure=p["on_failure"], failure_limit=p["failure_limit"],
                          wait_for_mesh=p["wait_for_mesh"], mesh_timeout=p["mesh_timeout"], lease_seconds=p["lease_seconds"],
                          force=p["force"], restart=p["restart"], holder=p["lease_holder"], log=module.log,
                          probe=probe, probe_every=p["probe_interval"], on_cancel=p["on_cancel"],
                          command_every=p["command_interval"], pause_timeout=p["pause_timeout"])
        if not module.check_mode:
            rollout.alive, rollout.tick = JobWatch().gone, 1.0

            def abandoned(reason):  # in the guardian, after the module was killed: a client of its own
                rollout.change = connect()[1]
                rollout.abandoned(reason)

            guardian = Guardian(abandoned)
            guardian.start()
            signals = cancel_on_signals(Cancelled)
        result = rollout.run(check_mode=module.check_mode, preflight=preflight)
        if signals is not None:
            restore(signals)
            signals = None
    except CanaryCheckError as exc:
        module.fail_json(msg="invalid canary checks: %s" % exc)
    except Cancelled as exc:  # before the rollout began, or after it ended: nothing of it to undo
        module.fail_json(msg="cancelled (%s) outside the rollout's steps; nothing was undone" % exc.reason)
    except (TrafficError, K8sError) as exc:
        # once the VirtualService was read: result (not_started, stopped, rolled_back, held), timeline, weights in force
        extra = dict(getattr(exc, "result", None) or {})
        if extra and store is not None:
            extra["api_calls"] = store.calls
        module.fail_json(msg=str(exc), **extra)
    finally:
        if signals is not None:
            restore(signals)
        if guardian is not None:
            guardian.done()
    result["api_calls"] = store.calls
    for item in (result.get("preflight") or {}).get("checks", []):
        if item["verdict"] == "skipped":
            module.warn("preflight: %s skipped: %s" % (item["name"], item["reason"]))
    if module._diff and result["changed"]:
        result["diff"] = dict(before={"weights": result["weights_before"]}, after={"weights": result["weights_after"]})
    if result["result"] in ("rolled_back", "held", "aborted") and p["fail_on_rollback"]:
        module.fail_json(msg=outcome_message(result, p["canary"]), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
