"""TEST DOUBLE (onprem.mesh k8s_double): structural-schema pruning and validation of custom resources.

Follows kube-apiserver's apiextensions handling of a CRD's openAPIV3Schema: unknown fields are pruned (unless
x-kubernetes-preserve-unknown-fields), then the object is validated (OpenAPI -> JSON Schema via jsonschema), and the
errors are rendered as k8s field errors (`spec.x: Invalid value: "string": spec.x in body must be of type integer:
"string"`). x-kubernetes-validations (CEL) rules: a fixed table of the rule texts used by Istio's CRDs is evaluated in
Python; any other rule is skipped and listed in SKIPPED_CEL_RULES.
"""
import base64
import copy
import json
import re
import threading
import urllib.parse

import jsonschema

from .errors import FieldError, Raw, go_quote

OBJECT_META_FIELDS = {
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation", "creationTimestamp",
    "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations", "ownerReferences", "finalizers", "managedFields",
}

SKIPPED_CEL_RULES = set()
_LOCK = threading.Lock()


def child(path, key):
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


# ---------------------------------------------------------------------------------------------------- pruning
def prune(obj, schema):
    """Drop fields the structural schema does not declare; returns their paths (`spec.foo`) in order found."""
    removed = []
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        for key in list(meta):
            if key not in OBJECT_META_FIELDS:
                removed.append(f"metadata.{key}")
                del meta[key]
    props = (schema or {}).get("properties") or {}
    for key in list(obj):
        if key in ("apiVersion", "kind", "metadata"):
            continue
        if key in props:
            _prune(obj[key], props[key], key, removed)
        elif not (schema or {}).get("x-kubernetes-preserve-unknown-fields"):
            removed.append(key)
            del obj[key]
    return removed


def _prune(value, schema, path, removed):
    if not isinstance(schema, dict) or schema.get("x-kubernetes-embedded-resource") or schema.get("x-kubernetes-int-or-string"):
        return
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        addl = schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields")
        for key in list(value):
            if key in props:
                _prune(value[key], props[key], child(path, key), removed)
            elif isinstance(addl, dict):
                _prune(value[key], addl, child(path, key), removed)
            elif not (preserve or addl is True):
                removed.append(child(path, key))
                del value[key]
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            _prune(item, schema["items"], child(path, index), removed)


