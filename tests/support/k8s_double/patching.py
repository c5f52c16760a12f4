"""TEST DOUBLE (onprem.mesh k8s_double): the four PATCH dialects of kube-apiserver.

- application/json-patch+json: RFC 6902 (the `jsonpatch` package); an op that does not apply (failed `test`, missing
  path) answers 422 Invalid "the server rejected our request due to an error in our request", like the real server.
- application/merge-patch+json: RFC 7386.
- application/strategic-merge-patch+json: built-in kinds only, with the list merge keys of the common core/apps
  fields (containers by name, ports by containerPort/port, env by name, volumes by name...), `$patch`, `$retainKeys`,
  `$setElementOrder/`, `$deleteFromPrimitiveList/` directives.
- application/apply-patch+yaml: server-side apply SIMPLIFIED to a field-owner-less merge: maps merge, lists with a
  merge key (built-ins) or x-kubernetes-list-type=map keys (CRDs) merge by key, other lists are replaced; fields
  left out of a later apply are NOT removed (the real server removes fields only that manager owned); no conflicts.
"""
import copy
import json

import jsonpatch
import jsonpointer

from . import errors

MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name", "env": "name", "volumes": "name",
    "volumeMounts": "mountPath", "volumeDevices": "devicePath", "imagePullSecrets": "name", "ownerReferences": "uid",
    "conditions": "type", "hostAliases": "ip", "topologySpreadConstraints": "topologyKey", "resourceClaims": "name",
}
PRIMITIVE_MERGE_LISTS = {"finalizers"}
_DELETE = object()


def merge_key(field, parent):
    if field == "ports":
        return "containerPort" if parent in ("containers", "initContainers", "ephemeralContainers") else "port"
    return MERGE_KEYS.get(field)


def json_patch(doc, body):
    try:
        ops = json.loads(body)
    except ValueError as exc:
        raise errors.bad_request(f"error decoding patch: {exc}") from exc
    if not isinstance(ops, list):
        kind = "object" if isinstance(ops, dict) else type(ops).__name__
        raise errors.bad_request(f"json: cannot unmarshal {kind} into Go value of type jsonpatch.Patch")
    try:
        return jsonpatch.JsonPatch(ops).apply(doc, in_place=False)
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, TypeError, KeyError, IndexError) as exc:
        raise errors.generic_invalid() from exc


def merge_patch(doc, body):
    patch = _decode_object(body)
    return _merge(copy.deepcopy(doc), patch)


def _decode_object(body):
    try:
        patch = json.loads(body)
    except ValueError as exc:
        raise errors.bad_request(f"error decoding patch: {exc}") from exc
    if not isinstance(patch, dict):
        raise errors.bad_request("Invalid JSON Patch")
    return patch


def _merge(target, patch):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = _merge(target.get(key), value)
    return target


def strategic_merge_patch(doc, body):
    patch = _decode_object(body)
    result = _smp_map(copy.deepcopy(doc), patch, "")
    return {} if result is _DELETE else result


def _smp_map(orig, patch, parent):  # pylint: disable=too-many-branches
    if not isinstance(orig, dict):
        orig = {}
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: v for k, v in patch.items() if k != "$patch"}
    if directive == "delete":
        return _DELETE
    retain = patch.get("$retainKeys")
    orders = {}
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys"):
            continue
        if key.startswith("$setElementOrder/"):
            orders[key.split("/", 1)[1]] = value
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            if isinstance(orig.get(field), list):
                orig[field] = [v for v in orig[field] if v not in value]
            continue
        if value is None:
            orig.pop(key, None)
        elif isinstance(value, dict):
            merged = _smp_map(orig.get(key), value, key)
            if merged is _DELETE:
                orig.pop(key, None)
            else:
                orig[key] = merged
        elif isinstance(value, list):
            orig[key] = _smp_list(orig.get(key), value, key, parent)
        else:
            orig[key] = copy.deepcopy(value)
    for field, order in orders.items():
        mkey = merge_key(field, parent)
        if isinstance(orig.get(field), list):
            orig[field] = _reorder(orig[field], order, mkey)
    if isinstance(retain, list):
        orig = {k: v for k, v in orig.items() if k in retain}
    return orig


