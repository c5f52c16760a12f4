# -*- coding: utf-8 -*-
# Copyright: onprem.mesh contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Health-check engine for canary releases: Prometheus (Istio telemetry), workload state, HTTP probes.

Plain Python: no AnsibleModule, no cluster needed. Every outside dependency is injectable:

    baseline = take_baseline(params, target, k8s=reader)          # at the start of a step's window
    ...                                                              # traffic flows for the window
    gate = evaluate_gate(params, target, k8s=reader, window_start=baseline)   # at its end
    gate["verdict"]  # "pass" | "fail" | "inconclusive"

params   the module parameters that CHECKS_ARGSPEC describes (defaults filled in when missing)
target   a CanaryTarget or a dict with namespace, workload, version, stable_version, host
k8s      None, a kubernetes.client.ApiClient, or any object with read_deployment(namespace, name) -> dict
         and list_pods(namespace, label_selector) -> list of dicts (the Kubernetes JSON shape, camelCase)
http     None or a transport callable (see prometheus.py): used for Prometheus and for http checks
prometheus  None or an object with query(promql) -> [(labels, float)] raising PrometheusError

Safety rules: an empty result, NaN, a query error, too little traffic are never a pass unless the user chose
"pass" for that policy; inconclusive checks are retried for at most retry_inconclusive_for seconds and then
become fail (on_still_inconclusive); a PromQL that Prometheus rejects (HTTP 400) fails at once.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import datetime
import json
import math
import re
import time

from ansible.module_utils.common.text.converters import to_bytes, to_native, to_text
from ansible_collections.onprem.mesh.plugins.module_utils.k8s_client import attempts_note
from ansible_collections.onprem.mesh.plugins.module_utils.prometheus import (
    PrometheusClient,
    PrometheusError,
    TransportError,
    urls_transport,
)

try:
    from kubernetes import client as k8s_client_lib
    from kubernetes.client.exceptions import ApiException
    HAS_K8S = True
    K8S_IMPORT_ERROR = None
except ImportError as _e:  # pragma: no cover - depends on the controller
    k8s_client_lib = None
    ApiException = None
    HAS_K8S = False
    K8S_IMPORT_ERROR = _e

PASS = "pass"
FAIL = "fail"
INCONCLUSIVE = "inconclusive"
POLICY_CHOICES = [FAIL, PASS, INCONCLUSIVE]
POLICY_NAMES = ("on_no_data", "on_nan", "on_error", "on_low_traffic")
CHECK_TYPES = ["success_rate", "latency", "promql", "workload_ready", "no_restarts", "http"]
PROMETHEUS_TYPES = ("success_rate", "latency", "promql")
K8S_TYPES = ("workload_ready", "no_restarts")
PLACEHOLDERS = ("namespace", "workload", "version", "window", "stable_version", "host")
MAX_RETRY_SECONDS = 3600

CHECK_OPTIONS = dict(
    name=dict(type="str", required=True),
    type=dict(type="str", required=True, choices=CHECK_TYPES),
    min=dict(type="float"),
    max=dict(type="float"),
    query=dict(type="str"),
    quantile=dict(type="float"),
    reporter=dict(type="str", choices=["destination", "source"]),
    min_requests=dict(type="int"),
    min_available=dict(type="int"),
    url=dict(type="str"),
    method=dict(type="str"),
    body=dict(type="raw"),
    headers=dict(type="dict", no_log=True),
    expect_json=dict(type="raw"),
    validate_certs=dict(type="bool"),
    timeout=dict(type="int"),
    on_no_data=dict(type="str", choices=POLICY_CHOICES),
    on_nan=dict(type="str", choices=POLICY_CHOICES),
    on_error=dict(type="str", choices=POLICY_CHOICES),
    on_low_traffic=dict(type="str", choices=POLICY_CHOICES),
)

# Merged into the argument spec of canary_gate and canary_rollout (documented by the
# onprem.mesh.canary_checks doc fragment).
CHECKS_ARGSPEC = dict(
    prometheus_url=dict(type="str"),
    prometheus_validate_certs=dict(type="bool", default=True),
    prometheus_headers=dict(type="dict", no_log=True),
    prometheus_timeout=dict(type="int", default=10),
    checks=dict(type="list", elements="dict", options=CHECK_OPTIONS, default=[]),
    analysis_window=dict(type="str", default="1m"),
    min_requests=dict(type="int", default=10),
    retry_inconclusive_for=dict(type="int", default=60),
    retry_interval=dict(type="int", default=10),
    on_no_data=dict(type="str", default=INCONCLUSIVE, choices=POLICY_CHOICES),
    on_nan=dict(type="str", default=INCONCLUSIVE, choices=POLICY_CHOICES),
    on_error=dict(type="str", default=INCONCLUSIVE, choices=POLICY_CHOICES),
    on_low_traffic=dict(type="str", default=INCONCLUSIVE, choices=POLICY_CHOICES),
    on_still_inconclusive=dict(type="str", default=FAIL, choices=[FAIL, INCONCLUSIVE]),
)

# Which per-check fields each type takes (besides name, type and the four policies).
TYPE_FIELDS = {
    "success_rate": ("min", "reporter", "min_requests"),
    "latency": ("max", "quantile", "reporter", "min_requests"),
    "promql": ("query", "min", "max", "min_requests", "reporter"),
    "workload_ready": ("min_available",),
    "no_restarts": ("max",),
    "http": ("url", "method", "body", "headers", "expect_json", "validate_certs", "timeout"),
}
COMMON_FIELDS = ("name", "type") + POLICY_NAMES

_WINDOW_RE = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
_WINDOW_PART_RE = re.compile(r"([0-9]+)(ms|s|m|h|d|w|y)")
_WINDOW_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_PLACEHOLDER_RE = re.compile(r"\{\{\s*([^{}\s]*)\s*\}\}")
_HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


class CanaryCheckError(ValueError):
    """The check specification is wrong; the message names the field and the fix."""


class K8sReadError(Exception):
    """Reading the canary workload failed; status is the HTTP status when the API answered."""

    def __init__(self, message, status=None):
        super(K8sReadError, self).__init__(message)
        self.status = status


class CanaryTarget:
    """What the built-in checks look at: the canary Deployment and its Istio labels.

    namespace       destination_workload_namespace and the Deployment's namespace
    workload        the canary Deployment name = Istio's destination_workload
    version         the canary's version label = Istio's destination_version (optional filter)
    stable_version  the stable version label (for custom queries: {{ stable_version }})
    host            the service host (for custom queries and http checks: {{ host }})
    """

    def __init__(self, namespace=None, workload=None, version=None, stable_version=None, host=None):
        self.namespace = namespace
        self.workload = workload
        self.version = version
        self.stable_version = stable_version
        self.host = host

    @classmethod
    def from_any(cls, target):
        if isinstance(target, cls):
            return target
        if isinstance(target, dict):
            unknown = set(target) - set(("namespace", "workload", "version", "stable_version", "host"))
            if unknown:
                raise CanaryCheckError("target: unknown keys %s; known: namespace, workload, version, stable_version, host"
                                       % ", ".join(sorted(unknown)))
            return cls(**target)
        raise CanaryCheckError("target must be a CanaryTarget or a dict, got %s" % type(target).__name__)

    def as_dict(self):
        return dict(namespace=self.namespace, workload=self.workload, version=self.version,
                    stable_version=self.stable_version, host=self.host)