# ---------------------------------------------------------------------------------------------------- JSON Schema
def to_jsonschema(schema):  # pylint: disable=too-many-branches
    """Translate OpenAPI v3 (Kubernetes dialect) into a JSON Schema draft 7 document."""
    if isinstance(schema, list):
        return [to_jsonschema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {k: to_jsonschema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = to_jsonschema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_jsonschema(v) for v in value]
        elif key == "format":
            if value in CHECKED_FORMATS:
                out[key] = value
        elif key.startswith("x-kubernetes-") or key in ("nullable", "description", "example", "externalDocs", "default"):
            continue
        else:
            out[key] = copy.deepcopy(value)
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if schema.get("x-kubernetes-embedded-resource"):
        out.pop("properties", None)
        out.pop("required", None)
    if schema.get("nullable"):
        if "type" in out:
            types = out["type"] if isinstance(out["type"], list) else [out["type"]]
            out["type"] = types + ["null"]
        if "enum" in out:
            out["enum"] = list(out["enum"]) + [None]
    return out


# String formats kube-openapi checks (strfmt) that Istio's CRDs use; int32/double are not range-checked there either.
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
FORMATS = jsonschema.FormatChecker(formats=())
CHECKED_FORMATS = ("date-time", "byte")


@FORMATS.checks("date-time")
def _is_date_time(value):
    return not isinstance(value, str) or bool(_RFC3339.match(value))


@FORMATS.checks("byte", raises=(ValueError, TypeError))
def _is_byte(value):
    if isinstance(value, str):
        base64.b64decode(value, validate=True)
    return True


def validator_for(schema, cache=None):
    """A jsonschema validator for an openAPIV3Schema, memoized in `cache` (a dict owned by the resource type)."""
    cache = {} if cache is None else cache
    with _LOCK:
        entry = cache.get(id(schema))
        if entry is None or entry[0] is not schema:
            entry = (schema, jsonschema.Draft7Validator(to_jsonschema(schema), format_checker=FORMATS))
            cache[id(schema)] = entry
        return entry[1]


def has_cel(schema, cache=None):
    """Whether any node of the schema carries x-kubernetes-validations (else the real server has no CEL validator)."""
    cache = {} if cache is None else cache
    key = ("cel", id(schema))
    if key not in cache:
        cache[key] = "x-kubernetes-validations" in json.dumps(schema)
    return cache[key]


def type_name(value):  # pylint: disable=too-many-return-statements
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _path_of(error):
    path = ""
    for key in error.absolute_path:
        path = child(path, key)
    return path


def _openapi_error(error):  # pylint: disable=too-many-return-statements,too-many-branches
    path = _path_of(error)
    kind = error.validator
    value = error.instance
    want = error.validator_value
    if kind == "required":
        match = re.match(r"^'(.*)' is a required property$", error.message)
        missing = match.group(1) if match else str(want)
        return FieldError("FieldValueRequired", child(path, missing))
    if kind == "type":
        types = want if isinstance(want, list) else [want]
        shown = [t for t in types if t != "null"] or types
        got = type_name(value)
        return FieldError("FieldValueTypeInvalid", path, got, f'{path} in body must be of type {",".join(shown)}: "{got}"')
    if kind == "enum":
        values = [v if isinstance(v, str) else json.dumps(v) for v in want if v is not None]
        return FieldError("FieldValueNotSupported", path, value, "supported values: " + ", ".join(go_quote(v) for v in values))
    if kind == "maxLength":
        return FieldError("FieldValueTooLong", path, value, f"may not be more than {want} bytes")
    if kind in ("maxItems", "maxProperties"):
        return FieldError("FieldValueTooMany", path, len(value), f"must have at most {want} items")
    detail = {
        "minLength": f"{path} in body should be at least {want} chars long",
        "minimum": f"{path} in body should be greater than or equal to {want}",
        "maximum": f"{path} in body should be less than or equal to {want}",
        "exclusiveMinimum": f"{path} in body should be greater than {want}",
        "exclusiveMaximum": f"{path} in body should be less than {want}",
        "pattern": f"{path} in body should match '{want}'",
        "minItems": f"{path} in body should have at least {want} items",
        "minProperties": f"{path} in body should have at least {want} properties",
        "uniqueItems": f"{path} in body shouldn't contain duplicates",
        "oneOf": f"{path} in body must validate one and only one schema (oneOf)",
        "anyOf": f"{path} in body must validate at least one schema (anyOf)",
        "allOf": f"{path} in body must validate all the schemas (allOf)",
        "not": f"{path} in body must not validate the schema (not)",
        "multipleOf": f"{path} in body should be a multiple of {want}",
    }.get(kind, f"{path} in body: {error.message}")
    if kind in ("oneOf", "anyOf", "allOf", "not"):
        value = type_name(value)
    if kind == "format":
        detail = f"{path} in body must be of type {want}: {go_quote(str(value))}"
    return FieldError("FieldValueInvalid", path, value, detail)


BLOCKING = ("FieldValueNotSupported", "FieldValueRequired", "FieldValueTooLong", "FieldValueTooMany", "FieldValueTypeInvalid")


def validate(obj, schema, cache=None):
    """Field errors of a custom resource against its version's openAPIV3Schema (metadata checked elsewhere)."""
    if not schema:
        return []
    body = {k: v for k, v in obj.items() if k != "metadata"}
    errors = [_openapi_error(e) for e in validator_for(schema, cache).iter_errors(body)]
    errors.sort(key=lambda e: e.field)
    errors.extend(list_type_errors(body, schema, ""))
    if not has_cel(schema, cache):
        return errors
    if any(e.kind in BLOCKING for e in errors):
        # like apiextensions' hasBlockingErr: CEL rules are not run on an object with type or required errors
        errors.append(FieldError("FieldValueInvalid", "", None, "some validation rules were not checked because the object was "
                                 "invalid; correct the existing errors to complete validation"))
    else:
        errors.extend(cel_errors(body, schema, ""))
    return errors


def go_repr(value):  # pylint: disable=too-many-return-statements
    """Go's %#v of a decoded JSON value (for `Duplicate value: map[string]interface {}{"name":"http"}`)."""
    if isinstance(value, dict):
        return "map[string]interface {}{" + ", ".join(f"{go_quote(k)}:{go_repr(value[k])}" for k in sorted(value)) + "}"
    if isinstance(value, list):
        return "[]interface {}{" + ", ".join(go_repr(v) for v in value) + "}"
    if isinstance(value, str):
        return go_quote(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}"
    if value is None:
        return "interface {}(nil)"
    return repr(value)


def list_type_errors(value, schema, path):
    """x-kubernetes-list-type map/set: duplicate keys (or items) answer `Duplicate value`, like ValidateListSetsAndMaps."""
    errors = []
    if not isinstance(schema, dict):
        return errors
    if isinstance(value, list):
        kind = schema.get("x-kubernetes-list-type")
        seen = []
        for index, item in enumerate(value):
            if kind == "map" and isinstance(item, dict):
                ident = tuple(json.dumps(item.get(k), sort_keys=True) for k in schema.get("x-kubernetes-list-map-keys") or ())
                if ident in seen:
                    shown = {k: item[k] for k in schema.get("x-kubernetes-list-map-keys") or () if k in item}
                    errors.append(FieldError("FieldValueDuplicate", child(path, index), Raw(go_repr(shown))))
                seen.append(ident)
            elif kind == "set":
                ident = json.dumps(item, sort_keys=True)
                if ident in seen:
                    errors.append(FieldError("FieldValueDuplicate", child(path, index), item))
                seen.append(ident)
            errors.extend(list_type_errors(item, schema.get("items"), child(path, index)))
    elif isinstance(value, dict):
        props = schema.get("properties") or {}
        addl = schema.get("additionalProperties")
        for key, sub_value in value.items():
            sub_schema = props.get(key) if key in props else (addl if isinstance(addl, dict) else None)
            if sub_schema is not None:
                errors.extend(list_type_errors(sub_value, sub_schema, child(path, key)))
    return errors


# ---------------------------------------------------------------------------------------------------- CEL subset
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def go_duration(text):
    """Seconds of a Go/CEL duration string; ValueError when it is not one."""
    if not isinstance(text, str):
        raise ValueError(text)
    body = text.lstrip("+-")
    if body == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(body):
        match = _DURATION_RE.match(body, pos)
        if not match:
            raise ValueError(text)
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not body:
        raise ValueError(text)
    return -total if text.startswith("-") else total


def _duration_min_1ms(value):
    try:
        return go_duration(value) >= 0.001
    except ValueError:
        return False


_LABEL_KEY_RE = re.compile(r"^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$")


def _exists_one_number(items):
    numbers = [i.get("number") for i in items if isinstance(i, dict)]
    return all(numbers.count(n) == 1 for n in numbers)


def _port_keys(value):
    try:
        return all(0 < int(k) <= 65535 for k in value)
    except (TypeError, ValueError):
        return False


CEL_RULES = {
    "duration(self) >= duration('1ms')": _duration_min_1ms,
    "0 < self && self <= 65535": lambda v: isinstance(v, int) and 0 < v <= 65535,
    '!self.contains("*")': lambda v: "*" not in v,
    'self != "*"': lambda v: v != "*",
    'self.all(key, !key.contains("*"))': lambda v: all("*" not in k for k in v),
    "self.size() == 0": lambda v: len(v) == 0,
    'self in ["", "HTTP", "HTTPS"]': lambda v: v in ("", "HTTP", "HTTPS"),
    'self.all(key, size(key) < 63 && key.matches("^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$"))':
        lambda v: all(len(k) < 63 and _LABEL_KEY_RE.match(k) for k in v),
    "self.all(l1, self.exists_one(l2, l1.number == l2.number))": _exists_one_number,
    "self.all(key, 0 < int(key) && int(key) <= 65535)": _port_keys,
    "has(self.address) || has(self.network)": lambda v: "address" in v or "network" in v,
    "self.all(key, key.size() != 0)": lambda v: all(len(k) != 0 for k in v),
    "has(self.portLevelMtls) ? (((has(self.selector) && has(self.selector.matchLabels)) ? self.selector.matchLabels : {}).size() > 0) : true":
        lambda v: "portLevelMtls" not in v or len((v.get("selector") or {}).get("matchLabels") or {}) > 0,
    "(has(self.serviceAccounts) || has(self.notServiceAccounts)) ? (!has(self.principals) && !has(self.notPrincipals) && "
    "!has(self.namespaces) && !has(self.notNamespaces)) : true":
        lambda v: not ("serviceAccounts" in v or "notServiceAccounts" in v)
        or not any(k in v for k in ("principals", "notPrincipals", "namespaces", "notNamespaces")),
    '((has(self.resolution) ? self.resolution : "NONE") == "NONE") ? !has(self.endpoints) : true':
        lambda v: v.get("resolution", "NONE") != "NONE" or "endpoints" not in v,
    '((has(self.resolution) ? self.resolution : "") == "DNS_ROUND_ROBIN") ? ((has(self.endpoints) ? self.endpoints : []).size() <= 1) : true':
        lambda v: v.get("resolution", "") != "DNS_ROUND_ROBIN" or len(v.get("endpoints") or []) <= 1,
    '!((has(self.addresses) ? self.addresses : []).exists(k, k.contains("/")) && !((has(self.resolution) ? self.resolution : "NONE") '
    'in ["STATIC", "NONE"]))':
        lambda v: not (any("/" in a for a in v.get("addresses") or []) and v.get("resolution", "NONE") not in ("STATIC", "NONE")),
    '(has(self.address) ? self.address : "").startsWith("unix://") ? !has(self.ports) : true':
        lambda v: not v.get("address", "").startswith("unix://") or "ports" not in v,
    'self.startsWith("unix://") ? !self.endsWith("/") : true': lambda v: not v.startswith("unix://") or not v.endswith("/"),
    'self.startsWith("unix://") ? (self.substring(7, 8) == "/" || self.substring(7, 8) == "@") : true':
        lambda v: not v.startswith("unix://") or v[7:8] in ("/", "@"),
    '((has(self.operation) ? self.operation : "") == "REMOVE") ? !has(self.value) : true':
        lambda v: v.get("operation", "") != "REMOVE" or "value" not in v,
    '((has(self.operation) ? self.operation : "") == "UPSERT") ? (self.value != "") : true':
        lambda v: v.get("operation", "") != "UPSERT" or v["value"] != "",
    '(has(self.valueFrom) ? self.valueFrom : "") != "HOST" || !has(self.value)': lambda v: v.get("valueFrom", "") != "HOST" or "value" not in v,
    'has(self.context) ? ((self.context == "WAYPOINT") ? has(self.waypoint) : !has(self.waypoint)) : !has(self.waypoint)':
        lambda v: ("waypoint" in v) == (v.get("context") == "WAYPOINT"),
    "has(self.wasm) != has(self.lua)": lambda v: ("wasm" in v) != ("lua" in v),
    'url(self).getScheme() in ["http", "https"]': lambda v: urllib.parse.urlsplit(v).scheme in ("http", "https"),
    'isURL(self) ? (url(self).getScheme() in ["", "http", "https", "file", "oci"]) : (isURL("http://" + self) && url("http://" + self).getScheme() '
    'in ["", "http", "https", "file", "oci"])': lambda v: "://" not in v or v.split("://", 1)[0] in ("http", "https", "file", "oci"),
    'isURL(self) ? (url(self).getScheme() in ["", "http", "https", "oci", "file"]) : (isURL("http://" + self) && url("http://" + self).getScheme() '
    'in ["", "http", "https", "oci", "file"])': lambda v: "://" not in v or v.split("://", 1)[0] in ("http", "https", "file", "oci"),
}
_AT_MOST_ONE_RE = re.compile(r"^\(has\(self\.(\w+)\) \? 1 : 0\)(?: \+ \(has\(self\.(\w+)\) \? 1 : 0\))+ <= 1$")


def _normalize(rule):
    return " ".join(rule.split())


def _at_most_one(rule):
    if not _AT_MOST_ONE_RE.match(rule):
        return None
    fields = re.findall(r"has\(self\.(\w+)\)", rule)
    return lambda v: sum(1 for f in fields if f in v) <= 1


def evaluate_rule(rule, value):
    """True/False for a known rule; None when the rule is outside the implemented subset (recorded as skipped)."""
    text = _normalize(rule)
    func = CEL_RULES.get(text) or _at_most_one(text)
    if func is None:
        with _LOCK:
            SKIPPED_CEL_RULES.add(text)
        return None
    try:
        return bool(func(value))
    except (TypeError, AttributeError, ValueError):
        return False


def cel_errors(value, schema, path):
    """Evaluate the x-kubernetes-validations rules found along the object."""
    errors = []
    if not isinstance(schema, dict):
        return errors
    for rule in schema.get("x-kubernetes-validations") or ():
        if evaluate_rule(rule["rule"], value) is False:
            field_path = path + rule.get("fieldPath", "") if rule.get("fieldPath") else path
            message = rule.get("message") or f"failed rule: {_normalize(rule['rule'])}"
            errors.append(FieldError("FieldValueInvalid", field_path, type_name(value), message))
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        addl = schema.get("additionalProperties")
        for key, sub in value.items():
            sub_schema = props.get(key) if key in props else (addl if isinstance(addl, dict) else None)
            if sub_schema is not None:
                errors.extend(cel_errors(sub, sub_schema, child(path, key)))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            errors.extend(cel_errors(item, schema["items"], child(path, index)))
    return errors


# ---------------------------------------------------------------------------------------------------- metadata
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")

SUBDOMAIN_MSG = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start "
                 "and end with an alphanumeric character (e.g. 'example.com', regex used for validation is "
                 "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")
