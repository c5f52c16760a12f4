# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""An in-memory stand-in for IstioObjects, for unit tests of the pure engine.

It applies JSON patches with the jsonpatch library (RFC 6902, ``test`` included), keeps a
resourceVersion and a generation that moves only with ``spec``, and can be told to let another
writer change the object between a read and the next patch (a conflict).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import copy
import json

import jsonpatch

from ansible_collections.onprem.mesh.plugins.module_utils.k8s_client import K8sError


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
        self.calls = {"read": 0, "write": 0}
        self.patches = []
        self.interfere = []   # functions applied to the object before the next patches, one per patch
        self.forbidden = False
        self.refuse = []      # errors (K8sError) the server answers to the next patches, one per patch

    @staticmethod
    def plural(kind):
        return kind.lower() + "s"

    def get(self, plural, namespace, name):
        self.calls["read"] += 1
        try:
            return copy.deepcopy(self.objects[(plural, namespace, name)])
        except KeyError:
            raise K8sError("reading %s %s/%s: HTTP 404 not found" % (plural, namespace, name), status=404)

    def list(self, plural, namespace):
        self.calls["read"] += 1
        return [copy.deepcopy(o) for (p, ns, _n), o in sorted(self.objects.items()) if p == plural and ns == namespace]

    def json_patch(self, plural, namespace, name, operations):
        self.calls["write"] += 1
        if self.forbidden:
            raise K8sError("patching: HTTP 403 forbidden", status=403)
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
        try:
            patched = jsonpatch.apply_patch(current, operations)
        except (jsonpatch.JsonPatchTestFailed, jsonpatch.JsonPatchConflict) as exc:
            raise K8sError("patching: HTTP 422", status=422, body={"details": {"causes": [{"message": "testing value failed: test failed %s" % exc}]}})
        if patched.get("spec") != current.get("spec"):
            patched["metadata"]["generation"] = current["metadata"]["generation"] + 1
        self.rv += 1
        patched["metadata"]["resourceVersion"] = str(self.rv)
        self.objects[key] = patched
        return copy.deepcopy(patched)

    def route(self, name="reviews", namespace="default", index=0):
        return self.objects[("virtualservices", namespace, name)]["spec"]["http"][index]
