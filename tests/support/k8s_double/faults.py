"""TEST DOUBLE (onprem.mesh k8s_double): fault injection and the request log (test controls, never under /api).

A fault is a dict; `kind` is one of:

- ``error``: answer ``code`` (500, 503, 429...) instead of serving the request; ``retryAfter`` adds a Retry-After
  header (the python client's urllib3 then retries 429/503 by itself, as it would against the real server).
- ``conflict``: answer 409 Conflict ("the object has been modified...") to writes (update/patch/delete).
- ``bump``: a concurrent writer: the matching object gets a new resourceVersion (an annotation
  ``k8s-double.onprem.mesh/concurrent-write`` changes) right after the next matching GET returns (``when: after-get``,
  the default) or right before the next matching write is applied (``when: before-write``).
- ``forbid``: answer 403 Forbidden (the real message) as if RBAC denied it.
- ``delay``: sleep ``seconds`` before serving.

Matchers (all optional): ``verb`` (str or list), ``resource``, ``group``, ``namespace``, ``name``, ``user``, ``token``,
``subresource``. ``count``: how many matching requests it affects (default 1; null = until cleared).
"""
import collections
import itertools
import threading
import time

KINDS = ("error", "conflict", "bump", "forbid", "delay")
WRITE_VERBS = ("update", "patch", "delete")


class Faults:
    def __init__(self):
        self.lock = threading.Lock()
        self.items = []
        self.ids = itertools.count(1)

    def add(self, spec):
        spec = dict(spec)
        if spec.get("kind") not in KINDS:
            raise ValueError(f"fault kind must be one of {', '.join(KINDS)}")
        spec.setdefault("count", 1)
        spec["id"] = next(self.ids)
        with self.lock:
            self.items.append(spec)
        return spec

    def list(self):
        with self.lock:
            return [dict(f) for f in self.items]

    def clear(self):
        with self.lock:
            self.items = []

    @staticmethod
    def _matches(fault, ctx):
        verbs = fault.get("verb")
        if verbs is None and fault["kind"] == "conflict":
            verbs = list(WRITE_VERBS)
        if verbs is not None:
            verbs = [verbs] if isinstance(verbs, str) else verbs
            if ctx.get("verb") not in verbs:
                return False
        for key in ("resource", "group", "namespace", "name", "user", "token", "subresource"):
            if key in fault and fault[key] is not None and fault[key] != ctx.get(key):
                return False
        return True

    def take(self, kind, ctx, when=None):
        """The first matching fault of a kind (its count consumed), or None."""
        with self.lock:
            for fault in self.items:
                if fault["kind"] != kind or not self._matches(fault, ctx):
                    continue
                if when and fault.get("when", "after-get") != when:
                    continue
                if fault["count"] is not None:
                    fault["count"] -= 1
                    if fault["count"] <= 0:
                        self.items.remove(fault)
                return dict(fault)
        return None


class RequestLog:
    """Every request with its verb/resource and answer code, and counters `"<verb> <resource>[/<subresource>]"`."""

    def __init__(self, maxlen=100000):
        self.lock = threading.Lock()
        self.entries = collections.deque(maxlen=maxlen)
        self.counters = collections.Counter()
        self.seq = itertools.count(1)

    def add(self, entry):
        entry["seq"] = next(self.seq)
        entry["time"] = time.time()
        with self.lock:
            self.entries.append(entry)
            if entry.get("resource"):
                res = entry["resource"] + (f"/{entry['subresource']}" if entry.get("subresource") else "")
                self.counters[f"{entry['verb']} {res}"] += 1
                self.counters[entry["verb"]] += 1
                self.counters["total"] += 1
        return entry

    def snapshot(self):
        with self.lock:
            return {"requests": [dict(e) for e in self.entries], "counters": dict(self.counters)}

    def reset(self):
        with self.lock:
            self.entries.clear()
            self.counters.clear()
