"""TEST DOUBLE (onprem.mesh k8s_double): the resource types it serves and their discovery documents.

Built-in kinds are declared here by hand (a small subset of core/v1 and apps/v1); custom resources come from
CustomResourceDefinition objects (for example Istio's crd-all.gen.yaml), served at every version they serve.
"""
import hashlib
import os
import re
import threading

import yaml

_CACHE_LOCK = threading.Lock()
VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
SUB_VERBS = ["get", "patch", "update"]


class ResourceType:  # pylint: disable=too-many-instance-attributes
    """One served resource (all versions of one group/plural)."""

    def __init__(self, group, versions, plural, kind, namespaced=True, **opts):
        self.group = group
        self.versions = list(versions)
        self.storage_version = opts.get("storage_version") or self.versions[0]
        self.plural = plural
        self.kind = kind
        self.singular = opts.get("singular") or kind.lower()
        self.list_kind = opts.get("list_kind") or kind + "List"
        self.namespaced = namespaced
        self.short_names = list(opts.get("short_names") or [])
        self.categories = list(opts.get("categories") or [])
        self.subresources = dict(opts.get("subresources") or {})  # version -> set of subresource names
        self.schemas = dict(opts.get("schemas") or {})  # version -> openAPIV3Schema (custom resources only)
        self.printer_columns = dict(opts.get("printer_columns") or {})
        self.builtin = opts.get("builtin", False)
        self.name_rule = opts.get("name_rule", "subdomain")  # metadata.name format: subdomain, label or dns1035
        self.has_generation = opts.get("has_generation", not self.builtin)
        # DELETE answers the object (stores with ReturnDeletedObject: pods, services, namespaces, serviceaccounts) or a
        # Status "Success" (everything else, custom resources included); with pending finalizers always the object.
        self.return_deleted_object = opts.get("return_deleted_object", False)
        self.crd_name = opts.get("crd_name")
        self.validators = {}

    @property
    def key(self):
        return (self.group, self.plural)

    @property
    def qualified(self):
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def api_version(self, version=None):
        version = version or self.storage_version
        return f"{self.group}/{version}" if self.group else version

    def has_subresource(self, version, name):
        return name in self.subresources.get(version, ())

    def has_status(self, version=None):
        return self.has_subresource(version or self.storage_version, "status")


def _builtin_types():
    core = [
        ("namespaces", "Namespace", False, ["ns"], {"status", "finalize"}, {"name_rule": "label", "return_deleted_object": True}),
        ("pods", "Pod", True, ["po"], {"status"}, {"return_deleted_object": True}),
        ("services", "Service", True, ["svc"], {"status"}, {"name_rule": "dns1035", "return_deleted_object": True}),
        ("configmaps", "ConfigMap", True, ["cm"], set(), {}),
        ("secrets", "Secret", True, [], set(), {}),
        ("serviceaccounts", "ServiceAccount", True, ["sa"], set(), {"return_deleted_object": True}),
        ("events", "Event", True, ["ev"], set(), {}),
        ("endpoints", "Endpoints", True, ["ep"], set(), {"list_kind": "EndpointsList", "singular": "endpoints"}),
        ("nodes", "Node", False, ["no"], {"status"}, {}),
    ]
    apps = [
        ("deployments", "Deployment", True, ["deploy"], {"status", "scale"}, {"has_generation": True}),
        ("replicasets", "ReplicaSet", True, ["rs"], {"status", "scale"}, {"has_generation": True}),
        ("statefulsets", "StatefulSet", True, ["sts"], {"status", "scale"}, {"has_generation": True}),
        ("daemonsets", "DaemonSet", True, ["ds"], {"status"}, {"has_generation": True}),
    ]
    admission = [
        ("mutatingwebhookconfigurations", "MutatingWebhookConfiguration", False, [], set(), {"has_generation": True}),
        ("validatingwebhookconfigurations", "ValidatingWebhookConfiguration", False, [], set(), {"has_generation": True}),
    ]
    types = []
    for group, version, table in (("", "v1", core), ("apps", "v1", apps), ("admissionregistration.k8s.io", "v1", admission)):
        for plural, kind, namespaced, short, subs, extra in table:
            types.append(ResourceType(group, [version], plural, kind, namespaced, short_names=short, builtin=True,
                                      subresources={version: subs}, categories=["all"] if plural in (
                                          "pods", "services", "deployments", "replicasets", "statefulsets", "daemonsets") else [],
                                      **extra))
    types.append(ResourceType("apiextensions.k8s.io", ["v1"], "customresourcedefinitions", "CustomResourceDefinition", False,
                              short_names=["crd", "crds"], builtin=True, subresources={"v1": {"status"}}, has_generation=True,
                              return_deleted_object=True))
    return types


