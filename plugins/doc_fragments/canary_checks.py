# -*- coding: utf-8 -*-
# Copyright: onprem.mesh contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Options of the canary health checks, shared by canary_gate and canary_rollout (module_utils/canary_checks.py)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment:

    DOCUMENTATION = r"""
options:
  prometheus_url:
    description:
      - Base URL of the Prometheus that scrapes the Istio telemetry, for example V(http://prometheus.istio-system:9090).
      - The checks run instant queries with C(GET <prometheus_url>/api/v1/query).
      - Required when O(checks) has a check of type V(success_rate), V(latency) or V(promql).
    type: str
  prometheus_validate_certs:
    description:
      - Verify the TLS certificate of O(prometheus_url).
    type: bool
    default: true
  prometheus_headers:
    description:
      - HTTP headers sent with every Prometheus query, for example C(Authorization) with a bearer token.
      - The values are not logged.
    type: dict
  prometheus_timeout:
    description:
      - Seconds to wait for one Prometheus answer.
    type: int
    default: 10
  checks:
    description:
      - The health checks. The gate passes only when every check passes.
      - An empty list is an error, not a pass.
      - Checks that are V(inconclusive) are retried every O(retry_interval) seconds for at most
        O(retry_inconclusive_for) seconds; then they count as O(on_still_inconclusive).
      - A check that fails ends the gate at once.
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description:
          - A unique name for the check, used in results and messages.
        type: str
        required: true
      type:
        description:
          - V(success_rate) - percent of requests to the canary that did not answer 5xx, from C(istio_requests_total)
            (C(sum(rate(...non-5xx...)) / sum(rate(...)) * 100)) for the canary's C(destination_workload_namespace),
            C(destination_workload) and, when the target has a version, C(destination_version). A canary that only
            answered 5xx measures 0, not an empty result. Needs O(checks[].min).
          - V(latency) - a quantile (O(checks[].quantile), p99 by default) of C(istio_request_duration_milliseconds_bucket)
            with C(histogram_quantile(q, sum by (le) (rate(...)))), in milliseconds. Needs O(checks[].max).
          - V(promql) - a custom PromQL O(checks[].query) compared with O(checks[].min) and/or O(checks[].max).
            When it returns several series, every series must meet the threshold and the worst one is reported.
          - V(workload_ready) - the canary Deployment has O(checks[].min_available) available replicas or, without it,
            all of C(spec.replicas) available and updated. Needs a Kubernetes connection.
          - V(no_restarts) - no container of the canary's pods restarted during the analysis window (more than
            O(checks[].max) times, 0 by default). Needs a Kubernetes connection.
          - V(http) - O(checks[].url) answers with a 2xx status, and JSON that contains O(checks[].expect_json) when given.
        type: str
        required: true
        choices: [success_rate, latency, promql, workload_ready, no_restarts, http]
      min:
        description:
          - Lowest passing value (inclusive). For V(success_rate) a percentage, for example V(99).
          - For V(promql), O(checks[].min), O(checks[].max) or both.
        type: float
      max:
        description:
          - Highest passing value (inclusive). For V(latency) milliseconds, for example V(500).
          - For V(no_restarts) the restarts allowed in the window (default 0). For V(promql) see O(checks[].min).
        type: float
      query:
        description:
          - For V(promql), the PromQL instant query. Placeholders C({{ namespace }}), C({{ workload }}),
            C({{ version }}), C({{ window }}), C({{ stable_version }}) and C({{ host }}) are replaced by the target's
            values (escaped for a double-quoted label matcher) and the analysis window (O(analysis_window), or the
            shorter range since the step began in M(onprem.mesh.canary_rollout)).
          - In a playbook, mark the query C(!unsafe) so that Ansible does not template the placeholders itself.
        type: str
      quantile:
        description:
          - For V(latency), the quantile between 0 and 1. The default is V(0.99) (p99).
        type: float
      reporter:
        description:
          - For V(success_rate), V(latency) and V(promql), which Istio proxy's report to use (the C(reporter) label).
            The default is V(destination), the canary's own sidecar.
        type: str
        choices: [destination, source]
      min_requests:
        description:
          - Requests the canary must have answered during the window for the check to be judged
            (C(sum(increase(istio_requests_total{...}[window])))); below it O(checks[].on_low_traffic) applies.
          - Defaults to O(min_requests) for V(success_rate) and V(latency); V(promql) checks only look at traffic
            when this is set.
        type: int
      min_available:
        description:
          - For V(workload_ready), the available replicas needed. Without it, all of C(spec.replicas) must be
            available and updated, and a Deployment scaled to 0 fails.
        type: int
      url:
        description:
          - For V(http), the URL to call. The placeholders of O(checks[].query) work here too.
        type: str
      method:
        description:
          - For V(http), the HTTP method. The default is V(GET).
        type: str
      body:
        description:
          - For V(http), the request body. A dict or list is sent as JSON.
        type: raw
      headers:
        description:
          - For V(http), request headers. The values are not logged.
        type: dict
      expect_json:
        description:
          - For V(http), a JSON value the answer must contain. Dicts match when every given key matches (recursively),
            lists when every given element matches some element of the answer, other values when equal.
        type: raw
      validate_certs:
        description:
          - For V(http), verify the TLS certificate. The default is V(true).
        type: bool
      timeout:
        description:
          - For V(http), seconds to wait for the answer. The default is V(10).
        type: int
      on_no_data:
        description:
          - This check's verdict when the query returns no series (or no pod matches); overrides O(on_no_data).
        type: str
        choices: [fail, pass, inconclusive]
      on_nan:
        description:
          - This check's verdict when the query returns NaN; overrides O(on_nan).
        type: str
        choices: [fail, pass, inconclusive]
      on_error:
        description:
          - This check's verdict when Prometheus, the Kubernetes API or the URL cannot be read; overrides O(on_error).
        type: str
        choices: [fail, pass, inconclusive]
      on_low_traffic:
        description:
          - This check's verdict when fewer than the minimum requests were seen; overrides O(on_low_traffic).
        type: str
        choices: [fail, pass, inconclusive]
  analysis_window:
    description:
      - The PromQL range the metrics are computed over, for example V(1m), V(30s), V(2m30s).
      - The queries look back from the moment they run. M(onprem.mesh.canary_gate) always looks back the whole window.
        M(onprem.mesh.canary_rollout) looks back no further than the moment the step's weight took effect (after its write,
        and after C(wait_for_mesh) when set). The range is O(analysis_window) or the time since then, rounded down to
        whole seconds (milliseconds under one second), whichever is shorter. This applies to the step's analysis, to its
        retries and to its probes, so a step is judged only on its own traffic. Make a step's interval several of
        Prometheus's scrape intervals long, or its queries find no data.
      - For V(no_restarts) without a baseline, restarts during the last O(analysis_window) count.
    type: str
    default: 1m
  min_requests:
    description:
      - Requests the canary must have answered in O(analysis_window) before V(success_rate) and V(latency) are judged.
      - V(0) turns the traffic guard off.
    type: int
    default: 10
  retry_inconclusive_for:
    description:
      - Seconds to keep retrying inconclusive checks (at most 3600). V(0) evaluates once.
    type: int
    default: 60
  retry_interval:
    description:
      - Seconds between retries of inconclusive checks.
    type: int
    default: 10
  on_no_data:
    description:
      - Verdict when a query returns an empty result (no series), or no pod matches the canary.
      - V(pass) makes missing telemetry look healthy; choose it only on purpose.
    type: str
    default: inconclusive
    choices: [fail, pass, inconclusive]
  on_nan:
    description:
      - Verdict when a query returns NaN (for example 0/0 when the canary had no requests in the window).
    type: str
    default: inconclusive
    choices: [fail, pass, inconclusive]
  on_error:
    description:
      - Verdict when Prometheus is unreachable or answers an error other than HTTP 400, when the Kubernetes API
        cannot be read, or when an V(http) check gets no answer.
      - A query that Prometheus rejects with HTTP 400 (bad PromQL) always fails, without retries.
    type: str
    default: inconclusive
    choices: [fail, pass, inconclusive]
  on_low_traffic:
    description:
      - Verdict when the canary answered fewer requests than O(min_requests) (or O(checks[].min_requests)).
    type: str
    default: inconclusive
    choices: [fail, pass, inconclusive]
  on_still_inconclusive:
    description:
      - What a check that is still inconclusive after O(retry_inconclusive_for) seconds becomes.
      - V(inconclusive) makes the gate's verdict V(inconclusive), which is still not a pass.
    type: str
    default: fail
    choices: [fail, inconclusive]
"""
