"""TEST DOUBLE (onprem.mesh k8s_double): storage and verb semantics of the fake Kubernetes API (no HTTP here).

Behaves like kube-apiserver where the project's clients can tell: resourceVersion (one global increasing counter,
as a string), uid, creationTimestamp, metadata.generation (1 on create, +1 only when something other than metadata
and status changes), status subresource split, optimistic concurrency (409), no-op updates (no new resourceVersion),
finalizers (deletionTimestamp until they are removed), watch events. Not simulated: admission webhooks, managedFields,
conversion webhooks, garbage collection of dependents, real controllers (a tiny optional deployment "controller"
marks Deployments rolled out, see Api.controllers).
"""
import base64
import collections
import copy
import datetime
import json
import random
import threading
import time
import uuid

import yaml

from . import errors, patching, schema, selectors
from .registry import Registry, crd_to_type

DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
PATCH_TYPES_CR = ["application/json-patch+json", "application/merge-patch+json", "application/apply-patch+yaml"]
PATCH_TYPES_BUILTIN = PATCH_TYPES_CR + ["application/strategic-merge-patch+json"]
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"


def now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Request:  # pylint: disable=too-many-instance-attributes
    """One resource request after routing."""

    # pylint: disable-next=too-many-arguments,too-many-positional-arguments
    def __init__(self, rtype, version, namespace=None, name=None, subresource="", query=None, user="system:admin"):
        self.rtype = rtype
        self.version = version
        self.namespace = namespace
        self.name = name
        self.subresource = subresource
        self.query = query or {}
        self.user = user
        self.warnings = []
        self.created = False  # a server-side apply that created the object answers 201
        self.verb = ""

    def q(self, key, default=""):
        value = self.query.get(key, default)
        return value[0] if isinstance(value, list) else value

    @property
    def validation(self):
        return self.q("fieldValidation", "Warn") or "Warn"


