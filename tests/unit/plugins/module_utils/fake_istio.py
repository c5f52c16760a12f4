# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""An in-memory stand-in for IstioObjects, for unit tests of the pure engine.

It applies JSON patches as kube-apiserver 1.35 does (RFC 6902 with evanphx/json-patch v4's ``test``: a test
against null passes for a missing key), keeps a resourceVersion and a generation that moves only with
``spec``, and can be told to let another writer change the object between a read and the next patch.

Its refusals are the real server's answers, status and body, turned into K8sError by the same
``api_error`` the real client uses (measured against kube-apiserver 1.35.4 in
tests/integration/test_canary_modules.py):

- a JSON patch that cannot be applied (a failed ``test``, a path that is gone): HTTP 422, reason Invalid,
  message "the server rejected our request due to an error in our request", details without causes;
- a schema error (a weight that is not an integer): HTTP 422, reason Invalid, details with causes;
- a patch that sets a stale metadata.resourceVersion: HTTP 409, reason Conflict;
- ``forbidden``: HTTP 403 with the RBAC message; a missing object: HTTP 404.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import copy
import json

import jsonpatch
from kubernetes.client.exceptions import ApiException

from ansible_collections.onprem.mesh.plugins.module_utils.k8s_client import ISTIO_GROUP, api_error

TEST_OP_REFUSED = "the server rejected our request due to an error in our request"
KINDS = {"virtualservices": "VirtualService", "destinationrules": "DestinationRule"}