LABEL_MSG = ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end "
             "with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is "
             "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')")
LABEL_VALUE_MSG = ("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must "
                   "start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used "
                   "for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')")
QUALIFIED_MSG = ("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
                 "alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is "
                 "'([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1035_MSG = ("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, "
               "and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is "
               "'[a-z]([-a-z0-9]*[a-z0-9])?')")
NAME_RULES = {"subdomain": (DNS1123_SUBDOMAIN, SUBDOMAIN_MSG, 253), "label": (DNS1123_LABEL, LABEL_MSG, 63),
              "dns1035": (DNS1035_LABEL, DNS1035_MSG, 63)}


def metadata_errors(meta, name_rule="subdomain"):  # pylint: disable=too-many-branches
    """ObjectMeta validation: name format (DNS-1123 subdomain; label for namespaces; DNS-1035 label for services), labels."""
    errors = []
    name = meta.get("name")
    if not name and not meta.get("generateName"):
        errors.append(FieldError("FieldValueRequired", "metadata.name", detail="name or generateName is required"))
    elif name:
        regex, message, limit = NAME_RULES[name_rule]
        if not regex.match(name) or len(name) > limit:
            detail = message if len(name) <= limit else f"must be no more than {limit} characters"
            errors.append(FieldError("FieldValueInvalid", "metadata.name", name, detail))
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        errors.append(FieldError("FieldValueTypeInvalid", "metadata.labels", type_name(labels), "must be a map of strings"))
        return errors
    for key, value in labels.items():
        key_name = key.rsplit("/", 1)[-1]
        if not QUALIFIED_NAME.match(key_name) or len(key_name) > 63:
            errors.append(FieldError("FieldValueInvalid", "metadata.labels", key, QUALIFIED_MSG))
        if not isinstance(value, str):
            errors.append(FieldError("FieldValueTypeInvalid", f"metadata.labels.{key}", type_name(value), "must be a string"))
        elif not LABEL_VALUE.match(value) or len(value) > 63:
            detail = LABEL_VALUE_MSG if len(value) <= 63 else "must be no more than 63 characters"
            errors.append(FieldError("FieldValueInvalid", "metadata.labels", value, detail))
    annotations = meta.get("annotations") or {}
    if isinstance(annotations, dict):
        for key, value in annotations.items():
            if not isinstance(value, str):
                errors.append(FieldError("FieldValueTypeInvalid", f"metadata.annotations.{key}", type_name(value), "must be a string"))
    return errors