# --------------------------------------------------------------------------------------------
# Parameters and validation
# --------------------------------------------------------------------------------------------

def window_seconds(window):
    """'1m30s' -> 90.0 (PromQL duration)."""
    return sum(int(n) * _WINDOW_UNITS[u] for n, u in _WINDOW_PART_RE.findall(window))


def step_window(window, elapsed):
    """The PromQL range of an analysis whose traffic began ``elapsed`` seconds ago (a canary step's weight took effect
    then): ``window`` (analysis_window) when that is not longer, else the time passed rounded down, so the range never
    reaches back before the start - whole seconds (``'29s'``), or milliseconds under one second (``'950ms'``, at least
    ``'1ms'``)."""
    if elapsed >= window_seconds(window):
        return window
    if elapsed >= 1:
        return "%ds" % int(elapsed)
    return "%dms" % max(1, int(elapsed * 1000))


def duration_seconds(text):
    """Seconds of a PromQL-style duration ('30s', '2m', '1m30s'), or None when the text is not one."""
    text = str(text).strip()
    return window_seconds(text) if _WINDOW_RE.match(text) else None


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def normalize_params(params):
    """Fill in CHECKS_ARGSPEC defaults for keys that are missing or None (direct callers, unit tests)."""
    out = dict(params or {})
    for key, spec in CHECKS_ARGSPEC.items():
        if out.get(key) is None and "default" in spec:
            out[key] = spec["default"]
    checks = []
    for item in out.get("checks") or []:
        if not isinstance(item, dict):
            checks.append(item)
            continue
        check = dict((k, None) for k in CHECK_OPTIONS)
        check.update(item)
        checks.append(check)
    out["checks"] = checks
    return out


def validate(params, target=None):
    """Check params (and the target when given); raise CanaryCheckError naming the field and the fix."""
    params = normalize_params(params)
    _validate_top(params)
    names = set()
    needs_prometheus = False
    for idx, check in enumerate(params["checks"]):
        where = "checks[%d]" % idx
        if not isinstance(check, dict):
            raise CanaryCheckError("%s: each check is a dict with name and type, got %r" % (where, check))
        unknown = set(check) - set(CHECK_OPTIONS)
        if unknown:
            raise CanaryCheckError("%s: unknown option(s) %s; known: %s"
                                   % (where, ", ".join(sorted(unknown)), ", ".join(sorted(CHECK_OPTIONS))))
        _validate_check(where, check, params, target)
        if check["name"] in names:
            raise CanaryCheckError("%s.name: %r is used twice; give every check its own name" % (where, check["name"]))
        names.add(check["name"])
        if check["type"] in PROMETHEUS_TYPES:
            needs_prometheus = True
    if needs_prometheus and not params.get("prometheus_url"):
        raise CanaryCheckError("prometheus_url: success_rate, latency and promql checks need it, "
                               "e.g. prometheus_url: http://prometheus.istio-system:9090")
    return params


def _validate_top(params):
    window = params.get("analysis_window")
    if not isinstance(window, str) or not _WINDOW_RE.match(window) or window_seconds(window) <= 0:
        raise CanaryCheckError("analysis_window: %r is not a PromQL duration; use e.g. '1m', '30s', '2m30s'" % (window,))
    for key in ("retry_inconclusive_for", "retry_interval", "min_requests", "prometheus_timeout"):
        value = params.get(key)
        if not _is_number(value) or value < 0:
            raise CanaryCheckError("%s: must be a whole number >= 0, got %r" % (key, value))
    if params["retry_inconclusive_for"] > MAX_RETRY_SECONDS:
        raise CanaryCheckError("retry_inconclusive_for: %s s is more than the %s s limit; a gate must end"
                               % (params["retry_inconclusive_for"], MAX_RETRY_SECONDS))
    if params["retry_interval"] < 1:
        raise CanaryCheckError("retry_interval: must be at least 1 second, e.g. retry_interval: 10")
    for key in POLICY_NAMES:
        if params.get(key) not in POLICY_CHOICES:
            raise CanaryCheckError("%s: %r is not one of %s" % (key, params.get(key), ", ".join(POLICY_CHOICES)))
    if params.get("on_still_inconclusive") not in (FAIL, INCONCLUSIVE):
        raise CanaryCheckError("on_still_inconclusive: %r is not one of fail, inconclusive" % (params.get("on_still_inconclusive"),))
    if not isinstance(params.get("checks"), list):
        raise CanaryCheckError("checks: must be a list of checks, e.g. checks: [{name: errors, type: success_rate, min: 99}]")
    if params.get("prometheus_headers") is not None and not isinstance(params["prometheus_headers"], dict):
        raise CanaryCheckError("prometheus_headers: must be a dict of header names to values")


def _validate_check(where, check, params, target):  # noqa: C901 - one branch per type, kept together
    name = check.get("name")
    if not isinstance(name, str) or not name.strip():
        raise CanaryCheckError("%s.name: every check needs a name, e.g. name: canary-errors" % where)
    ctype = check.get("type")
    if ctype not in CHECK_TYPES:
        raise CanaryCheckError("%s.type: %r is not a check type; use one of %s" % (where, ctype, ", ".join(CHECK_TYPES)))
    allowed = set(COMMON_FIELDS) | set(TYPE_FIELDS[ctype])
    for field in sorted(CHECK_OPTIONS):
        if field not in allowed and check.get(field) is not None:
            raise CanaryCheckError("%s.%s: a %s check does not take %s; it takes %s"
                                   % (where, field, ctype, field, ", ".join(TYPE_FIELDS[ctype])))
    for policy in POLICY_NAMES:
        if check.get(policy) is not None and check[policy] not in POLICY_CHOICES:
            raise CanaryCheckError("%s.%s: %r is not one of %s" % (where, policy, check[policy], ", ".join(POLICY_CHOICES)))
    for field in ("min", "max", "quantile"):
        if check.get(field) is not None and not _is_number(check[field]):
            raise CanaryCheckError("%s.%s: must be a number, got %r" % (where, field, check[field]))
    for field in ("min_requests", "min_available", "timeout"):
        if check.get(field) is not None and (not _is_number(check[field]) or check[field] < 0):
            raise CanaryCheckError("%s.%s: must be a whole number >= 0, got %r" % (where, field, check[field]))

    if ctype == "success_rate":
        if check.get("min") is None:
            raise CanaryCheckError("%s.min: success_rate check needs min (percent of non-5xx requests), e.g. min: 99" % where)
        if not 0 <= check["min"] <= 100:
            raise CanaryCheckError("%s.min: success_rate is a percentage; min must be between 0 and 100, got %s"
                                   % (where, check["min"]))
    elif ctype == "latency":
        if check.get("max") is None:
            raise CanaryCheckError("%s.max: latency check needs max (milliseconds), e.g. max: 500" % where)
        if check["max"] <= 0:
            raise CanaryCheckError("%s.max: latency max is in milliseconds and must be > 0, got %s" % (where, check["max"]))
        quantile = check.get("quantile")
        if quantile is not None and not 0 < quantile < 1:
            raise CanaryCheckError("%s.quantile: must be between 0 and 1 exclusive, e.g. quantile: 0.99 for p99, got %s"
                                   % (where, quantile))
    elif ctype == "promql":
        if not isinstance(check.get("query"), str) or not check["query"].strip():
            raise CanaryCheckError("%s.query: promql check needs a query, e.g. query: "
                                   "sum(rate(http_errors_total{namespace=\"{{ namespace }}\"}[{{ window }}]))" % where)
        if check.get("min") is None and check.get("max") is None:
            raise CanaryCheckError("%s.min: promql check needs min or max (or both) to compare the value with" % where)
        if check.get("min") is not None and check.get("max") is not None and check["min"] > check["max"]:
            raise CanaryCheckError("%s.min: min %s is greater than max %s; no value can pass" % (where, check["min"], check["max"]))
        _validate_placeholders("%s.query" % where, check["query"], target)
    elif ctype == "no_restarts":
        if check.get("max") is not None and check["max"] < 0:
            raise CanaryCheckError("%s.max: restarts allowed in the window must be >= 0, got %s" % (where, check["max"]))
    elif ctype == "http":
        if not isinstance(check.get("url"), str) or not re.match(r"^https?://", check["url"]):
            raise CanaryCheckError("%s.url: http check needs an http:// or https:// URL, e.g. url: http://{{ host }}/healthz, got %r"
                                   % (where, check.get("url")))
        _validate_placeholders("%s.url" % where, check["url"], target)
        method = check.get("method")
        if method is not None and str(method).upper() not in _HTTP_METHODS:
            raise CanaryCheckError("%s.method: %r is not an HTTP method; use one of %s" % (where, method, ", ".join(_HTTP_METHODS)))
        if check.get("headers") is not None and not isinstance(check["headers"], dict):
            raise CanaryCheckError("%s.headers: must be a dict of header names to values" % where)

    if target is not None and ctype in ("success_rate", "latency", "workload_ready", "no_restarts"):
        tgt = CanaryTarget.from_any(target)
        for field in ("namespace", "workload"):
            if not getattr(tgt, field):
                raise CanaryCheckError("%s: a %s check needs the target's %s (the canary Deployment's %s)"
                                       % (where, ctype, field, "name" if field == "workload" else field))