def server_answer(status, reason, body, what, **request):
    """The K8sError the real client (IstioObjects) makes of this answer of kube-apiserver."""
    exc = ApiException(status=status, reason=reason)
    exc.body = json.dumps(dict({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": status}, **body))
    return api_error(exc, what, **request)


def refused_patch(what, **request):
    return server_answer(422, "Unprocessable Entity", {"message": TEST_OP_REFUSED, "reason": "Invalid", "details": {}}, what, **request)


def _pointer_parts(path):
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def _test_null(doc, path):
    """evanphx/json-patch v4: ``{"op": "test", "value": null}`` passes when the key is missing from an existing
    object, fails when the key is there or the object holding it is missing."""
    parts = _pointer_parts(path)
    node = doc
    for part in parts[:-1]:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return isinstance(node, dict) and parts[-1] not in node


def _schema_causes(obj):
    """The one rule of Istio's CRD schema the engine could break: weights are integers."""
    causes = []
    for i, route in enumerate((obj.get("spec") or {}).get("http") or []):
        for j, dest in enumerate(route.get("route") or []):
            weight = dest.get("weight")
            if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int)):
                field = "spec.http[%d].route[%d].weight" % (i, j)
                kind = type(weight).__name__
                causes.append({"reason": "FieldValueTypeInvalid", "field": field,
                               "message": 'Invalid value: "%s": %s in body must be of type integer: "%s"' % (kind, field, kind)})
    return causes


class FakeIstio:
    def __init__(self, objects):
        self.objects = {}
        self.rv = 100
        for obj in objects:
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            meta.setdefault("namespace", "default")
            meta.setdefault("generation", 1)
            self.rv += 1
            meta["resourceVersion"] = str(self.rv)
            self.objects[(self.plural(obj["kind"]), meta["namespace"], meta["name"])] = obj
        self.namespaces = set(ns for (_p, ns, _n) in self.objects)
        self.calls = {"read": 0, "write": 0}
        self.patches = []
        self.interfere = []   # functions applied to the object before the next patches, one per patch
        self.forbidden = False
        self.refuse = []      # errors (K8sError) the server answers to the next patches, one per patch
        self.user = "system:serviceaccount:shop:canary"

    @staticmethod
    def plural(kind):
        return kind.lower() + "s"

    def get(self, plural, namespace, name):
        self.calls["read"] += 1
        try:
            return copy.deepcopy(self.objects[(plural, namespace, name)])
        except KeyError:
            raise server_answer(404, "Not Found", {"message": '%s.%s "%s" not found' % (plural, ISTIO_GROUP, name), "reason": "NotFound",
                                                   "details": {"name": name, "group": ISTIO_GROUP, "kind": plural}},
                                "reading %s %s/%s" % (KINDS.get(plural, plural), namespace, name),
                                verb="get", resource=plural, namespace=namespace, group=ISTIO_GROUP)

    def list(self, plural, namespace):
        self.calls["read"] += 1
        return [copy.deepcopy(o) for (p, ns, _n), o in sorted(self.objects.items()) if p == plural and ns == namespace]

    def namespace_exists(self, namespace):
        self.calls["read"] += 1
        return namespace in self.namespaces

    def json_patch(self, plural, namespace, name, operations):
        self.calls["write"] += 1
        what = "patching %s %s/%s" % (plural, namespace, name)
        request = dict(verb="patch", resource=plural, namespace=namespace, group=ISTIO_GROUP, guarded=any(op["op"] == "test" for op in operations))
        if self.forbidden:
            raise server_answer(403, "Forbidden", {
                "message": '%s.%s "%s" is forbidden: User "%s" cannot patch resource "%s" in API group "%s" in the namespace "%s"'
                           % (plural, ISTIO_GROUP, name, self.user, plural, ISTIO_GROUP, namespace),
                "reason": "Forbidden", "details": {"name": name, "group": ISTIO_GROUP, "kind": plural}}, what, **request)
        if self.refuse:
            raise self.refuse.pop(0)
        key = (plural, namespace, name)
        if self.interfere:
            change = self.interfere.pop(0)
            change(self.objects[key])
            self.rv += 1
            self.objects[key]["metadata"]["resourceVersion"] = str(self.rv)
        json.dumps(operations)  # what the client would send must be JSON
        self.patches.append(operations)
        current = self.objects[key]
        rest = []
        for op in operations:
            if op["op"] == "test" and op.get("value") is None:
                if not _test_null(current, op["path"]):
                    raise refused_patch(what, **request)
            else:
                rest.append(op)
        try:
            patched = jsonpatch.apply_patch(current, rest)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException):
            raise refused_patch(what, **request)
        if patched["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            raise server_answer(409, "Conflict", {
                "message": 'Operation cannot be fulfilled on %s.%s "%s": the object has been modified; please apply your changes to the latest'
                           ' version and try again' % (plural, ISTIO_GROUP, name),
                "reason": "Conflict", "details": {"name": name, "group": ISTIO_GROUP, "kind": plural}}, what, **request)
        causes = _schema_causes(patched)
        if causes:
            raise server_answer(422, "Unprocessable Entity", {
                "message": '%s.%s "%s" is invalid: %s' % (KINDS.get(plural, plural), ISTIO_GROUP, name,
                                                          ", ".join(c["field"] + ": " + c["message"] for c in causes)),
                "reason": "Invalid", "details": {"name": name, "group": ISTIO_GROUP, "kind": KINDS.get(plural, plural), "causes": causes}}, what, **request)
        if patched.get("spec") != current.get("spec"):
            patched["metadata"]["generation"] = current["metadata"]["generation"] + 1
        self.rv += 1
        patched["metadata"]["resourceVersion"] = str(self.rv)
        self.objects[key] = patched
        return copy.deepcopy(patched)

    def route(self, name="reviews", namespace="default", index=0):
        return self.objects[("virtualservices", namespace, name)]["spec"]["http"][index]


def serve(monkeypatch, fake, modules):
    """Make the modules in `modules` (traffic_split, canary_rollout) talk to `fake` instead of a cluster."""
    for module in modules:
        monkeypatch.setattr(module, "build_api_client", lambda params: object())
        monkeypatch.setattr(module, "IstioObjects", lambda api_client: fake)
    return fake
