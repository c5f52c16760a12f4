"""TEST DOUBLE (onprem.mesh k8s_double): label and field selectors (the parts clients use)."""
import re

from . import errors

_SET_RE = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split(selector):
    """Split on commas outside parentheses."""
    parts, depth, cur = [], 0, ""
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += char
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(selector):
    """Requirements [(key, op, values)] of `a=b,c!=d,e in (x,y),f notin (z),g,!h`; 400 when malformed."""
    reqs = []
    for part in _split(selector or ""):
        match = _SET_RE.match(part)
        if match:
            values = {v.strip() for v in match.group(3).split(",") if v.strip()}
            reqs.append((match.group(1), match.group(2), values))
            continue
        for op in ("!=", "==", "="):
            if op in part:
                key, value = part.split(op, 1)
                reqs.append((key.strip(), "!=" if op == "!=" else "=", {value.strip()}))
                break
        else:
            if part.startswith("!"):
                reqs.append((part[1:].strip(), "!", set()))
            elif re.match(r"^[A-Za-z0-9_./-]+$", part):
                reqs.append((part, "exists", set()))
            else:
                raise errors.bad_request(f"unable to parse requirement: {part}")
    return reqs


def match_labels(reqs, labels):  # pylint: disable=too-many-return-statements
    labels = labels or {}
    for key, op, values in reqs:
        present = key in labels
        value = labels.get(key)
        if op == "=" and not (present and value in values):
            return False
        if op == "!=" and present and value in values:
            return False
        if op == "in" and not (present and value in values):
            return False
        if op == "notin" and present and value in values:
            return False
        if op == "exists" and not present:
            return False
        if op == "!" and present:
            return False
    return True


FIELD_LABELS = {"metadata.name", "metadata.namespace"}
EXTRA_FIELD_LABELS = {
    "pods": {"status.phase", "spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName", "status.podIP"},
    "events": {"involvedObject.kind", "involvedObject.name", "involvedObject.namespace", "involvedObject.uid", "reason", "type"},
    "secrets": {"type"},
    "namespaces": {"status.phase"},
}


def parse_field_selector(selector, resource):
    reqs = []
    for part in _split(selector or ""):
        for op in ("!=", "==", "="):
            if op in part:
                key, value = part.split(op, 1)
                key = key.strip()
                if key not in FIELD_LABELS and key not in EXTRA_FIELD_LABELS.get(resource, ()):
                    raise errors.bad_request(f"field label not supported: {key}")
                reqs.append((key, op != "!=", value.strip()))
                break
        else:
            raise errors.bad_request(f"invalid selector: '{selector}'; can't understand '{part}'")
    return reqs


def _lookup(obj, dotted):
    cur = obj
    for key in dotted.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(key)
    return "" if cur is None else str(cur)


def match_fields(reqs, obj):
    for key, equal, value in reqs:
        if (_lookup(obj, key) == value) != equal:
            return False
    return True
