"""TEST DOUBLE (onprem.mesh k8s_double): meta.k8s.io/v1 Table answers (what `kubectl get` asks for).

Custom resources get the columns of their CRD's additionalPrinterColumns (simple JSON paths; strings printed like
kubectl's JSONPath printer, `date` columns as ages), like apiextensions' table convertor. Built-in kinds get the
default columns of the common kinds (namespaces, deployments, pods, services, configmaps, secrets), others Name and
Age.
"""
import datetime
import json
import re

NAME_COLUMN = {"name": "Name", "type": "string", "format": "name", "priority": 0,
               "description": "Name must be unique within a namespace. Is required when creating resources, although some resources "
                              "may allow a client to request the generation of an appropriate name automatically. Name is primarily "
                              "intended for creation idempotence and configuration definition. Cannot be updated. More info: "
                              "https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names"}
AGE_COLUMN = {"name": "Age", "type": "date", "format": "", "priority": 0,
              "description": "CreationTimestamp is a timestamp representing the server time when this object was created."}


def _ports(obj):
    ports = (obj.get("spec") or {}).get("ports") or []
    return ",".join(f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in ports) or "<none>"


def _pod_ready(obj):
    statuses = (obj.get("status") or {}).get("containerStatuses") or []
    total = len((obj.get("spec") or {}).get("containers") or [])
    return f"{sum(1 for s in statuses if s.get('ready'))}/{total}"


def _status(obj, key, default=0):
    return (obj.get("status") or {}).get(key, default)


BUILTIN_COLUMNS = {
    "namespaces": [("Status", "string", lambda o: _status(o, "phase", ""))],
    "deployments": [("Ready", "string", lambda o: f"{_status(o, 'readyReplicas')}/{(o.get('spec') or {}).get('replicas', 1)}"),
                    ("Up-to-date", "integer", lambda o: _status(o, "updatedReplicas")),
                    ("Available", "integer", lambda o: _status(o, "availableReplicas"))],
    "pods": [("Ready", "string", _pod_ready), ("Status", "string", lambda o: _status(o, "phase", "Pending")),
             ("Restarts", "string", lambda o: str(sum(s.get("restartCount", 0) for s in _status(o, "containerStatuses", []))))],
    "services": [("Type", "string", lambda o: (o.get("spec") or {}).get("type", "ClusterIP")),
                 ("Cluster-IP", "string", lambda o: (o.get("spec") or {}).get("clusterIP", "<none>")),
                 ("External-IP", "string", lambda o: ",".join((o.get("spec") or {}).get("externalIPs") or []) or "<none>"),
                 ("Port(s)", "string", _ports)],
    "configmaps": [("Data", "integer", lambda o: len(o.get("data") or {}) + len(o.get("binaryData") or {}))],
    "secrets": [("Type", "string", lambda o: o.get("type", "Opaque")), ("Data", "integer", lambda o: len(o.get("data") or {}))],
}


def wants_table(accept):
    """Whether an Accept header asks for a Table (`application/json;as=Table;v=v1;g=meta.k8s.io`)."""
    return bool(accept) and any("as=Table" in part and "g=meta.k8s.io" in part for part in accept.split(","))


def human_duration(seconds):  # pylint: disable=too-many-return-statements
    """k8s.io/apimachinery duration.HumanDuration."""
    seconds = int(max(seconds, 0))
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        rest = seconds % 60
        return f"{minutes}m{rest}s" if rest else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h{rest}m" if rest else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 192:
        rest = hours % 24
        return f"{hours // 24}d{rest}h" if rest else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        rest = (hours // 24) % 365
        return f"{hours // 24 // 365}y{rest}d" if rest else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"


def age(timestamp):
    try:
        then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    except (TypeError, ValueError):
        return "<invalid>"
    return human_duration((datetime.datetime.now(datetime.timezone.utc) - then).total_seconds())


def _lookup(obj, json_path):
    """The value at a simple JSON path (`.spec.hosts`, `.status.conditions[0].type`), or None."""
    cur = obj
    for part in re.findall(r"\.([^.\[]+)|\[(\d+)\]", json_path):
        key, index = part
        if key:
            if not isinstance(cur, dict) or key not in cur:
                return None
            cur = cur[key]
        else:
            if not isinstance(cur, list) or int(index) >= len(cur):
                return None
            cur = cur[int(index)]
    return cur


def _cell(column, value):
    if value is None:
        return None
    kind = column.get("type", "string")
    if kind == "date":
        return age(value) if isinstance(value, str) else "<invalid>"
    if kind == "string":
        return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    if kind in ("integer", "number") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if kind == "boolean" and isinstance(value, bool):
        return value
    return None


def _row_object(obj, include):
    if include == "None":
        return None
    if include == "Object":
        return obj
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata", {})}


# pylint: disable-next=too-many-arguments,too-many-positional-arguments,too-many-locals
def table(rtype, version, objects, resource_version, include="Metadata", headers=True):
    """A Table of rendered objects (one row each)."""
    columns = rtype.printer_columns.get(version) or []
    builtin = BUILTIN_COLUMNS.get(rtype.plural, []) if rtype.builtin else []
    definitions = [NAME_COLUMN] + [
        {"name": c["name"], "type": c.get("type", "string"), "format": c.get("format", ""), "description": c.get("description", ""),
         "priority": c.get("priority", 0)} for c in columns]
    definitions += [{"name": n, "type": t, "format": "", "description": n, "priority": 0} for n, t, _func in builtin]
    if not columns:
        definitions.append(AGE_COLUMN)
    rows = []
    for obj in objects:
        meta = obj.get("metadata", {})
        cells = [meta.get("name", "")]
        if columns:
            cells += [_cell(c, _lookup(obj, c.get("jsonPath", ""))) for c in columns]
        else:
            cells += [func(obj) for _name, _type, func in builtin]
            cells.append(age(meta.get("creationTimestamp")))
        row = {"cells": cells}
        row_object = _row_object(obj, include)
        if row_object is not None:
            row["object"] = row_object
        rows.append(row)
    result = {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": str(resource_version)}}
    if headers:
        result["columnDefinitions"] = definitions
    result["rows"] = rows
    return result