class Api:  # pylint: disable=too-many-public-methods,too-many-instance-attributes
    """The object store and the verbs. Thread-safe (one lock; writes are serialized like etcd transactions)."""

    def __init__(self, controllers=True):
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.registry = Registry()
        self.rv = 0
        self.objects = {}  # (group, plural) -> {(namespace, name): stored object}
        self.events = collections.deque(maxlen=20000)  # (rv, key, namespace, type, object)
        self.first_event_rv = 1
        self.controllers = controllers
        self.on_write = None  # callable() after every write (state persistence)
        self.bump_hooks = []  # callables(request, verb, obj) for fault injection around writes
        with self.lock:
            self._bootstrap()

    def _bootstrap(self):
        for name in DEFAULT_NAMESPACES:
            self._insert(self.registry.types[("", "namespaces")], {
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}},
                "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})

    # ------------------------------------------------------------------------------------------ helpers
    def _next_rv(self):
        self.rv += 1
        return str(self.rv)

    def _table(self, rtype):
        return self.objects.setdefault(rtype.key, {})

    def _record(self, etype, rtype, obj, old=None):
        """Append a watch event; `old` (the replaced stored object, never mutated) lets watches see selector transitions."""
        self.events.append((int(obj["metadata"]["resourceVersion"]), rtype.key, obj["metadata"].get("namespace"), etype,
                            copy.deepcopy(obj), old))
        if len(self.events) == self.events.maxlen:
            self.first_event_rv = self.events[0][0]
        self.changed.notify_all()
        if self.on_write:
            self.on_write()

    def _insert(self, rtype, obj):
        """Store a new object without any checks (initial namespaces, snapshots, CRD bootstrap)."""
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", now())
        meta["resourceVersion"] = self._next_rv()
        if rtype.has_generation:
            meta.setdefault("generation", 1)
        self._table(rtype)[(meta.get("namespace"), meta["name"])] = obj
        self._record("ADDED", rtype, obj)
        return obj

    @staticmethod
    def render(rtype, obj, version):
        out = copy.deepcopy(obj)
        out["apiVersion"] = rtype.api_version(version)
        out["kind"] = rtype.kind
        return out

    def _namespace_exists(self, namespace):
        return (None, namespace) in self._table(self.registry.types[("", "namespaces")])

    def _current(self, req):
        obj = self._table(req.rtype).get((req.namespace if req.rtype.namespaced else None, req.name))
        if obj is None:
            raise errors.not_found(req.rtype.plural, req.rtype.group, req.name)
        return obj

    def _schema(self, rtype, version):
        return rtype.schemas.get(version) if not rtype.builtin else None

    # ------------------------------------------------------------------------------------------ decoding
    def _check_type_meta(self, req, obj):
        if not isinstance(obj, dict):
            raise errors.bad_request("the object provided is unrecognized (must be of type object)")
        want = req.rtype.api_version(req.version)
        kind = obj.get("kind")
        if obj.get("apiVersion") and obj.get("apiVersion") != want and req.rtype.builtin is False:
            raise errors.bad_request(f"the API version in the data ({obj['apiVersion']}) does not match the expected API version ({want})")
        if kind and kind != req.rtype.kind:
            raise errors.bad_request(f"{kind} in version \"{req.version}\" cannot be handled as a {req.rtype.kind}: "
                                     f"no kind \"{kind}\" is registered for version \"{want}\"")
        if not req.rtype.builtin and (not obj.get("apiVersion") or not kind):
            missing = "kind" if not kind else "apiVersion"
            raise errors.bad_request(f"Object '{'Kind' if missing == 'kind' else 'apiVersion'}' is missing in '{json.dumps(obj)[:200]}'")

    def _prune_and_warn(self, req, obj, is_patch=False, patched=None):
        """Prune unknown fields of a custom resource; Warn adds warnings, Strict fails like the real decoder."""
        body_schema = self._schema(req.rtype, req.version)
        if body_schema is None:
            return
        removed = schema.prune(obj, body_schema)
        if not removed:
            return
        unknown = [f'unknown field "{p}"' for p in removed]
        if req.validation == "Strict":
            if is_patch:  # like the real patch handler: NewInvalid(GroupKind{}, "", patch: Invalid value: <patched JSON>)
                raise errors.invalid("", "", "", [errors.FieldError("FieldValueInvalid", "patch", patched or "",
                                                                    f"strict decoding error: {', '.join(unknown)}")])
            raise errors.bad_request(f"{req.rtype.kind} in version \"{req.version}\" cannot be handled as a {req.rtype.kind}: "
                                     f"strict decoding error: {', '.join(unknown)}")
        if req.validation != "Ignore":
            req.warnings.extend(unknown)

    def _validate(self, req, obj):
        rtype = req.rtype
        meta = obj.get("metadata") or {}
        errs = schema.metadata_errors(meta, name_rule=rtype.name_rule)
        body_schema = self._schema(rtype, req.version)
        if body_schema:
            errs.extend(schema.validate(obj, body_schema, rtype.validators))
        errs.extend(builtin_errors(rtype, obj))
        if errs:
            raise errors.invalid(rtype.kind, rtype.group, meta.get("name") or "", errs)

    # ------------------------------------------------------------------------------------------ verbs
    def get(self, req):
        with self.lock:
            if req.subresource == "scale":
                return scale_view(self._current(req))
            return self.render(req.rtype, self._current(req), req.version)

    def list(self, req):
        with self.lock:
            items = self._select(req)
            rv = str(self.rv)
        limit = int(req.q("limit", "0") or 0)
        start = 0
        cont = req.q("continue")
        if cont:
            try:
                start = int(json.loads(base64.b64decode(cont))["start"])
            except (ValueError, KeyError, TypeError) as exc:
                raise errors.bad_request("continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)") from exc
        page = items[start:start + limit] if limit else items[start:]
        meta = {"resourceVersion": rv}
        if limit and start + limit < len(items):
            meta["continue"] = base64.b64encode(json.dumps({"start": start + limit}).encode()).decode()
            meta["remainingItemCount"] = len(items) - start - limit
        rendered = []
        for obj in page:
            item = self.render(req.rtype, obj, req.version)
            if req.rtype.builtin:
                item.pop("apiVersion", None)
                item.pop("kind", None)
            rendered.append(item)
        return {"apiVersion": req.rtype.api_version(req.version), "kind": req.rtype.list_kind, "metadata": meta, "items": rendered}

    def _select(self, req):
        labels = selectors.parse_label_selector(req.q("labelSelector"))
        fields = selectors.parse_field_selector(req.q("fieldSelector"), req.rtype.plural)
        out = []
        for (namespace, _name), obj in sorted(self._table(req.rtype).items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
            if req.rtype.namespaced and req.namespace and namespace != req.namespace:
                continue
            if not selectors.match_labels(labels, obj["metadata"].get("labels")) or not selectors.match_fields(fields, obj):
                continue
            out.append(obj)
        return out

    def matcher(self, req):
        """A predicate over stored objects for watches of this request."""
        labels = selectors.parse_label_selector(req.q("labelSelector"))
        fields = selectors.parse_field_selector(req.q("fieldSelector"), req.rtype.plural)

        def match(namespace, obj):
            if req.rtype.namespaced and req.namespace and namespace != req.namespace:
                return False
            if req.name and obj["metadata"]["name"] != req.name:
                return False
            return selectors.match_labels(labels, obj["metadata"].get("labels")) and selectors.match_fields(fields, obj)
        return match

    def create(self, req, obj):  # pylint: disable=too-many-branches
        rtype = req.rtype
        if req.subresource:
            raise errors.method_not_supported(rtype.plural, rtype.group, "create")
        self._check_type_meta(req, obj)
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise errors.bad_request("metadata must be an object")
        if rtype.namespaced:
            if meta.get("namespace") and meta["namespace"] != req.namespace:
                raise errors.bad_request("the namespace of the provided object does not match the namespace sent on the request")
            meta["namespace"] = req.namespace
        else:
            meta.pop("namespace", None)
        self._prune_and_warn(req, obj)
        with self.lock:
            if rtype.namespaced and not self._namespace_exists(req.namespace):
                raise errors.not_found("namespaces", "", req.namespace)
            if not meta.get("name") and meta.get("generateName"):
                for _attempt in range(20):
                    candidate = meta["generateName"] + "".join(random.choice(_NAME_CHARS) for _letter in range(5))
                    if (meta.get("namespace"), candidate) not in self._table(rtype):
                        meta["name"] = candidate
                        break
            sent_rv = meta.get("resourceVersion")
            for key in ("uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
                        "deletionGracePeriodSeconds", "managedFields", "selfLink"):
                meta.pop(key, None)
            if rtype.has_status(req.version) and not rtype.builtin:
                obj.pop("status", None)
            obj["apiVersion"] = rtype.api_version()
            obj["kind"] = rtype.kind
            default_builtin(rtype, obj, self)
            self._validate(req, obj)
            if sent_rv:  # etcd3 store.Create refuses it; the handler turns that plain error into a 500
                raise errors.internal_error("resourceVersion should not be set on objects to be created")
            if (meta.get("namespace"), meta["name"]) in self._table(rtype):
                raise errors.already_exists(rtype.plural, rtype.group, meta["name"])
            if rtype.key == ("apiextensions.k8s.io", "customresourcedefinitions"):
                self._register_crd(obj)
            stored = self._insert(rtype, obj)
            result = self.render(rtype, stored, req.version)
            self._after_write(rtype, stored)
        return result

    def update(self, req, obj, from_patch=False, patched_text=None):  # pylint: disable=too-many-branches,too-many-statements
        rtype = req.rtype
        if req.subresource == "scale":
            return self._update_scale(req, obj)
        self._check_type_meta(req, obj)
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if meta.get("name") and meta["name"] != req.name:
            raise errors.bad_request(f"the name of the object ({meta['name']}) does not match the name on the URL ({req.name})")
        if rtype.namespaced and meta.get("namespace") and meta["namespace"] != req.namespace:
            raise errors.bad_request("the namespace of the provided object does not match the namespace sent on the request")
        if req.subresource and req.subresource not in rtype.subresources.get(req.version, ()):
            raise errors.path_not_found()
        self._prune_and_warn(req, obj, is_patch=from_patch, patched=patched_text)
        with self.lock:
            if not from_patch:
                for hook in list(self.bump_hooks):
                    hook(req, "write")
            current = self._current(req)
            sent_rv = meta.get("resourceVersion")
            if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
                raise errors.stale(rtype.plural, rtype.group, req.name)
            if not sent_rv and not from_patch and not rtype.builtin:
                raise errors.invalid(rtype.kind, rtype.group, req.name, [errors.FieldError(
                    "FieldValueInvalid", "metadata.resourceVersion", errors.Raw("0x0"), "must be specified for an update")])
            new = self._merge_for_update(req, current, obj)
            default_builtin(rtype, new, self)
            self._validate(req, new)
            old_cmp = _without_rv(current)
            if _without_rv(new) == old_cmp:
                return self.render(rtype, current, req.version)
            if rtype.has_generation and _generation_changed(rtype, req.version, current, new):
                new["metadata"]["generation"] = int(current["metadata"].get("generation", 1)) + 1
            new["metadata"]["resourceVersion"] = self._next_rv()
            key = (new["metadata"].get("namespace"), req.name)
            if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
                del self._table(rtype)[key]
                self._record("DELETED", rtype, new)
                return self.render(rtype, new, req.version)
            self._table(rtype)[key] = new
            self._record("MODIFIED", rtype, new, current)
            result = self.render(rtype, new, req.version)
            self._after_write(rtype, new)
        return result

    def _update_scale(self, req, scale):
        """PUT/PATCH of the autoscaling/v1 Scale subresource: only spec.replicas reaches the object."""
        if not isinstance(scale, dict) or (scale.get("kind") and scale.get("kind") != "Scale"):
            raise errors.bad_request("the object provided is not an autoscaling/v1 Scale")
        replicas = (scale.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise errors.invalid("Scale", "autoscaling", req.name, [errors.FieldError(
                "FieldValueInvalid", "spec.replicas", replicas, "must be greater than or equal to 0")])
        with self.lock:
            current = self._current(req)
            sent_rv = (scale.get("metadata") or {}).get("resourceVersion")
            if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
                raise errors.stale(req.rtype.plural, req.rtype.group, req.name)
            new = copy.deepcopy(current)
            new.setdefault("spec", {})["replicas"] = replicas
            full = Request(req.rtype, req.version, req.namespace, req.name, "", req.query, req.user)
            self.update(full, new, from_patch=True)
            return scale_view(self._current(req))

    def _merge_for_update(self, req, current, obj):
        rtype = req.rtype
        if req.subresource == "status":
            new = copy.deepcopy(current)
            if "status" in obj:
                new["status"] = copy.deepcopy(obj["status"])
            else:
                new.pop("status", None)
            return new
        new = copy.deepcopy(obj)
        new["apiVersion"] = rtype.api_version()
        new["kind"] = rtype.kind
        meta = new["metadata"]
        cur_meta = current["metadata"]
        for key in ("uid", "creationTimestamp", "generation", "deletionTimestamp", "deletionGracePeriodSeconds", "name", "namespace"):
            if key in cur_meta:
                meta[key] = cur_meta[key]
            else:
                meta.pop(key, None)
        meta.pop("managedFields", None)
        meta.pop("selfLink", None)
        if rtype.has_status(req.version):
            if "status" in current:
                new["status"] = copy.deepcopy(current["status"])
            else:
                new.pop("status", None)
        return new

    def patch(self, req, content_type, body):  # pylint: disable=too-many-branches
        rtype = req.rtype
        ctype = (content_type or "").split(";")[0].strip().lower()
        accepted = PATCH_TYPES_BUILTIN if rtype.builtin else PATCH_TYPES_CR
        if ctype not in accepted:
            raise errors.unsupported_media_type(
                "the body of the request was in an unknown format - accepted media types include: " + ", ".join(accepted))
        if ctype == "application/apply-patch+yaml":
            return self._apply(req, body)
        with self.lock:
            for hook in list(self.bump_hooks):
                hook(req, "write")
            current = self.render(rtype, self._current(req), req.version)
            if req.subresource == "scale":
                current = scale_view(self._current(req))
            text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
            if ctype == "application/json-patch+json":
                patched = patching.json_patch(current, text)
            elif ctype == "application/merge-patch+json":
                patched = patching.merge_patch(current, text)
            else:
                patched = patching.strategic_merge_patch(current, text)
            if not isinstance(patched, dict):
                raise errors.bad_request("the patched object is not a JSON object")
            return self.update(req, patched, from_patch=True, patched_text=json.dumps(patched, separators=(",", ":")))

    def _apply(self, req, body):  # pylint: disable=too-many-locals
        rtype = req.rtype
        if not req.q("fieldManager"):
            raise errors.invalid("PatchOptions", "meta.k8s.io", "", [errors.FieldError(
                "FieldValueRequired", "fieldManager", detail="is required for apply patch")])
        try:
            applied = yaml.safe_load(body)
        except yaml.YAMLError as exc:
            raise errors.bad_request(f"error decoding YAML: {exc}") from exc
        if not isinstance(applied, dict):
            raise errors.bad_request("error decoding YAML: the applied configuration is not an object")
        self._check_type_meta(req, applied)
        name = (applied.get("metadata") or {}).get("name")
        if name and name != req.name:
            raise errors.bad_request(f"the name of the object ({name}) does not match the name on the URL ({req.name})")
        keys = patching.list_map_keys(self._schema(rtype, req.version) or {})
        body_schema = self._schema(rtype, req.version)
        if body_schema is not None and req.validation == "Strict":
            removed = schema.prune(copy.deepcopy(applied), body_schema)
            if removed:  # the typed (structured-merge-diff) conversion of the apply configuration fails: a 500 without reason
                raise errors.ApiError(500, "", f"failed to create typed patch object ({req.namespace + '/' if req.namespace else ''}"
                                      f"{req.name}; {rtype.api_version(req.version)}, Kind={rtype.kind}): "
                                      + ", ".join(f".{p}: field not declared in schema" for p in removed))
        with self.lock:
            for hook in list(self.bump_hooks):
                hook(req, "write")
            existing = self._table(rtype).get((req.namespace if rtype.namespaced else None, req.name))
            if existing is None:
                if req.subresource:
                    raise errors.not_found(rtype.plural, rtype.group, req.name)
                fresh = patching.apply_merge({}, applied, keys, rtype.builtin)
                fresh.setdefault("metadata", {})["name"] = req.name
                for key in ("resourceVersion", "uid", "creationTimestamp", "generation"):  # WipeObjectMetaSystemFields
                    fresh["metadata"].pop(key, None)
                req.created = True
                return self.create(req, fresh)
            current = self.render(rtype, existing, req.version)
            merged = patching.apply_merge(current, applied, keys, rtype.builtin)
            merged["metadata"]["resourceVersion"] = (applied.get("metadata") or {}).get("resourceVersion") or \
                current["metadata"]["resourceVersion"]
            return self.update(req, merged, from_patch=True, patched_text=json.dumps(merged, separators=(",", ":")))

    def delete(self, req, options=None):  # pylint: disable=too-many-branches
        rtype = req.rtype
        options = options or {}
        with self.lock:
            for hook in list(self.bump_hooks):
                hook(req, "write")
            current = self._current(req)
            pre = options.get("preconditions") or {}
            if pre.get("uid") and pre["uid"] != current["metadata"]["uid"]:
                raise errors.conflict(rtype.plural, rtype.group, req.name,
                                      f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {current['metadata']['uid']}")
            if pre.get("resourceVersion") and pre["resourceVersion"] != current["metadata"]["resourceVersion"]:
                raise errors.conflict(rtype.plural, rtype.group, req.name,
                                      f"the ResourceVersion in the precondition ({pre['resourceVersion']}) does not match the "
                                      f"ResourceVersion in record ({current['metadata']['resourceVersion']}). The object might have been modified")
            key = (current["metadata"].get("namespace"), req.name)
            if current["metadata"].get("finalizers"):
                if not current["metadata"].get("deletionTimestamp"):
                    new = copy.deepcopy(current)
                    new["metadata"]["deletionTimestamp"] = now()
                    new["metadata"]["deletionGracePeriodSeconds"] = 0
                    new["metadata"]["resourceVersion"] = self._next_rv()
                    self._table(rtype)[key] = new
                    self._record("MODIFIED", rtype, new, current)
                    current = new
                return self.render(rtype, current, req.version)
            if rtype.key == ("", "namespaces"):
                self._drop_namespace(req.name)
            if rtype.key == ("apiextensions.k8s.io", "customresourcedefinitions"):
                self._unregister_crd(current)
            gone = copy.deepcopy(current)
            del self._table(rtype)[key]
            gone["metadata"]["resourceVersion"] = self._next_rv()
            self._record("DELETED", rtype, gone)
            if rtype.key == ("", "namespaces"):
                gone["metadata"]["deletionTimestamp"] = now()
                gone.setdefault("status", {})["phase"] = "Terminating"
            if rtype.return_deleted_object:
                return self.render(rtype, gone, req.version)
        details = {"name": req.name}
        if rtype.group:
            details["group"] = rtype.group
        details.update({"kind": rtype.plural, "uid": gone["metadata"]["uid"]})
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}

    def delete_collection(self, req, options=None):
        with self.lock:
            victims = self._select(req)
            deleted = []
            for obj in victims:
                sub = Request(req.rtype, req.version, obj["metadata"].get("namespace"), obj["metadata"]["name"], query={}, user=req.user)
                result = self.delete(sub, options)
                if result.get("kind") != "Status":
                    deleted.append(result)
        return {"apiVersion": req.rtype.api_version(req.version), "kind": req.rtype.list_kind,
                "metadata": {"resourceVersion": str(self.rv)}, "items": deleted}

    def _drop_namespace(self, namespace):
        """Namespace deletion, simplified: contents are removed at once (no Terminating phase that lasts)."""
        for rtype in list(self.registry.types.values()):
            if not rtype.namespaced:
                continue
            table = self._table(rtype)
            for key in [k for k in table if k[0] == namespace]:
                gone = table.pop(key)
                gone["metadata"]["resourceVersion"] = self._next_rv()
                self._record("DELETED", rtype, gone)

    def watch(self, req, deadline, stopped):  # pylint: disable=too-many-locals
        """Yield watch events ({"type", "object"}) for a request until the deadline (time.monotonic()) or stop."""
        match = self.matcher(req)
        rv_param = req.q("resourceVersion")
        initial_events = req.q("sendInitialEvents") == "true" or rv_param in ("", "0")
        with self.lock:
            if initial_events:
                initial = [self.render(req.rtype, o, req.version) for o in self._select(req) if match(o["metadata"].get("namespace"), o)]
                last = self.rv
            else:
                try:
                    last = int(rv_param)
                except ValueError as exc:
                    raise errors.bad_request(f"invalid resource version: {rv_param}") from exc
                initial = []
                if last < self.first_event_rv - 1:
                    yield {"type": "ERROR", "object": errors.gone(
                        f"too old resource version: {last} ({self.first_event_rv - 1})").status()}
                    return
        for obj in initial:
            yield {"type": "ADDED", "object": obj}
        if req.q("sendInitialEvents") == "true" and req.q("allowWatchBookmarks") == "true":
            yield {"type": "BOOKMARK", "object": {"kind": req.rtype.kind, "apiVersion": req.rtype.api_version(req.version), "metadata": {
                "resourceVersion": str(last), "annotations": {"k8s.io/initial-events-end": "true"}}}}
        while not stopped() and time.monotonic() < deadline:
            with self.lock:
                pending = [e for e in self.events if e[0] > last and e[1] == req.rtype.key]
                if not pending:
                    self.changed.wait(min(0.5, max(0.0, deadline - time.monotonic())))
                    continue
            for rv, _key, namespace, etype, obj, old in pending:
                last = max(last, rv)
                now_in = match(namespace, obj)
                etype = _watch_type(etype, now_in, match(namespace, old) if old is not None else now_in)
                if etype:
                    yield {"type": etype, "object": self.render(req.rtype, obj, req.version)}

    # ------------------------------------------------------------------------------------------ CRDs
    def _register_crd(self, crd):
        try:
            rtype = crd_to_type(crd)
        except (KeyError, IndexError, TypeError) as exc:
            raise errors.invalid("CustomResourceDefinition", "apiextensions.k8s.io", crd["metadata"].get("name", ""),
                                 [errors.FieldError("FieldValueInvalid", "spec", "object", f"incomplete definition: {exc}")]) from exc
        expected = f"{rtype.plural}.{rtype.group}"
        if crd["metadata"]["name"] != expected:
            raise errors.invalid("CustomResourceDefinition", "apiextensions.k8s.io", crd["metadata"]["name"], [errors.FieldError(
                "FieldValueInvalid", "metadata.name", crd["metadata"]["name"], "must be spec.names.plural+\".\"+spec.group")])
        self.registry.add(rtype)
        crd["status"] = {
            "acceptedNames": dict(crd["spec"]["names"]),
            "conditions": [{"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": now()} for t, r, m in (
                ("NamesAccepted", "NoConflicts", "no conflicts found"),
                ("Established", "InitialNamesAccepted", "the initial names have been accepted"))],
            "storedVersions": [rtype.storage_version]}

    def _unregister_crd(self, crd):
        spec = crd.get("spec") or {}
        key = (spec.get("group"), (spec.get("names") or {}).get("plural"))
        rtype = self.registry.types.get(key)
        if rtype:
            for obj in list(self._table(rtype).values()):
                obj = copy.deepcopy(obj)
                obj["metadata"]["resourceVersion"] = self._next_rv()
                self._record("DELETED", rtype, obj)
            self.objects.pop(key, None)
            self.registry.remove(key)

    def load_crd(self, crd):
        """Register a CRD at start-up (also stored as an apiextensions object, so `kubectl get crd` lists it)."""
        crd = copy.deepcopy(crd)
        crd.setdefault("metadata", {})
        for key in ("creationTimestamp", "resourceVersion", "uid"):
            crd["metadata"].pop(key, None)
        with self.lock:
            self._register_crd(crd)
            self._insert(self.registry.types[("apiextensions.k8s.io", "customresourcedefinitions")], crd)

    # ------------------------------------------------------------------------------------------ controllers
    def _after_write(self, rtype, obj):
        """The optional stand-in for kube-controller-manager: Deployments become fully rolled out at once."""
        if not self.controllers or rtype.key != ("apps", "deployments"):
            return
        spec = obj.get("spec") or {}
        replicas = spec.get("replicas", 1)
        status = {"observedGeneration": obj["metadata"].get("generation", 1), "replicas": replicas, "updatedReplicas": replicas,
                  "readyReplicas": replicas, "availableReplicas": replicas,
                  "conditions": [
                      {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
                       "message": "Deployment has minimum availability.", "lastUpdateTime": now(), "lastTransitionTime": now()},
                      {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                       "message": f'ReplicaSet "{obj["metadata"]["name"]}" has successfully progressed.',
                       "lastUpdateTime": now(), "lastTransitionTime": now()}]}
        if replicas == 0:
            for key in ("readyReplicas", "availableReplicas", "updatedReplicas", "replicas"):
                status.pop(key)
        old = obj.get("status") or {}
        if {k: v for k, v in old.items() if k != "conditions"} == {k: v for k, v in status.items() if k != "conditions"}:
            return
        new = copy.deepcopy(obj)
        new["status"] = status
        new["metadata"]["resourceVersion"] = self._next_rv()
        self._table(rtype)[(new["metadata"].get("namespace"), new["metadata"]["name"])] = new
        self._record("MODIFIED", rtype, new, obj)

    # ------------------------------------------------------------------------------------------ state
    def snapshot(self):
        with self.lock:
            objects = []
            for key, table in self.objects.items():
                for obj in table.values():
                    objects.append({"group": key[0], "resource": key[1], "object": copy.deepcopy(obj)})
            return {"kind": "K8sDoubleSnapshot", "testDouble": "onprem.mesh k8s_double", "resourceVersion": self.rv, "objects": objects}

    def load(self, snap):
        """Replace the whole state with a snapshot (CRD objects are registered first)."""
        with self.lock:
            for key in list(self.registry.types):
                if not self.registry.types[key].builtin:
                    self.registry.remove(key)
            self.objects = {}
            entries = snap.get("objects") or []
            entries.sort(key=lambda e: e["resource"] != "customresourcedefinitions")
            for entry in entries:
                if entry["resource"] == "customresourcedefinitions":
                    self._register_crd(entry["object"])
                rtype = self.registry.types.get((entry["group"], entry["resource"]))
                if rtype is None:
                    continue
                obj = copy.deepcopy(entry["object"])
                self._table(rtype)[(obj["metadata"].get("namespace"), obj["metadata"]["name"])] = obj
            self.rv = max(int(snap.get("resourceVersion") or 0), self.rv) + 1
            self.events.clear()
            self.first_event_rv = self.rv + 1
            self.changed.notify_all()


def scale_view(obj):
    """The autoscaling/v1 Scale of a Deployment/ReplicaSet/StatefulSet."""
    meta = obj["metadata"]
    spec = obj.get("spec") or {}
    labels = (spec.get("selector") or {}).get("matchLabels") or {}
    status = {"replicas": (obj.get("status") or {}).get("replicas", 0)}
    if labels:
        status["selector"] = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return {"kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp") if k in meta},
            "spec": {"replicas": spec.get("replicas", 1)}, "status": status}