def _validate_placeholders(where, text, target):
    for found in _PLACEHOLDER_RE.findall(text):
        if found not in PLACEHOLDERS:
            raise CanaryCheckError("%s: unknown placeholder {{ %s }}; available: %s"
                                   % (where, found, ", ".join("{{ %s }}" % p for p in PLACEHOLDERS)))
        if target is not None and found != "window":
            tgt = CanaryTarget.from_any(target)
            if getattr(tgt, found) in (None, ""):
                raise CanaryCheckError("%s: uses {{ %s }} but the target has no %s; set it or remove the placeholder"
                                       % (where, found, found))


# --------------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------------

def promql_escape(value):
    """Escape a value for a double-quoted PromQL label matcher."""
    return to_text(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_query(template, target, window):
    """Replace {{ namespace }}, {{ workload }}, {{ version }}, {{ window }}, {{ stable_version }}, {{ host }}.

    Values are escaped for use inside double-quoted PromQL label matchers; the window is inserted as is.
    """
    tgt = CanaryTarget.from_any(target)
    values = tgt.as_dict()

    def repl(match):
        key = match.group(1)
        if key == "window":
            return window
        if key not in values:
            raise CanaryCheckError("unknown placeholder {{ %s }}; available: %s" % (key, ", ".join(PLACEHOLDERS)))
        if values[key] in (None, ""):
            raise CanaryCheckError("the query uses {{ %s }} but the target has no %s" % (key, key))
        return promql_escape(values[key])

    return _PLACEHOLDER_RE.sub(repl, template)


def istio_selector(target, reporter="destination", extra=None):
    """The label matchers that select the canary's Istio telemetry."""
    tgt = CanaryTarget.from_any(target)
    parts = ['reporter="%s"' % promql_escape(reporter),
             'destination_workload_namespace="%s"' % promql_escape(tgt.namespace)]
    if tgt.workload:  # always for the canary (validate() requires it); the stable's may be unknown (preflight)
        parts.append('destination_workload="%s"' % promql_escape(tgt.workload))
    if tgt.version:
        parts.append('destination_version="%s"' % promql_escape(tgt.version))
    if extra:
        parts.append(extra)
    return ",".join(parts)


def success_rate_query(target, window, reporter="destination"):
    """Percent of non-5xx requests; empty vector without traffic series, NaN with series but no requests.

    The "or ... * 0" makes a canary that only ever answered 5xx (no non-5xx series at all) measure 0 %, instead of an
    empty result that on_no_data could turn into a pass.
    """
    total = "sum(rate(istio_requests_total{%s}[%s]))" % (istio_selector(target, reporter), window)
    good = "sum(rate(istio_requests_total{%s}[%s]))" % (istio_selector(target, reporter, 'response_code!~"5.."'), window)
    return "(%s or %s * 0) / %s * 100" % (good, total, total)


def latency_query(target, window, quantile=0.99, reporter="destination"):
    """The quantile of request duration in milliseconds over all the canary's series (sum by le)."""
    return ("histogram_quantile(%s, sum by (le) (rate(istio_request_duration_milliseconds_bucket{%s}[%s])))"
            % (_fmt_number(quantile), istio_selector(target, reporter), window))


def request_count_query(target, window, reporter="destination"):
    """Requests the canary answered during the window."""
    return "sum(increase(istio_requests_total{%s}[%s]))" % (istio_selector(target, reporter), window)


def _fmt_number(value):
    if value is None:
        return "none"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, float) and math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if isinstance(value, float) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return "%.6g" % value


# --------------------------------------------------------------------------------------------
# Kubernetes reads
# --------------------------------------------------------------------------------------------

class K8sWorkloadReader:
    """Reads the canary Deployment and its pods with the official kubernetes client.

    Give it a kubernetes.client.ApiClient (for example the one onprem.mesh's k8s_client builds).
    Returns plain dicts in the Kubernetes JSON shape (camelCase keys).
    """

    def __init__(self, api_client):
        if not HAS_K8S:
            raise K8sReadError("the Python library 'kubernetes' is needed for workload_ready and no_restarts checks "
                               "(pip install kubernetes): %s" % K8S_IMPORT_ERROR)
        self.api_client = api_client
        self.apps = k8s_client_lib.AppsV1Api(api_client)
        self.core = k8s_client_lib.CoreV1Api(api_client)

    def _call(self, what, func, *args, **kwargs):
        try:
            obj = func(*args, **kwargs)
        except ApiException as e:
            reason = e.reason
            try:
                reason = json.loads(e.body).get("message") or reason
            except Exception:  # pylint: disable=broad-except
                pass
            raise K8sReadError("%s: Kubernetes API answered %s: %s%s" % (what, e.status, reason, attempts_note(self.api_client)), status=e.status)
        except Exception as e:  # pylint: disable=broad-except
            raise K8sReadError("%s: Kubernetes API unreachable: %s%s" % (what, to_native(e), attempts_note(self.api_client)))
        return self.api_client.sanitize_for_serialization(obj)

    def read_deployment(self, namespace, name):
        return self._call("reading Deployment %s/%s" % (namespace, name), self.apps.read_namespaced_deployment, name, namespace)

    def list_pods(self, namespace, label_selector):
        doc = self._call("listing pods in %s with selector %s" % (namespace, label_selector),
                         self.core.list_namespaced_pod, namespace, label_selector=label_selector)
        return doc.get("items") or []