_VERSION_RE = re.compile(r"^v(\d+)(?:(alpha|beta)(\d+))?$")


def version_priority(version):
    """Sort key of the Kubernetes version priority (v1 > v1beta1 > v1alpha1 > others), highest first."""
    match = _VERSION_RE.match(version)
    if not match:
        return (3, 0, 0, version)
    major, stage, minor = int(match.group(1)), match.group(2), int(match.group(3) or 0)
    return ({None: 0, "beta": 1, "alpha": 2}[stage], -major, -minor, version)


def crd_to_type(crd):
    """A ResourceType from one apiextensions.k8s.io/v1 CustomResourceDefinition object."""
    spec = crd["spec"]
    names = spec["names"]
    served = [v for v in spec["versions"] if v.get("served", True)]
    storage = next((v["name"] for v in spec["versions"] if v.get("storage")), served[0]["name"])
    return ResourceType(
        spec["group"], [v["name"] for v in served], names["plural"], names["kind"], spec.get("scope", "Namespaced") == "Namespaced",
        singular=names.get("singular"), list_kind=names.get("listKind"), short_names=names.get("shortNames"),
        categories=names.get("categories"), storage_version=storage,
        subresources={v["name"]: set((v.get("subresources") or {}).keys()) for v in served},
        schemas={v["name"]: (v.get("schema") or {}).get("openAPIV3Schema") or {} for v in served},
        printer_columns={v["name"]: v.get("additionalPrinterColumns") or [] for v in served},
        crd_name=crd["metadata"]["name"])


_CRD_CACHE = {}


def load_crds(path):
    """Every CustomResourceDefinition document in a (multi-document) YAML file (parsed once per process; callers copy)."""
    stamp = (os.path.abspath(path), os.path.getmtime(path))
    with _CACHE_LOCK:
        if stamp not in _CRD_CACHE:
            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
            with open(path, encoding="utf-8") as handle:
                docs = [d for d in yaml.load_all(handle, Loader=loader) if d]  # nosec - safe loader
            _CRD_CACHE[stamp] = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
        return _CRD_CACHE[stamp]


