# -*- coding: utf-8 -*-
# Copyright: onprem.mesh contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Small HTTP transport and Prometheus instant-query client, on ansible.module_utils.urls.

Plain Python: no AnsibleModule. The transport is a callable so tests can inject a fake:

    transport(url, method="GET", headers=None, data=None, validate_certs=True, timeout=10)
        -> (status, body_bytes)          for every HTTP answer, 2xx or not
        raises TransportError            when there is no HTTP answer (refused, DNS, TLS, timeout)
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import math
import socket

from ansible.module_utils.common.text.converters import to_native, to_text
from ansible.module_utils.six.moves.urllib.error import HTTPError, URLError
from ansible.module_utils.six.moves.urllib.parse import urlencode
from ansible.module_utils.urls import open_url


class TransportError(Exception):
    """No HTTP answer at all: connection refused, name resolution, TLS, timeout."""


class PrometheusError(Exception):
    """A Prometheus query that produced no usable value.

    kind is one of:
      unreachable  no HTTP answer from prometheus_url
      bad_query    Prometheus answered 400: the PromQL does not parse (configuration error)
      query_error  Prometheus answered 422/503 or another non-2xx: execution error, timeout, overload
      bad_response the answer is not a Prometheus API answer (wrong URL? a proxy page?)
    """

    def __init__(self, kind, message, status=None, prom_error=None):
        super(PrometheusError, self).__init__(message)
        self.kind = kind
        self.status = status
        self.prom_error = prom_error


def urls_transport(url, method="GET", headers=None, data=None, validate_certs=True, timeout=10):
    """The production transport: ansible.module_utils.urls.open_url, non-2xx answers returned, not raised."""
    try:
        resp = open_url(url, data=data, headers=headers or {}, method=method, validate_certs=validate_certs,
                        timeout=timeout, follow_redirects="safe")
        return resp.getcode(), resp.read()
    except HTTPError as e:
        try:
            body = e.read()
        except Exception:  # pylint: disable=broad-except
            body = b""
        return e.code, body
    except (URLError, socket.timeout, socket.error, OSError) as e:
        raise TransportError(to_native(getattr(e, "reason", None) or e))
    except Exception as e:  # ansible.module_utils.urls raises its own ConnectionError/SSLValidationError
        raise TransportError("%s: %s" % (type(e).__name__, to_native(e)))


def parse_sample_value(raw):
    """Prometheus sends sample values as strings: "1.5", "NaN", "+Inf", "-Inf"."""
    try:
        return float(raw)
    except (TypeError, ValueError):
        return float("nan")


class PrometheusClient:
    """Instant queries against GET {url}/api/v1/query."""

    def __init__(self, url, validate_certs=True, headers=None, timeout=10, transport=None):
        if not url:
            raise ValueError("prometheus_url is required for Prometheus checks, e.g. prometheus_url: http://prometheus.istio-system:9090")
        self.url = url.rstrip("/")
        self.validate_certs = validate_certs
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.transport = transport or urls_transport

    def query(self, promql):
        """Run an instant query; return a list of (labels dict, float) samples (empty list = empty vector)."""
        url = "%s/api/v1/query?%s" % (self.url, urlencode({"query": promql}))
        headers = {"Accept": "application/json"}
        headers.update(self.headers)
        try:
            status, body = self.transport(url, method="GET", headers=headers, validate_certs=self.validate_certs,
                                          timeout=self.timeout)
        except TransportError as e:
            raise PrometheusError("unreachable", "Prometheus at prometheus_url %s is unreachable: %s" % (self.url, e))
        text = to_text(body or b"", errors="surrogate_or_replace")
        try:
            doc = json.loads(text) if text else None
        except ValueError:
            doc = None
        prom_error = None
        if isinstance(doc, dict) and doc.get("status") == "error":
            prom_error = "%s: %s" % (doc.get("errorType", "error"), doc.get("error", ""))
        if status == 400:
            raise PrometheusError(
                "bad_query",
                "Prometheus at %s rejected the query (HTTP 400 %s). Fix the PromQL: %s"
                % (self.url, prom_error or text[:300], promql), status=status, prom_error=prom_error)
        if not 200 <= status < 300:
            hint = ""
            if status in (401, 403):
                hint = " (check prometheus_headers, e.g. Authorization: Bearer <token>)"
            raise PrometheusError(
                "query_error",
                "Prometheus at %s answered HTTP %s%s to the query %s: %s"
                % (self.url, status, hint, promql, prom_error or text[:300]), status=status, prom_error=prom_error)
        if not isinstance(doc, dict) or doc.get("status") != "success" or not isinstance(doc.get("data"), dict):
            raise PrometheusError(
                "bad_response",
                "prometheus_url %s did not answer like the Prometheus HTTP API (GET /api/v1/query); got: %s"
                % (self.url, text[:200]), status=status)
        return self._samples(doc["data"], promql)

    def _samples(self, data, promql):
        rtype = data.get("resultType")
        result = data.get("result")
        if rtype == "vector":
            out = []
            for item in result or []:
                value = item.get("value") or [None, None]
                out.append((dict(item.get("metric") or {}), parse_sample_value(value[1])))
            return out
        if rtype == "scalar":
            return [({}, parse_sample_value((result or [None, None])[1]))]
        raise PrometheusError(
            "query_error",
            "the query must return an instant vector or a scalar, it returned a %s (drop the [range] "
            "selector or wrap it in a function such as rate()): %s" % (rtype, promql))


def is_nan(value):
    return isinstance(value, float) and math.isnan(value)