def as_reader(k8s):
    """Accept a reader (has read_deployment and list_pods) or a kubernetes ApiClient."""
    if k8s is None:
        return None
    if hasattr(k8s, "read_deployment") and hasattr(k8s, "list_pods"):
        return k8s
    return K8sWorkloadReader(k8s)


def label_selector(selector):
    """A Deployment's spec.selector (matchLabels, matchExpressions) as a label selector string."""
    selector = selector or {}
    parts = ["%s=%s" % (k, v) for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In":
            parts.append("%s in (%s)" % (key, ",".join(values)))
        elif op == "NotIn":
            parts.append("%s notin (%s)" % (key, ",".join(values)))
        elif op == "Exists":
            parts.append(key)
        elif op == "DoesNotExist":
            parts.append("!%s" % key)
    return ",".join(parts)


def _parse_time(value):
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        return value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)
    text = to_text(value).strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    text = re.sub(r"\.(\d{1,6})\d*(?=[+-])", lambda m: "." + m.group(1).ljust(6, "0"), text)
    try:
        parsed = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)


def _pod_restarts(pod):
    """{container name: (restartCount, last termination time or None)} for all containers of a pod."""
    status = pod.get("status") or {}
    out = {}
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        last = ((cs.get("lastState") or {}).get("terminated") or {}).get("finishedAt")
        out[cs.get("name")] = (int(cs.get("restartCount") or 0), _parse_time(last))
    return out


def _pod_key(pod):
    meta = pod.get("metadata") or {}
    return meta.get("uid") or meta.get("name")


def _read_canary_pods(reader, tgt):
    deployment = reader.read_deployment(tgt.namespace, tgt.workload)
    selector = label_selector(((deployment.get("spec") or {}).get("selector")))
    if not selector:
        raise K8sReadError("Deployment %s/%s has no spec.selector to find its pods" % (tgt.namespace, tgt.workload))
    return selector, reader.list_pods(tgt.namespace, selector)


def _iso(epoch):
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat()


def take_baseline(params, target, k8s=None, wall_clock=time.time):
    """Record what a later evaluate_gate compares with; call it at the start of the analysis window.

    Returns {"epoch": float, "taken_at": iso, "restarts": {pod key: {"name", "containers": {name: count}}} or None,
    "error": None or a message}. Only reads pods when a no_restarts check is configured. Pass the result to
    evaluate_gate(..., window_start=baseline).
    """
    params = normalize_params(params)
    now = wall_clock()
    baseline = {"epoch": now, "taken_at": _iso(now), "restarts": None, "error": None}
    if not any(isinstance(c, dict) and c.get("type") == "no_restarts" for c in params["checks"]):
        return baseline
    tgt = CanaryTarget.from_any(target)
    try:
        reader = as_reader(k8s)
        if reader is None:
            raise K8sReadError("no Kubernetes connection was given for the no_restarts check")
        dummy, pods = _read_canary_pods(reader, tgt)
    except K8sReadError as e:
        baseline["error"] = to_native(e)
        return baseline
    restarts = {}
    for pod in pods:
        restarts[_pod_key(pod)] = {"name": (pod.get("metadata") or {}).get("name"),
                                   "containers": dict((c, v[0]) for c, v in _pod_restarts(pod).items())}
    baseline["restarts"] = restarts
    return baseline


# --------------------------------------------------------------------------------------------
# Evaluating one check
# --------------------------------------------------------------------------------------------

class _Outcome:
    def __init__(self, verdict, reason, value=None, query=None, threshold=None, final=False, requests=None):
        self.verdict = verdict
        self.reason = reason
        self.value = value
        self.query = query
        self.threshold = threshold
        self.final = final          # do not retry even if inconclusive (never used for pass)
        self.requests = requests


def _policy(check, params, name):
    return check.get(name) or params[name]


def _by_policy(check, params, name, reason, **kwargs):
    verdict = _policy(check, params, name)
    return _Outcome(verdict, "%s (%s: %s)" % (reason, name, verdict), **kwargs)


def _threshold_text(vmin=None, vmax=None, unit=""):
    if vmin is not None and vmax is not None:
        return "between %s and %s%s" % (_fmt_number(vmin), _fmt_number(vmax), unit)
    if vmin is not None:
        return ">= %s%s" % (_fmt_number(vmin), unit)
    return "<= %s%s" % (_fmt_number(vmax), unit)


def _compare(value, vmin, vmax):
    if vmin is not None and not value >= vmin:
        return False
    if vmax is not None and not value <= vmax:
        return False
    return True


class _Context:
    def __init__(self, params, target, reader, transport, prometheus, baseline, wall_clock):
        self.params = params
        self.target = target
        self.reader = reader
        self.transport = transport
        self._prometheus = prometheus
        self.baseline = baseline
        self.wall_clock = wall_clock
        self.window = params["analysis_window"]

    @property
    def prometheus(self):
        if self._prometheus is None:
            self._prometheus = PrometheusClient(self.params["prometheus_url"], self.params["prometheus_validate_certs"],
                                                self.params.get("prometheus_headers"), self.params["prometheus_timeout"],
                                                transport=self.transport)
        return self._prometheus


def _prom_error_outcome(check, params, err, query, threshold):
    if err.kind == "bad_query":
        return _Outcome(FAIL, "configuration error, not retried: %s" % to_native(err), query=query, threshold=threshold,
                        final=True)
    return _by_policy(check, params, "on_error", to_native(err), query=query, threshold=threshold)


def _min_requests(params, check):
    """The traffic guard's minimum: the check's min_requests, else the global one for success_rate and latency, else 0."""
    minimum = check.get("min_requests")
    if minimum is None:
        minimum = params["min_requests"] if check["type"] in ("success_rate", "latency") else 0
    return minimum


def _check_traffic(ctx, check, threshold):
    """None when there is enough traffic, else the outcome (low traffic or an error)."""
    params = ctx.params
    minimum = _min_requests(params, check)
    if not minimum:
        return None, None
    query = request_count_query(ctx.target, ctx.window, check.get("reporter") or "destination")
    try:
        samples = ctx.prometheus.query(query)
    except PrometheusError as e:
        return _prom_error_outcome(check, params, e, query, threshold), None
    values = [v for dummy, v in samples if not math.isnan(v)]
    requests = sum(values) if values else 0.0
    if requests < minimum:
        return _by_policy(check, params, "on_low_traffic",
                          "low traffic: %s requests to %s/%s in %s, min_requests is %s"
                          % (_fmt_number(round(requests, 2)), ctx.target.namespace, ctx.target.workload, ctx.window, minimum),
                          query=query, threshold=threshold, requests=requests), requests
    return None, requests