def _reorder(items, order, mkey):
    def ident(item):
        return item.get(mkey) if mkey and isinstance(item, dict) else item
    wanted = [ident(o) for o in order]
    ranked = sorted(items, key=lambda i: wanted.index(ident(i)) if ident(i) in wanted else len(wanted))
    return ranked


def _smp_list(orig, patch, field, parent):
    if not isinstance(orig, list):
        orig = []
    if any(isinstance(i, dict) and i.get("$patch") == "replace" for i in patch):
        return [copy.deepcopy(i) for i in patch if not (isinstance(i, dict) and "$patch" in i)]
    mkey = merge_key(field, parent)
    if field in PRIMITIVE_MERGE_LISTS:
        result = list(orig)
        for item in patch:
            if item not in result:
                result.append(copy.deepcopy(item))
        return result
    if not mkey:
        return [copy.deepcopy(i) for i in patch]
    result = [copy.deepcopy(i) for i in orig]
    for item in patch:
        if not isinstance(item, dict):
            continue
        key = item.get(mkey)
        index = next((n for n, o in enumerate(result) if isinstance(o, dict) and o.get(mkey) == key), None)
        if item.get("$patch") == "delete":
            if index is not None:
                result.pop(index)
            continue
        if index is None:
            result.append({k: v for k, v in item.items() if not k.startswith("$")})
        else:
            merged = _smp_map(result[index], item, field)
            result[index] = merged
    return result


def apply_merge(current, applied, list_keys=None, builtin=False):
    """Simplified server-side apply: see the module docstring."""
    return _apply(copy.deepcopy(current) if current else {}, applied, "", "", list_keys or {}, builtin)


# pylint: disable-next=too-many-arguments,too-many-positional-arguments
def _apply(orig, patch, path, parent, list_keys, builtin):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(orig, dict):
        orig = {}
    for key, value in patch.items():
        sub = f"{path}.{key}" if path else key
        if value is None:
            orig.pop(key, None)
        elif isinstance(value, dict):
            orig[key] = _apply(orig.get(key), value, sub, key, list_keys, builtin)
        elif isinstance(value, list):
            keys = list_keys.get(sub) or ([merge_key(key, parent)] if builtin and merge_key(key, parent) else None)
            orig[key] = _apply_list(orig.get(key), value, keys, sub, key, list_keys, builtin)
        else:
            orig[key] = copy.deepcopy(value)
    return orig


def _apply_list(orig, patch, keys, path, field, list_keys, builtin):  # pylint: disable=too-many-arguments,too-many-positional-arguments
    if not keys or not isinstance(orig, list):
        return copy.deepcopy(patch)
    result = [copy.deepcopy(i) for i in orig]
    for item in patch:
        if not isinstance(item, dict):
            result.append(copy.deepcopy(item))
            continue
        ident = tuple(item.get(k) for k in keys)
        index = next((n for n, o in enumerate(result) if isinstance(o, dict) and tuple(o.get(k) for k in keys) == ident), None)
        if index is None:
            result.append(copy.deepcopy(item))
        else:
            result[index] = _apply(result[index], item, path + "[]", field, list_keys, builtin)
    return result


def list_map_keys(schema, path=""):
    """Paths (`spec.ports`) of x-kubernetes-list-type=map lists in a CRD schema, with their keys."""
    found = {}
    if not isinstance(schema, dict):
        return found
    if schema.get("x-kubernetes-list-type") == "map" and schema.get("x-kubernetes-list-map-keys"):
        found[path] = list(schema["x-kubernetes-list-map-keys"])
    for key, sub in (schema.get("properties") or {}).items():
        found.update(list_map_keys(sub, f"{path}.{key}" if path else key))
    if isinstance(schema.get("items"), dict):
        found.update(list_map_keys(schema["items"], path + "[]"))
    return found
