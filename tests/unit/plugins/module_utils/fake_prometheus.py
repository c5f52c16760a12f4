# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""An in-memory Prometheus for unit tests: series with labels, and the PromQL the canary checks send.

The test stores series (``add``), each with its labels and its value: for a counter or a histogram
bucket the increase over the query's window (``rate(x[1m])`` is that divided by 60), for a gauge its
value. Or, when the range matters, a counter's increases in time (``count``): then ``increase(x[30s])``
sums what was counted in the 30 s up to the evaluation time (``now``), and ``x`` alone is the counter's
value. Queries are parsed and evaluated as Prometheus would, on that subset of PromQL: selectors
with ``=``, ``!=``, ``=~`` and ``!~`` matchers (exact, regexes anchored; a missing label is ""),
``rate``, ``increase``, ``sum`` and ``sum by (...)``, ``histogram_quantile``, ``scalar``, ``or``
and ``+ - * /`` on vectors and scalars (one-to-one on equal label sets). A query it cannot parse is
answered HTTP 400 ``bad_data``, like Prometheus. ``transport`` answers ``GET /api/v1/query``
in Prometheus's JSON, so the collection's real PrometheusClient reads it.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import math
import re

from ansible.module_utils.six.moves.urllib.parse import parse_qs, urlsplit

from ansible_collections.onprem.mesh.plugins.module_utils.prometheus import TransportError

_TOKEN = re.compile(r"\s*(?:(?P<number>[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|\.[0-9]+)|(?P<string>\"(?:[^\"\\]|\\.)*\")"
                    r"|(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)|(?P<op>=~|!~|!=|==|[=(){}\[\],*/+-]))")
_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


class BadQuery(Exception):
    """What Prometheus answers with HTTP 400 bad_data."""


def _seconds(text):
    if not _DURATION.match(text):
        raise BadQuery("bad duration %r" % text)
    return sum(int(n) * _UNITS[u] for n, u in re.findall(r"([0-9]+)(ms|s|m|h|d|w|y)", text))


def _key(labels):
    return tuple(sorted(labels.items()))


def _div(a, b):
    if b == 0:
        return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a)
    return a / b


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": _div}


def bucket_quantile(q, buckets):
    """Prometheus's histogram_quantile for one series' buckets [(upper bound, cumulative count)]."""
    if math.isnan(q) or q < 0 or q > 1:
        return math.nan if math.isnan(q) else math.copysign(math.inf, q)
    buckets = sorted(buckets)
    if not buckets or not math.isinf(buckets[-1][0]) or len(buckets) < 2:
        return math.nan
    total = buckets[-1][1]
    if total == 0:
        return math.nan
    rank = q * total
    b = next(i for i, (_le, count) in enumerate(buckets) if count >= rank or i == len(buckets) - 1)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    if b == 0 and buckets[0][0] <= 0:
        return buckets[0][0]
    start, end, count = 0.0, buckets[b][0], buckets[b][1]
    if b > 0:
        start = buckets[b - 1][0]
        count -= buckets[b - 1][1]
        rank -= buckets[b - 1][1]
    return start + (end - start) * (rank / count)