def _prometheus_query(ctx, check):
    """``(query, min, max, unit)`` of a success_rate, latency or promql check, aimed at ctx.target over ctx.window."""
    ctype = check["type"]
    reporter = check.get("reporter") or "destination"
    if ctype == "success_rate":
        return success_rate_query(ctx.target, ctx.window, reporter), check["min"], None, " %"
    if ctype == "latency":
        quantile = check.get("quantile") if check.get("quantile") is not None else 0.99
        return latency_query(ctx.target, ctx.window, quantile, reporter), None, check["max"], " ms"
    return render_query(check["query"], ctx.target, ctx.window), check.get("min"), check.get("max"), ""


def _worst(samples, vmin, vmax):
    """Of several series, the one reported: the lowest below min, else the highest above max, else the one nearest the
    threshold's side (samples: [(labels, value)], none NaN)."""
    values = sorted(samples, key=lambda s: s[1])
    if vmin is not None and values[0][1] < vmin:
        return values[0]
    if vmax is not None and values[-1][1] > vmax:
        return values[-1]
    return values[0] if vmin is not None else values[-1]


def _check_prometheus(ctx, check):
    params = ctx.params
    query, vmin, vmax, unit = _prometheus_query(ctx, check)
    threshold = _threshold_text(vmin, vmax, unit)

    low, requests = _check_traffic(ctx, check, threshold)
    if low is not None:
        low.query = query
        return low
    try:
        samples = ctx.prometheus.query(query)
    except PrometheusError as e:
        return _prom_error_outcome(check, params, e, query, threshold)
    if not samples:
        return _by_policy(check, params, "on_no_data", "no data: the query returned an empty result", query=query,
                          threshold=threshold, requests=requests)
    nan = [labels for labels, value in samples if math.isnan(value)]
    if nan:
        return _by_policy(check, params, "on_nan", "the query returned NaN for %d of %d series (no requests in the window, "
                          "or 0/0)" % (len(nan), len(samples)), query=query, threshold=threshold, requests=requests)
    # Several series: every one must meet the threshold; the value reported is the worst one.
    worst = _worst(samples, vmin, vmax)
    value = worst[1]
    series = ""
    if len(samples) > 1:
        series = " (worst of %d series: %s)" % (len(samples), ",".join("%s=%s" % kv for kv in sorted(worst[0].items())) or "{}")
    if _compare(value, vmin, vmax):
        return _Outcome(PASS, "%s%s %s%s" % (_fmt_number(value), unit, threshold, series), value=value, query=query,
                        threshold=threshold, requests=requests)
    return _Outcome(FAIL, "%s%s is not %s%s" % (_fmt_number(value), unit, threshold, series), value=value, query=query,
                    threshold=threshold, requests=requests)


def _k8s_error_outcome(check, params, err, threshold):
    if err.status == 404:
        return _Outcome(FAIL, "%s (the canary Deployment must exist; check namespace and workload)" % to_native(err),
                        threshold=threshold, final=True)
    return _by_policy(check, params, "on_error", to_native(err), threshold=threshold)


def _check_workload_ready(ctx, check):
    tgt = ctx.target
    minimum = check.get("min_available")
    threshold = ">= %s available" % minimum if minimum is not None else "all replicas available and updated"
    if ctx.reader is None:
        return _by_policy(check, ctx.params, "on_error", "no Kubernetes connection was given for the workload_ready check",
                          threshold=threshold)
    try:
        dep = ctx.reader.read_deployment(tgt.namespace, tgt.workload)
    except K8sReadError as e:
        return _k8s_error_outcome(check, ctx.params, e, threshold)
    return _deployment_ready(dep, tgt, minimum)


def _deployment_ready(dep, tgt, minimum):
    """The workload_ready verdict on a Deployment as read: ``minimum`` available replicas, or (None) all of spec.replicas
    available and updated, with the controller's observedGeneration current."""
    threshold = ">= %s available" % minimum
    spec, status, meta = dep.get("spec") or {}, dep.get("status") or {}, dep.get("metadata") or {}
    replicas = spec.get("replicas", 1)
    replicas = 1 if replicas is None else int(replicas)
    available = int(status.get("availableReplicas") or 0)
    updated = int(status.get("updatedReplicas") or 0)
    name = "Deployment %s/%s" % (tgt.namespace, tgt.workload)
    if minimum is not None:
        if available >= minimum:
            return _Outcome(PASS, "%s has %d available replicas, >= %d" % (name, available, minimum), value=available,
                            threshold=threshold)
        return _Outcome(FAIL, "%s has %d available replicas, min_available is %d" % (name, available, minimum),
                        value=available, threshold=threshold)
    threshold = "== %d (spec.replicas)" % replicas
    if replicas == 0:
        return _Outcome(FAIL, "%s has spec.replicas 0: a canary with no pods is not ready (set min_available: 0 if "
                        "that is intended)" % name, value=available, threshold=threshold)
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    if generation is not None and (observed is None or int(observed) < int(generation)):
        return _Outcome(FAIL, "%s: the controller has not observed generation %s yet (observedGeneration %s)"
                        % (name, generation, observed), value=available, threshold=threshold)
    if available >= replicas and updated >= replicas:
        return _Outcome(PASS, "%s has %d/%d replicas available and updated" % (name, available, replicas),
                        value=available, threshold=threshold)
    return _Outcome(FAIL, "%s has %d/%d replicas available, %d updated" % (name, available, replicas, updated),
                    value=available, threshold=threshold)


def _check_no_restarts(ctx, check):
    tgt = ctx.target
    allowed = check.get("max") if check.get("max") is not None else 0
    threshold = "<= %s restarts" % _fmt_number(allowed)
    if ctx.reader is None:
        return _by_policy(check, ctx.params, "on_error", "no Kubernetes connection was given for the no_restarts check",
                          threshold=threshold)
    try:
        selector, pods = _read_canary_pods(ctx.reader, tgt)
    except K8sReadError as e:
        return _k8s_error_outcome(check, ctx.params, e, threshold)
    if not pods:
        return _by_policy(check, ctx.params, "on_no_data", "no pods match the canary Deployment's selector %s" % selector,
                          threshold=threshold)
    baseline = ctx.baseline or {}
    counts = baseline.get("restarts")
    since_epoch = baseline.get("epoch")
    if since_epoch is None:
        since_epoch = ctx.wall_clock() - window_seconds(ctx.window)
    since = datetime.datetime.fromtimestamp(since_epoch, datetime.timezone.utc)
    total = 0
    details = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        pod_name = meta.get("name")
        created = _parse_time(meta.get("creationTimestamp"))
        before = (counts or {}).get(_pod_key(pod))
        for container, (count, last_end) in sorted(_pod_restarts(pod).items()):
            if counts is not None:
                # Against the baseline: a pod that was not there yet restarted count times since.
                base = (before or {}).get("containers", {}).get(container, 0) if before else 0
                increase = max(0, count - base)
            elif count and created is not None and created >= since:
                increase = count
            elif count and (last_end is None or last_end >= since):
                increase = 1  # at least one restart inside the window (the count before it is unknown)
            else:
                increase = 0
            if increase:
                total += increase
                details.append("%s/%s +%d (restartCount %d)" % (pod_name, container, increase, count))
    how = "since the baseline at %s" % baseline.get("taken_at") if counts is not None else \
        "since %s (no baseline%s: restarts whose last termination is in the window)" % (
            since.isoformat(), ": %s" % baseline["error"] if baseline.get("error") else "")
    if total <= allowed:
        return _Outcome(PASS, "%d container restarts in %d pods %s" % (total, len(pods), how), value=total,
                        threshold=threshold)
    return _Outcome(FAIL, "%d container restarts %s: %s" % (total, how, "; ".join(details)), value=total, threshold=threshold)