def _watch_type(etype, matches_now, matched_before):
    """The event a filtered watch sees (like the watch cache): an object entering the selector is ADDED, one leaving
    it is DELETED, one outside it is not seen."""
    if etype == "MODIFIED":
        if matches_now and not matched_before:
            return "ADDED"
        if matched_before and not matches_now:
            return "DELETED"
    return etype if matches_now else None


def _without_rv(obj):
    out = copy.deepcopy(obj)
    out["metadata"].pop("resourceVersion", None)
    return out


def _generation_changed(rtype, version, old, new):
    skip = {"metadata", "apiVersion", "kind"}
    if rtype.builtin or rtype.has_status(version):
        skip.add("status")

    def strip(obj):
        return {k: v for k, v in obj.items() if k not in skip}
    return strip(old) != strip(new)


def _next_cluster_ip(api):
    used = {(o.get("spec") or {}).get("clusterIP") for o in api.objects.get(("", "services"), {}).values()}
    for index in range(10, 65000):
        candidate = f"10.96.{index // 250}.{index % 250 + 1}"
        if candidate not in used:
            return candidate
    return "None"


def default_builtin(rtype, obj, api):
    """The few defaults of built-in kinds that clients read back (not the full defaulting of the real server)."""
    specless = ("configmaps", "secrets", "events", "endpoints", "serviceaccounts")
    spec = obj.setdefault("spec", {}) if rtype.builtin and rtype.plural not in specless else obj.get("spec")
    if rtype.key == ("", "namespaces"):
        spec.setdefault("finalizers", ["kubernetes"])
        obj.setdefault("status", {}).setdefault("phase", "Active")
        obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"].get("name", "")
    elif rtype.key == ("apps", "deployments"):
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        spec.setdefault("strategy", {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}})
    elif rtype.key == ("", "services"):
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        if "clusterIP" not in spec:
            spec["clusterIP"] = _next_cluster_ip(api)
            spec["clusterIPs"] = [spec["clusterIP"]]
        for port in spec.get("ports") or []:
            if isinstance(port, dict):
                port.setdefault("protocol", "TCP")
                port.setdefault("targetPort", port.get("port"))
    elif rtype.key == ("", "pods"):
        spec.setdefault("restartPolicy", "Always")
        obj.setdefault("status", {}).setdefault("phase", "Pending")
    elif rtype.key == ("", "secrets") and not obj.get("type"):
        obj["type"] = "Opaque"