class _Parser:
    def __init__(self, text, prometheus):
        self.tokens = []
        self.prometheus = prometheus
        pos = 0
        text = text.rstrip()
        while pos < len(text):
            if text[pos] == "[":  # a range: [1m]
                end = text.find("]", pos)
                if end < 0:
                    raise BadQuery("unclosed [ at %d" % pos)
                self.tokens.append(("range", text[pos + 1:end].strip()))
                pos = end + 1
                continue
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise BadQuery("unexpected character %r at %d" % (text[pos], pos))
            kind = m.lastgroup
            self.tokens.append((kind, m.group(kind)))
            pos = m.end()
        self.i = 0

    def peek(self, value=None):
        if self.i >= len(self.tokens):
            return None
        token = self.tokens[self.i]
        return token if value is None or token[1] == value else None

    def take(self, value=None):
        token = self.peek()
        if token is None or (value is not None and token[1] != value):
            raise BadQuery("expected %s, got %s" % (value or "more", token[1] if token else "end of input"))
        self.i += 1
        return token

    def parse(self):
        value = self.or_expr()
        if self.peek() is not None:
            raise BadQuery("unexpected %r" % self.peek()[1])
        return value

    def or_expr(self):
        left = self.additive()
        while self.peek("or"):
            self.take()
            right = self.additive()
            seen = set(_key(labels) for labels, _v in left)
            left = left + [(labels, v) for labels, v in right if _key(labels) not in seen]
        return left

    def additive(self):
        left = self.multiplicative()
        while self.peek("+") or self.peek("-"):
            op = self.take()[1]
            left = self.binary(op, left, self.multiplicative())
        return left

    def multiplicative(self):
        left = self.primary()
        while self.peek("*") or self.peek("/"):
            op = self.take()[1]
            left = self.binary(op, left, self.primary())
        return left

    @staticmethod
    def binary(op, left, right):
        fn = _OPS[op]
        if isinstance(left, float) and isinstance(right, float):
            return fn(left, right)
        # arithmetic drops the metric name, then matches the label sets one-to-one
        left = left if isinstance(left, float) else [(_unnamed(labels), v) for labels, v in left]
        right = right if isinstance(right, float) else [(_unnamed(labels), v) for labels, v in right]
        if isinstance(right, float):
            return [(labels, fn(v, right)) for labels, v in left]
        if isinstance(left, float):
            return [(labels, fn(left, v)) for labels, v in right]
        others = dict((_key(labels), v) for labels, v in right)
        return [(labels, fn(v, others[_key(labels)])) for labels, v in left if _key(labels) in others]

    def primary(self):
        token = self.take()
        kind, value = token
        if kind == "number":
            return float(value)
        if value == "(":
            inner = self.or_expr()
            self.take(")")
            return inner
        if value == "-":
            operand = self.primary()
            return -operand if isinstance(operand, float) else [(labels, -v) for labels, v in operand]
        if kind == "name" and value == "sum":
            by = None
            if self.peek("by"):
                self.take()
                by = self.label_list()
            self.take("(")
            inner = self.or_expr()
            self.take(")")
            groups = {}
            for labels, v in inner:
                group = dict((k, labels[k]) for k in by if k in labels) if by else {}
                key = _key(group)
                groups[key] = (group, groups.get(key, (group, 0.0))[1] + v)
            return list(groups.values())
        if kind == "name" and self.peek("("):
            return self.function(value)
        if kind == "name" or value == "{":
            return self.selector(value if kind == "name" else None, opened=value == "{")
        raise BadQuery("unexpected %r" % value)

    def label_list(self):
        self.take("(")
        names = []
        while not self.peek(")"):
            names.append(self.take()[1])
            if self.peek(","):
                self.take()
        self.take(")")
        return names

    def function(self, name):
        self.take("(")
        if name in ("rate", "increase"):
            series, window = self.selector(self.take()[1], want_range=True)
            self.take(")")
            return [(labels, v / window if name == "rate" else v) for labels, v in series]
        if name == "histogram_quantile":
            q = self.or_expr()
            self.take(",")
            inner = self.or_expr()
            self.take(")")
            groups = {}
            for labels, v in inner:
                rest = dict((k, x) for k, x in labels.items() if k != "le")
                groups.setdefault(_key(rest), (rest, []))[1].append((float(labels["le"]), v))
            return [(rest, bucket_quantile(q, buckets)) for rest, buckets in groups.values()]
        if name == "scalar":
            inner = self.or_expr()
            self.take(")")
            return inner[0][1] if len(inner) == 1 else math.nan
        raise BadQuery("unknown function %s" % name)

    def selector(self, name, opened=False, want_range=False):
        matchers = []
        if name is not None and self.peek("{"):
            self.take("{")
            opened = True
        if opened:
            while not self.peek("}"):
                label = self.take()[1]
                op = self.take()[1]
                kind, text = self.take()
                if kind != "string" or op not in ("=", "!=", "=~", "!~"):
                    raise BadQuery("bad matcher %s%s%s" % (label, op, text))
                matchers.append((label, op, json.loads(text)))
                if self.peek(","):
                    self.take()
            self.take("}")
        if name is not None:
            matchers.append(("__name__", "=", name))
        window = None
        if self.peek() and self.peek()[0] == "range":
            window = _seconds(self.take()[1])
        if want_range and window is None:
            raise BadQuery("expected a range vector")
        if not want_range and window is not None:
            raise BadQuery("a range vector is not allowed here")
        found = [(dict((k, v) for k, v in labels.items() if k != "__name__") if want_range else labels, value)
                 for labels, value in self.prometheus.series if _matches(labels, matchers)]
        for labels, counted in self.prometheus.counted:
            if _matches(labels, matchers):
                now = self.prometheus.now()
                since = now - window if want_range else -math.inf
                found.append((_unnamed(labels) if want_range else labels, sum(n for at, n in counted if since < at <= now)))
        return (found, window) if want_range else found