def json_subset_mismatch(expected, actual, path="$"):
    """None when expected is a subset of actual, else a message naming the first difference."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return "%s: expected an object, got %s" % (path, json.dumps(actual)[:100])
        for key, value in expected.items():
            if key not in actual:
                return "%s.%s: missing" % (path, key)
            found = json_subset_mismatch(value, actual[key], "%s.%s" % (path, key))
            if found:
                return found
        return None
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return "%s: expected a list, got %s" % (path, json.dumps(actual)[:100])
        for idx, item in enumerate(expected):
            if not any(json_subset_mismatch(item, candidate) is None for candidate in actual):
                return "%s[%d]: no element matches %s" % (path, idx, json.dumps(item)[:100])
        return None
    if expected != actual or isinstance(expected, bool) != isinstance(actual, bool):
        return "%s: expected %s, got %s" % (path, json.dumps(expected), json.dumps(actual)[:100])
    return None


def _check_http(ctx, check):
    url = render_query(check["url"], ctx.target, ctx.window) if _PLACEHOLDER_RE.search(check["url"]) else check["url"]
    method = (check.get("method") or "GET").upper()
    headers = dict(check.get("headers") or {})
    body = check.get("body")
    data = None
    if body is not None:
        if isinstance(body, (dict, list)):
            data = to_bytes(json.dumps(body))
            headers.setdefault("Content-Type", "application/json")
        else:
            data = to_bytes(body)
    threshold = "HTTP 2xx" + (" and JSON containing expect_json" if check.get("expect_json") is not None else "")
    validate_certs = True if check.get("validate_certs") is None else check["validate_certs"]
    timeout = check.get("timeout") or 10
    try:
        status, payload = ctx.transport(url, method=method, headers=headers, data=data, validate_certs=validate_certs,
                                        timeout=timeout)
    except TransportError as e:
        return _by_policy(check, ctx.params, "on_error", "%s %s: no answer: %s" % (method, url, e), query=url,
                          threshold=threshold)
    text = to_text(payload or b"", errors="surrogate_or_replace")
    if not 200 <= status < 300:
        return _Outcome(FAIL, "%s %s answered HTTP %s: %s" % (method, url, status, text[:200]), value=status, query=url,
                        threshold=threshold)
    if check.get("expect_json") is not None:
        try:
            doc = json.loads(text)
        except ValueError:
            return _Outcome(FAIL, "%s %s answered HTTP %s but not JSON: %s" % (method, url, status, text[:200]),
                            value=status, query=url, threshold=threshold)
        mismatch = json_subset_mismatch(check["expect_json"], doc)
        if mismatch:
            return _Outcome(FAIL, "%s %s answered HTTP %s, JSON does not match expect_json: %s" % (method, url, status, mismatch),
                            value=status, query=url, threshold=threshold)
    return _Outcome(PASS, "%s %s answered HTTP %s" % (method, url, status), value=status, query=url, threshold=threshold)


_RUNNERS = {
    "success_rate": _check_prometheus,
    "latency": _check_prometheus,
    "promql": _check_prometheus,
    "workload_ready": _check_workload_ready,
    "no_restarts": _check_no_restarts,
    "http": _check_http,
}


def evaluate_check(ctx, check):
    try:
        return _RUNNERS[check["type"]](ctx, check)
    except CanaryCheckError as e:
        return _Outcome(FAIL, "configuration error: %s" % to_native(e), final=True)
    except Exception as e:  # pylint: disable=broad-except
        # A bug or an unexpected answer must not crash a rollout half-way (no rollback) nor pass: it fails the check.
        return _Outcome(FAIL, "unexpected error in the %s check: %s: %s" % (check["type"], type(e).__name__, to_native(e)),
                        final=True)


# --------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------

def evaluate_gate(params, target, k8s=None, http=None, clock=time.monotonic, sleep=time.sleep, window_start=None,
                  prometheus=None, wall_clock=time.time):
    """Run every check; retry the inconclusive ones for at most retry_inconclusive_for seconds.

    window_start: the dict take_baseline() returned at the start of the window (restart counts compared to it),
    or an epoch timestamp, or None (the window is the last analysis_window before now). With a start, the PromQL
    range ({{ window }} too) is analysis_window or the time since that start when it is shorter (step_window), taken
    anew for every round: a query never sees requests from before the start (a canary step's previous weight).
    Raises CanaryCheckError for a wrong specification. Returns
    {"verdict", "checks": [{"name", "type", "query", "value", "threshold", "verdict", "reason", "attempts"}],
     "started", "ended", "duration", "attempts"}.
    """
    params = validate(params, target)
    if not params["checks"]:
        raise CanaryCheckError("checks: the gate has no checks, and a gate that checks nothing must not pass; "
                               "add at least one, e.g. checks: [{name: errors, type: success_rate, min: 99}]")
    tgt = CanaryTarget.from_any(target)
    if isinstance(window_start, (int, float)) and not isinstance(window_start, bool):
        window_start = {"epoch": float(window_start), "taken_at": _iso(window_start), "restarts": None, "error": None}
    started_wall, started = wall_clock(), clock()
    reader = None
    reader_error = None
    if any(c["type"] in K8S_TYPES for c in params["checks"]):
        try:
            reader = as_reader(k8s)
        except K8sReadError as e:
            reader_error = to_native(e)
    ctx = _Context(params, tgt, reader, http or urls_transport, prometheus, window_start, wall_clock)

    results = dict((c["name"], None) for c in params["checks"])
    attempts = dict((c["name"], 0) for c in params["checks"])
    pending = list(params["checks"])
    retry_for = params["retry_inconclusive_for"]
    interval = params["retry_interval"]
    deadline = started + retry_for
    max_rounds = int(retry_for // interval) + 1
    rounds = 0
    since = (window_start or {}).get("epoch")
    while pending and rounds < max_rounds:
        rounds += 1
        if since is not None:
            ctx.window = step_window(params["analysis_window"], wall_clock() - since)
        for check in pending:
            attempts[check["name"]] += 1
            if reader_error and check["type"] in K8S_TYPES:
                outcome = _by_policy(check, params, "on_error", reader_error)
            else:
                outcome = evaluate_check(ctx, check)
            results[check["name"]] = outcome
        if any(r.verdict == FAIL for r in results.values() if r is not None):
            break  # the gate has failed; more retries cannot change that
        pending = [c for c in pending if results[c["name"]].verdict == INCONCLUSIVE and not results[c["name"]].final]
        if not pending or rounds >= max_rounds or clock() + interval > deadline:
            break
        sleep(interval)

    elapsed = clock() - started
    still = params["on_still_inconclusive"]
    checks_out = []
    for check in params["checks"]:
        outcome = results[check["name"]]
        verdict, reason = outcome.verdict, outcome.reason
        if verdict == INCONCLUSIVE and still == FAIL:
            verdict = FAIL
            reason = "still inconclusive after %d attempt(s) in %ss (retry_inconclusive_for %s): %s" % (
                attempts[check["name"]], _fmt_number(round(elapsed, 1)), retry_for, reason)
        item = dict(name=check["name"], type=check["type"], query=outcome.query, value=outcome.value,
                    threshold=outcome.threshold, verdict=verdict, reason=reason, attempts=attempts[check["name"]])
        if outcome.requests is not None:
            item["requests"] = outcome.requests
        checks_out.append(item)

    verdicts = [c["verdict"] for c in checks_out]
    if FAIL in verdicts:
        verdict = FAIL
    elif INCONCLUSIVE in verdicts:
        verdict = INCONCLUSIVE
    else:
        verdict = PASS
    ended_wall = wall_clock()
    gate = {
        "verdict": verdict,
        "checks": checks_out,
        "started": _iso(started_wall),
        "ended": _iso(ended_wall),
        "duration": round(elapsed, 3),
        "rounds": rounds,
    }
    gate["reason"] = summarize(gate)
    return gate


def summarize(gate):
    """One line for a failure message: the checks that did not pass, with their values."""
    bad = [c for c in gate["checks"] if c["verdict"] != PASS]
    if not bad:
        return "all %d checks passed" % len(gate["checks"])
    return "; ".join("%s (%s): %s - %s" % (c["name"], c["type"], c["verdict"], c["reason"]) for c in bad)


# --------------------------------------------------------------------------------------------
# Preflight: before a rollout's first shift
# --------------------------------------------------------------------------------------------

SKIPPED = "skipped"
PREFLIGHT_LOW_TRAFFIC = (FAIL, "skip")


def stable_workload_name(canary_workload, canary_version, stable_version):
    """The stable's Deployment by the usual naming ``<app>-<version>``: ``payment-v2`` (version v2) gives ``payment-v1``
    (stable v1). None when the canary's name does not end with its version after a prefix."""
    if canary_workload and canary_version and stable_version and len(canary_workload) > len(canary_version) \
            and canary_workload.endswith(canary_version):
        return canary_workload[:-len(canary_version)] + stable_version
    return None


def _describe(tgt):
    """``shop/payment-v1 (version v1)``: what a query aimed at ``tgt`` selects."""
    what = "%s/%s" % (tgt.namespace, tgt.workload) if tgt.workload else "namespace %s" % tgt.namespace
    return what + (" (version %s)" % tgt.version if tgt.version else "")


def _item(name, ctype, aimed, verdict, reason, fix=None, **extra):
    item = dict(name=name, type=ctype, target=aimed, verdict=verdict, reason=reason)
    if fix:
        item["fix"] = fix
    item.update(extra)
    return item


def _preflight_prometheus(ctx):
    """Prometheus answers an instant query at all (``1``, a scalar)."""
    url = ctx.params["prometheus_url"]
    try:
        ctx.prometheus.query("1")
    except PrometheusError as e:
        return _item("prometheus", "prometheus", url, FAIL, to_native(e), query="1",
                     fix="start Prometheus or correct prometheus_url (and prometheus_headers, prometheus_validate_certs), then rerun")
    return _item("prometheus", "prometheus", url, PASS, "Prometheus at %s answers queries" % url, query="1")


def _preflight_error(check, err, query, requests=None):
    """A query of the stable that Prometheus did not answer with data."""
    if err.kind == "bad_query":
        fix = "correct the PromQL of check %s (the query as sent is in this item's query)" % check["name"]
    elif err.kind in ("unreachable", "bad_response"):
        fix = "make Prometheus answer at prometheus_url, then rerun"
    else:
        fix = "see Prometheus's answer; correct the query of check %s or the load on Prometheus, then rerun" % check["name"]
    return _item(check["name"], check["type"], "stable", FAIL, to_native(err), fix, query=query, requests=requests)


def _preflight_quiet(check, low_traffic, reason, query, requests=None, stable_name="the stable"):
    """No usable value for the stable (no series, NaN, too few requests): low_traffic decides. A failed one is marked
    ``quiet`` (preflight() asks it again while retry_inconclusive_for lasts, then drops the mark)."""
    if low_traffic == FAIL:
        return _item(check["name"], check["type"], "stable", FAIL,
                     "%s; the gate could not judge the canary on this traffic either (preflight_low_traffic: fail)" % reason,
                     "send traffic to %s, or check the metric and label names of the query; preflight_low_traffic: skip starts"
                     " without this evidence" % stable_name, query=query, requests=requests, quiet=True)
    return _item(check["name"], check["type"], "stable", SKIPPED, "%s (preflight_low_traffic: skip)" % reason, query=query,
                 requests=requests)


def _preflight_query(ctx, check, low_traffic):
    """One Prometheus check's query aimed at the stable: valid, answered, with enough traffic. Its value is reported,
    not judged (the threshold is the canary's)."""
    tgt = ctx.target
    stable_name = "the stable %s" % _describe(tgt)
    try:
        query, vmin, vmax, unit = _prometheus_query(ctx, check)
    except CanaryCheckError as e:
        return _item(check["name"], check["type"], "stable", FAIL, "the query cannot be aimed at the stable: %s" % to_native(e),
                     "set stable_workload (the stable's Deployment, Istio's destination_workload)")
    requests = None
    minimum = _min_requests(ctx.params, check)
    if minimum:
        count_query = request_count_query(tgt, ctx.window, check.get("reporter") or "destination")
        try:
            samples = ctx.prometheus.query(count_query)
        except PrometheusError as e:
            return _preflight_error(check, e, count_query)
        values = [v for dummy, v in samples if not math.isnan(v)]
        requests = sum(values) if values else 0.0
        if requests < minimum:
            return _preflight_quiet(check, low_traffic, "low traffic on %s: %s requests in %s, min_requests is %s"
                                    % (stable_name, _fmt_number(round(requests, 2)), ctx.window, minimum), count_query, requests,
                                    stable_name)
    try:
        samples = ctx.prometheus.query(query)
    except PrometheusError as e:
        return _preflight_error(check, e, query, requests)
    if not samples:
        return _preflight_quiet(check, low_traffic, "the query returned no series for %s (a misspelled metric or label name,"
                                " or no traffic)" % stable_name, query, requests, stable_name)
    if any(math.isnan(value) for dummy, value in samples):
        return _preflight_quiet(check, low_traffic, "the query returned NaN for %s (no requests in %s, or 0/0)"
                                % (stable_name, ctx.window), query, requests, stable_name)
    value = _worst(samples, vmin, vmax)[1]
    return _item(check["name"], check["type"], "stable", PASS, "answers for %s: %s%s (the canary's threshold, %s, is not"
                 " applied to the stable)" % (stable_name, _fmt_number(value), unit, _threshold_text(vmin, vmax, unit)),
                 query=query, value=value, requests=requests)


def _preflight_canary_pods(params, tgt, k8s):
    """The canary's Deployment has ready pods: workload_ready's semantics (its min_available when the checks have such a
    check, else all of spec.replicas available and updated), and at least one pod available."""
    if not tgt.workload:
        return _item("canary-pods", "workload_ready", "canary", SKIPPED,
                     "no canary_workload was given, so the canary's pods were not checked; set it to have them checked")
    check = next((c for c in params["checks"] if c["type"] == "workload_ready"), {})
    minimum = check.get("min_available")
    name = "Deployment %s/%s" % (tgt.namespace, tgt.workload)
    fix = "check the Kubernetes connection and that it may get deployments.apps in namespace %s (README: RBAC)" % tgt.namespace
    try:
        reader = as_reader(k8s)
        if reader is None:
            raise K8sReadError("no Kubernetes connection was given to read %s" % name)
        dep = reader.read_deployment(tgt.namespace, tgt.workload)
    except K8sReadError as e:
        if e.status == 404:
            fix = "correct canary_workload, or create the canary's Deployment first"
        return _item("canary-pods", "workload_ready", "canary", FAIL, to_native(e), fix)
    outcome = _deployment_ready(dep, tgt, None if minimum is None else max(1, minimum))
    verdict = outcome.verdict   # pass or fail: the Deployment was read
    fix = None if verdict == PASS else "wait until the canary's pods are ready (kubectl -n %s rollout status deployment/%s), then rerun" % (
        tgt.namespace, tgt.workload)
    return _item("canary-pods", "workload_ready", "canary", verdict, outcome.reason, fix, value=outcome.value,
                 threshold=outcome.threshold)


def _preflight_queries(ctx, queries, low_traffic, clock, sleep):
    """Each query aimed at the stable; the quiet ones asked again (retry_inconclusive_for, retry_interval)."""
    params = ctx.params
    deadline = clock() + params["retry_inconclusive_for"]
    interval = params["retry_interval"]
    max_rounds = int(params["retry_inconclusive_for"] // interval) + 1
    items = dict((c["name"], None) for c in queries)
    attempts = dict((c["name"], 0) for c in queries)
    pending = list(queries)
    for round_ in range(1, max_rounds + 1):
        for check in pending:
            attempts[check["name"]] += 1
            items[check["name"]] = _preflight_query(ctx, check, low_traffic)
        pending = [c for c in pending if items[c["name"]].get("quiet")]
        if not pending or round_ == max_rounds or clock() + interval > deadline:
            break
        sleep(interval)
    out = []
    for check in queries:
        item = items[check["name"]]
        item.pop("quiet", None)
        if attempts[check["name"]] > 1:
            item["attempts"] = attempts[check["name"]]
        out.append(item)
    return out


def preflight(params, target, stable, k8s=None, http=None, prometheus=None, low_traffic=FAIL, clock=time.monotonic,
              sleep=time.sleep):
    """Before a rollout's first shift, whether the gate could judge the canary at all; reads only.

    - ``prometheus``: Prometheus answers (when a success_rate, latency or promql check needs it); if not, its checks are
      not tried.
    - each of those checks, its query aimed at ``stable`` (a CanaryTarget or dict: the stable's namespace, workload,
      version) over analysis_window: valid PromQL (no HTTP 400), answered, with a value; the stable's request count
      at least the check's min_requests. No series, NaN or too few requests fail when ``low_traffic`` is ``fail``, are
      ``skipped`` when it is ``skip``. The stable's value is reported, not compared with the canary's threshold.
      Such a quiet query is asked again every retry_interval for at most retry_inconclusive_for seconds, as the gate
      retries an inconclusive check (a stable whose traffic paused a moment, Prometheus a scrape behind); the item's
      ``attempts`` says how often it was asked when that was more than once.
    - ``canary-pods``: the canary's Deployment (target's workload) has ready pods, as _preflight_canary_pods says;
      skipped without a workload.

    Returns {"verdict": "pass" or "fail", "checks": [{"name", "type", "target", "verdict" (pass, fail, skipped),
    "reason", "fix" (when not passed), "query", "value", "requests", ...}], "reason": the failed ones with their fix}.
    """
    if low_traffic not in PREFLIGHT_LOW_TRAFFIC:
        raise CanaryCheckError("preflight_low_traffic: %r is not one of %s" % (low_traffic, ", ".join(PREFLIGHT_LOW_TRAFFIC)))
    params = validate(params, target)
    stable = CanaryTarget.from_any(stable)
    ctx = _Context(params, stable, None, http or urls_transport, prometheus, None, time.time)
    items = []
    queries = [c for c in params["checks"] if c["type"] in PROMETHEUS_TYPES]
    if queries:
        reached = _preflight_prometheus(ctx)
        items.append(reached)
        if reached["verdict"] == PASS:
            items.extend(_preflight_queries(ctx, queries, low_traffic, clock, sleep))
    items.append(_preflight_canary_pods(params, CanaryTarget.from_any(target), k8s))
    failed = [i for i in items if i["verdict"] == FAIL]
    if failed:
        reason = "; ".join("%s (%s, %s): %s; fix: %s" % (i["name"], i["type"], i["target"], i["reason"], i["fix"]) for i in failed)
    else:
        skipped = [i["name"] for i in items if i["verdict"] == SKIPPED]
        reason = "%d passed, %d skipped%s" % (len(items) - len(skipped), len(skipped), " (%s)" % ", ".join(skipped) if skipped else "")
    return {"verdict": FAIL if failed else PASS, "checks": items, "reason": reason}


class CanaryGate:
    """The gate object canary_rollout drives: start_window() at the start of a step, evaluate(token) at its end.

    gate = CanaryGate(params, target, k8s=api_client)
    token = gate.start_window()        # take_baseline(): restart counts, the window's start time
    result = gate.evaluate(token)      # evaluate_gate(..., window_start=token)
    result = gate.evaluate()           # the same window: since this gate's last start_window() (a step's probes)
    report = gate.preflight(stable)    # before the first shift: can this gate judge the canary at all?
    """

    def __init__(self, params, target, k8s=None, http=None, prometheus=None, clock=time.monotonic, sleep=time.sleep,
                 wall_clock=time.time):
        self.params = validate(params, target)
        self.target = CanaryTarget.from_any(target)
        self.k8s = k8s
        self.http = http
        self.prometheus = prometheus
        self.clock = clock
        self.sleep = sleep
        self.wall_clock = wall_clock
        self.window_start = None
        self.reader = None
        if any(c["type"] in K8S_TYPES for c in self.params["checks"]):
            try:
                self.reader = as_reader(k8s)
            except K8sReadError:
                self.reader = None  # evaluate_gate reports it through on_error

    def start_window(self):
        """The window starts now: the baseline, also kept for evaluate() without a token."""
        self.window_start = take_baseline(self.params, self.target, k8s=self.reader, wall_clock=self.wall_clock)
        return self.window_start

    def evaluate(self, token=None):
        """The gate over the window that ``token`` started, or (None) the last start_window()'s; never started: the
        last analysis_window."""
        return evaluate_gate(self.params, self.target, k8s=self.reader if self.reader is not None else self.k8s, http=self.http,
                             clock=self.clock, sleep=self.sleep, window_start=self.window_start if token is None else token,
                             prometheus=self.prometheus, wall_clock=self.wall_clock)

    def preflight(self, stable, low_traffic=FAIL):
        """Before a rollout's first shift: could this gate judge the canary at all? Nothing is written; see preflight()."""
        return preflight(self.params, self.target, stable, k8s=self.reader if self.reader is not None else self.k8s, http=self.http,
                         prometheus=self.prometheus, low_traffic=low_traffic, clock=self.clock, sleep=self.sleep)