def builtin_errors(rtype, obj):  # pylint: disable=too-many-branches
    """Light validation of built-in kinds: the required fields clients most often forget."""
    errs = []
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    if rtype.key == ("apps", "deployments"):
        if not spec.get("selector"):
            errs.append(errors.FieldError("FieldValueRequired", "spec.selector"))
        template = spec.get("template") or {}
        labels = (template.get("metadata") or {}).get("labels") or {}
        wanted = (spec.get("selector") or {}).get("matchLabels") or {}
        if wanted and any(labels.get(k) != v for k, v in wanted.items()):
            errs.append(errors.FieldError("FieldValueInvalid", "spec.template.metadata.labels", labels,
                                          "`selector` does not match template `labels`"))
        if not (template.get("spec") or {}).get("containers"):
            errs.append(errors.FieldError("FieldValueRequired", "spec.template.spec.containers"))
        if isinstance(spec.get("replicas"), int) and spec["replicas"] < 0:
            errs.append(errors.FieldError("FieldValueInvalid", "spec.replicas", spec["replicas"], "must be greater than or equal to 0"))
    elif rtype.key == ("", "pods"):
        if not spec.get("containers"):
            errs.append(errors.FieldError("FieldValueRequired", "spec.containers"))
        for index, container in enumerate(spec.get("containers") or []):
            if isinstance(container, dict) and not container.get("image"):
                errs.append(errors.FieldError("FieldValueRequired", f"spec.containers[{index}].image"))
    elif rtype.key == ("", "services"):
        if spec.get("type", "ClusterIP") != "ExternalName" and not spec.get("ports") and spec.get("clusterIP") != "None":
            errs.append(errors.FieldError("FieldValueRequired", "spec.ports"))
    elif rtype.key == ("", "configmaps"):
        for key, value in (obj.get("data") or {}).items():
            if not isinstance(value, str):
                errs.append(errors.FieldError("FieldValueTypeInvalid", f"data.{key}", schema.type_name(value), "must be a string"))
    return errs