def _unnamed(labels):
    return dict((k, v) for k, v in labels.items() if k != "__name__")


def _matches(labels, matchers):
    for label, op, value in matchers:
        have = labels.get(label, "")
        if op == "=" and have != value or op == "!=" and have == value:
            return False
        if op in ("=~", "!~") and bool(re.match("^(?:%s)$" % value, have)) != (op == "=~"):
            return False
    return True


def _format(value):
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class FakePrometheus:
    """Series in memory; answers instant queries like Prometheus's HTTP API (see the module doc)."""

    def __init__(self, url="http://127.0.0.1:9", other=None, now=None):
        self.url = url.rstrip("/")
        self.series = []
        self.counted = []         # (labels, [(time, increase)]) of the counters given with count()
        self.now = now            # the evaluation time (a callable) for those counters
        self.queries = []
        self.requests = []
        self.other = other        # transport for URLs that are not this Prometheus (http checks)
        self.answers = []         # (status, body) answered instead of evaluating, one per query; or a TransportError

    def add(self, name, value, **labels):
        labels["__name__"] = name
        self.series.append((dict((k, str(v)) for k, v in labels.items()), float(value)))
        return self

    def count(self, name, at, increase, **labels):
        """The counter ``name{labels}`` went up by ``increase`` at time ``at`` (on the ``now`` clock)."""
        labels = dict((k, str(v)) for k, v in labels.items())
        labels["__name__"] = name
        for known, counted in self.counted:
            if known == labels:
                counted.append((float(at), float(increase)))
                return self
        self.counted.append((labels, [(float(at), float(increase))]))
        return self

    def evaluate(self, promql):
        """(resultType, result) as Prometheus computes it; BadQuery when it does not parse."""
        value = _Parser(promql, self).parse()
        if isinstance(value, float):
            return "scalar", value
        return "vector", value

    def transport(self, url, method="GET", headers=None, data=None, validate_certs=True, timeout=10):
        if not url.startswith(self.url + "/"):
            if self.other is None:
                raise TransportError("connection refused (nothing listens at %s in this test)" % url)
            return self.other(url, method=method, headers=headers, data=data, validate_certs=validate_certs, timeout=timeout)
        self.requests.append(dict(url=url, method=method, headers=headers, validate_certs=validate_certs, timeout=timeout))
        parts = urlsplit(url)
        if parts.path != urlsplit(self.url).path + "/api/v1/query":
            return 404, b"404 page not found"
        promql = parse_qs(parts.query).get("query", [""])[0]
        self.queries.append(promql)
        if self.answers:
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            status, body = answer
            return status, body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            kind, value = self.evaluate(promql)
        except BadQuery as exc:
            return 400, json.dumps({"status": "error", "errorType": "bad_data", "error": "parse error: %s" % exc}).encode()
        if kind == "scalar":
            result = [1767225600.0, _format(value)]
        else:
            result = [{"metric": labels, "value": [1767225600.0, _format(v)]} for labels, v in value]
        return 200, json.dumps({"status": "success", "data": {"resultType": kind, "result": result}}).encode()