class Registry:
    """The set of served resource types, and the discovery documents derived from it."""

    def __init__(self):
        self._lock = threading.RLock()
        self.types = {}
        for rtype in _builtin_types():
            self.types[rtype.key] = rtype

    def add(self, rtype):
        with self._lock:
            self.types[rtype.key] = rtype

    def remove(self, key):
        with self._lock:
            self.types.pop(key, None)

    def lookup(self, group, version, plural):
        rtype = self.types.get((group, plural))
        if rtype and version in rtype.versions:
            return rtype
        return None

    def by_kind(self, group, kind):
        for rtype in list(self.types.values()):
            if rtype.group == group and rtype.kind == kind:
                return rtype
        return None

    def groups(self):
        """group name -> versions, highest priority first."""
        result = {}
        for rtype in list(self.types.values()):
            if rtype.group:
                result.setdefault(rtype.group, set()).update(rtype.versions)
        return {g: sorted(v, key=version_priority) for g, v in sorted(result.items())}

    def group_document(self, group):
        versions = self.groups().get(group)
        if not versions:
            return None
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": entries, "preferredVersion": entries[0]}

    def group_list(self):
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
             "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}} for g, vs in self.groups().items()]}

    def resource_list(self, group, version):
        resources = []
        for rtype in sorted(list(self.types.values()), key=lambda t: t.plural):
            if rtype.group != group or version not in rtype.versions:
                continue
            entry = {"name": rtype.plural, "singularName": rtype.singular, "namespaced": rtype.namespaced, "kind": rtype.kind,
                     "verbs": list(VERBS)}
            if rtype.short_names:
                entry["shortNames"] = list(rtype.short_names)
            if rtype.categories:
                entry["categories"] = list(rtype.categories)
            entry["storageVersionHash"] = hashlib.sha256(f"{group}/{rtype.storage_version}/{rtype.kind}".encode()).hexdigest()[:12]
            resources.append(entry)
            for sub in sorted(rtype.subresources.get(version, ())):
                sub_entry = {"name": f"{rtype.plural}/{sub}", "singularName": "", "namespaced": rtype.namespaced, "kind": rtype.kind,
                             "verbs": list(SUB_VERBS)}
                if sub == "scale":
                    sub_entry.update({"group": "autoscaling", "version": "v1", "kind": "Scale"})
                if sub == "finalize":
                    sub_entry["verbs"] = ["update"]
                resources.append(sub_entry)
        if not resources:
            return None
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{group}/{version}" if group else version,
                "resources": resources}

    def openapi_v3_index(self):
        paths = {"api/v1": {"serverRelativeURL": "/openapi/v3/api/v1?hash=" + self._hash("", "v1")}}
        for group, versions in self.groups().items():
            for version in versions:
                paths[f"apis/{group}/{version}"] = {"serverRelativeURL": f"/openapi/v3/apis/{group}/{version}?hash=" + self._hash(group, version)}
        return {"paths": paths}

    def _hash(self, group, version):
        kinds = sorted(t.kind for t in list(self.types.values()) if t.group == group and version in t.versions)
        return hashlib.sha512(f"{group}/{version}:{','.join(kinds)}".encode()).hexdigest()[:32].upper()

    def openapi_v3(self, group, version):
        """A minimal OpenAPI v3 document: paths with their PATCH operations (the GVK extension, the fieldValidation
        parameter and the accepted patch media types), which is what kubectl 1.32 reads to decide on server-side
        field validation. Component schemas are not served (kubectl then computes patches from compiled-in types)."""
        doc_paths = {}
        found = False
        for rtype in list(self.types.values()):
            if rtype.group != group or version not in rtype.versions:
                continue
            found = True
            gvk = {"group": group, "version": version, "kind": rtype.kind}
            prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
            item = f"{prefix}/namespaces/{{namespace}}/{rtype.plural}/{{name}}" if rtype.namespaced else f"{prefix}/{rtype.plural}/{{name}}"
            media = ["application/json-patch+json", "application/merge-patch+json", "application/apply-patch+yaml"]
            params = [{"name": n, "in": "query", "schema": {"type": "string"}, "uniqueItems": True}
                      for n in ("dryRun", "fieldManager", "fieldValidation", "force")]
            op = {"operationId": f"patch{rtype.kind}", "x-kubernetes-action": "patch", "x-kubernetes-group-version-kind": gvk,
                  "parameters": params,
                  "requestBody": {"content": {m: {"schema": {"type": "object"}} for m in media}, "required": True},
                  "responses": {"200": {"description": "OK"}}}
            doc_paths[item] = {"patch": op, "put": {"x-kubernetes-action": "put", "x-kubernetes-group-version-kind": gvk,
                                                    "parameters": params[:3], "responses": {"200": {"description": "OK"}}}}
        if not found:
            return None
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes (onprem.mesh k8s_double TEST DOUBLE)", "version": "v1.32.0"},
                "paths": doc_paths, "components": {"schemas": {}}}
