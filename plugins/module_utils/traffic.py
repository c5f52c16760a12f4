# -*- coding: utf-8 -*-
# Copyright (c) onprem.mesh contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Weights of one HTTP route of an Istio VirtualService: choose the route, validate, build the patch.

Plain Python on plain dicts (the objects as the API server returns them), no Ansible and no
cluster, so every rule here is unit-tested directly. The patch this module builds touches only
the ``weight`` fields of the chosen route (and appends a destination for a subset the route does
not list yet); every other route, match, mirror, retry, timeout, header and destination is left
exactly as it was. It starts with ``test`` operations on the route as it was read, so a
concurrent change makes the server refuse the whole patch instead of mixing two writers; the
change is then read again and the patch rebuilt (``WeightChange.apply``).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import copy
import json
import re

from ansible_collections.onprem.mesh.plugins.module_utils.k8s_client import json_pointer


# Which VirtualService and route a module changes (documented by the onprem.mesh.vs_route doc fragment).
VS_ROUTE_ARGSPEC = dict(
    name=dict(type="str", required=True),
    namespace=dict(type="str", default="default"),
    service_host=dict(type="str"),
    route_name=dict(type="str"),
    route_index=dict(type="int"),
    conflict_retries=dict(type="int", default=5),
)


class TrafficError(ValueError):
    """Bad input or an object that cannot be changed as asked; the message names the field and the fix."""


def short_host(host, namespace):
    """``reviews``, ``reviews.default``, ``reviews.default.svc`` and ``reviews.default.svc.cluster.local``
    all name the same service seen from ``namespace``."""
    host = (host or "").rstrip(".")
    for suffix in (".%s.svc.cluster.local" % namespace, ".%s.svc" % namespace, ".%s" % namespace):
        if host.endswith(suffix):
            return host[: -len(suffix)]
    return host


def same_host(a, b, namespace):
    return short_host(a, namespace) == short_host(b, namespace)


def route_label(route, index):
    return "http[%d]%s" % (index, " (name: %s)" % route["name"] if route.get("name") else "")


def _is_subset_route(route, host, namespace):
    dests = route.get("route") or []
    return bool(dests) and all(
        same_host((d.get("destination") or {}).get("host"), host, namespace) and (d.get("destination") or {}).get("subset")
        for d in dests
    )


def select_route(vs, host, namespace, route_name=None, route_index=None, hide_own=False):
    """Return ``(index, route)`` of the HTTP route to change.

    By ``route_name``, by ``route_index``, or else the one route whose destinations are all
    subsets of ``host``; none or several such routes is an error that lists them.
    With ``hide_own``, the match routes a canary rollout adds (``is_own_route``) are not there for the choice:
    ``route_index`` counts the other routes only, and the index returned is the route's real place in ``spec.http``.
    """
    http = (vs.get("spec") or {}).get("http") or []
    vs_name = (vs.get("metadata") or {}).get("name")
    if not http:
        raise TrafficError("VirtualService %s has no spec.http routes; traffic splitting needs an HTTP route with subset destinations" % vs_name)
    if route_name is not None and route_index is not None:
        raise TrafficError("route_name and route_index are mutually exclusive; set only one")
    places = [i for i, r in enumerate(http) if not (hide_own and is_own_route(r))]
    if route_name is not None:
        matches = [i for i in places if http[i].get("name") == route_name]
        if not matches:
            names = [http[i].get("name") for i in places if http[i].get("name")]
            raise TrafficError("route_name: VirtualService %s has no HTTP route named %r (named routes: %s)"
                               % (vs_name, route_name, ", ".join(names) or "none; set route_index instead"))
        if len(matches) > 1:
            raise TrafficError("route_name: VirtualService %s has %d HTTP routes named %r; set route_index instead" % (vs_name, len(matches), route_name))
        index = matches[0]
    elif route_index is not None:
        if not 0 <= route_index < len(places):
            raise TrafficError("route_index: %d is out of range; VirtualService %s has %d HTTP routes (0..%d)"
                               % (route_index, vs_name, len(places), len(places) - 1))
        index = places[route_index]
    else:
        candidates = [i for i in places if _is_subset_route(http[i], host, namespace)]
        if not candidates:
            raise TrafficError("VirtualService %s has no HTTP route whose destinations are all subsets of host %s;"
                               " check service_host, or set route_name or route_index" % (vs_name, host))
        if len(candidates) > 1:
            raise TrafficError("the route to change is ambiguous: VirtualService %s has %d HTTP routes to subsets of %s: %s; set route_name or route_index"
                               % (vs_name, len(candidates), host, ", ".join(route_label(http[i], i) for i in candidates)))
        index = candidates[0]
    route = http[index]
    if not _is_subset_route(route, host, namespace):
        raise TrafficError("%s of VirtualService %s does not send only to subsets of host %s; choose a route whose destinations all name a subset of %s"
                           % (route_label(route, index), vs_name, host, host))
    return index, route


def current_weights(route):
    """Subset -> weight as Istio reads it: a lone destination without weight carries all traffic."""
    dests = route.get("route") or []
    weights = {}
    for d in dests:
        subset = d["destination"]["subset"]
        weight = d.get("weight")
        if weight is None:
            weight = 100 if len(dests) == 1 else 0
        weights[subset] = weights.get(subset, 0) + int(weight)
    return weights


def validate_weights(weights, field="weights"):
    """Integer weights 0..100 that sum to 100; returns them as a dict of ints."""
    if not isinstance(weights, dict) or not weights:
        raise TrafficError("%s: give a mapping of subset name to weight, e.g. {v1: 90, v2: 10}" % field)
    clean = {}
    for subset, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float, str)):
            raise TrafficError("%s.%s: weight must be a whole number from 0 to 100, got %r" % (field, subset, weight))
        try:
            number = float(weight)
        except ValueError:
            raise TrafficError("%s.%s: weight must be a whole number from 0 to 100, got %r" % (field, subset, weight))
        if number != int(number):
            raise TrafficError("%s.%s: weight must be a whole number, got %r; Istio weights are integers" % (field, subset, weight))
        if not 0 <= number <= 100:
            raise TrafficError("%s.%s: weight must be between 0 and 100, got %r" % (field, subset, weight))
        clean[str(subset)] = int(number)
    total = sum(clean.values())
    if total != 100:
        raise TrafficError("%s: weights must sum to 100, they sum to %d (%s)" % (field, total, ", ".join("%s=%d" % kv for kv in sorted(clean.items()))))
    return clean


def destination_rule_subsets(destination_rules, host, namespace):
    """Subset names that DestinationRules in ``namespace`` define for ``host``."""
    subsets = set()
    found = False
    for dr in destination_rules:
        spec = dr.get("spec") or {}
        if same_host(spec.get("host"), host, namespace):
            found = True
            subsets.update(s.get("name") for s in spec.get("subsets") or [] if s.get("name"))
    return found, subsets


def check_subsets(weights, destination_rules, host, namespace, fields=None):
    """Every subset of ``weights`` is defined for ``host``. ``fields`` maps a subset to the option that named it
    (``{"v9": "canary"}``), so the message points at that option; others are reported under ``weights``."""
    found, subsets = destination_rule_subsets(destination_rules, host, namespace)
    if not found:
        raise TrafficError("no DestinationRule in namespace %s has host %s; create one that defines the subsets %s"
                           % (namespace, host, ", ".join(sorted(weights))))
    unknown = sorted(set(weights) - subsets)
    if unknown:
        fields = fields or {}
        by_field = {}
        for subset in unknown:
            by_field.setdefault(fields.get(subset, "weights"), []).append(subset)
        order = [f for f in list(fields.values()) + ["weights"] if f in by_field]
        raise TrafficError("; ".join(
            "%s: subset %s is not defined in the DestinationRule for host %s (defined: %s); add it to the DestinationRule or fix the name"
            % (field, ", ".join(by_field[field]), host, ", ".join(sorted(subsets)) or "none") for field in sorted(set(order), key=order.index)))


def apply_weights(route, weights):
    """A copy of ``route`` with the new weights; subsets not in ``weights`` get weight 0."""
    new = copy.deepcopy(route)
    dests = new.get("route") or []
    listed = [d["destination"]["subset"] for d in dests]
    missing = [s for s in weights if s not in listed]
    for subset in sorted(missing):
        template = copy.deepcopy(dests[0])
        template["destination"]["subset"] = subset
        dests.append(template)
    for d in dests:
        d["weight"] = weights.get(d["destination"]["subset"], 0)
    return new


def weight_patch(route_index, old_route, weights):
    """JSON patch operations that change only the weights of ``spec.http[route_index]``.

    Begins with a ``test`` of the whole route as it was read (RFC 6902), so the server refuses the
    patch if anyone changed that route since; then replaces or adds each destination's weight and
    appends destinations for subsets the route did not list.
    """
    base = json_pointer("spec", "http", route_index)
    ops = [{"op": "test", "path": base + "/route", "value": old_route.get("route")}]
    new_route = apply_weights(old_route, weights)
    old_dests = old_route.get("route") or []
    for j, dest in enumerate(new_route["route"]):
        if j < len(old_dests):
            if old_dests[j].get("weight") != dest["weight"]:
                ops.append({"op": "replace" if "weight" in old_dests[j] else "add", "path": "%s/route/%d/weight" % (base, j), "value": dest["weight"]})
        else:
            ops.append({"op": "add", "path": base + "/route/-", "value": dest})
    return ops, new_route


def weights_changed(route, weights):
    current = current_weights(route)
    return any(current.get(s, 0) != w for s, w in weights.items()) or any(w and s not in weights for s, w in current.items())


# -- steps beyond weights: a match route in front of the target route, a mirror on it ----------------------------

OWN_ROUTE_PREFIX = "onprem-mesh-canary-match"
MIRROR_FIELDS = ("mirror", "mirrorPercentage", "mirrorPercent", "mirror_percent", "mirrors")
STRING_MATCH_KINDS = ("exact", "prefix", "regex")
_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
_COOKIE_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_COOKIE_VALUE = re.compile(r"^[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*$")  # RFC 6265 cookie-octets


def is_own_route(route):
    """A match route that a canary rollout put in front of its target route (its name begins with OWN_ROUTE_PREFIX)."""
    return str(route.get("name") or "").startswith(OWN_ROUTE_PREFIX)


def own_route_name(route):
    """The name of the match route a canary rollout puts in front of ``route``."""
    return "%s-%s" % (OWN_ROUTE_PREFIX, route["name"]) if route.get("name") else OWN_ROUTE_PREFIX


def cookie_regex(name, value):
    """Istio's way to match a cookie: a regex on the ``cookie`` header (RE2, matched against the whole header)."""
    return r"^(.*?;\s*)?(%s=%s)(;.*)?$" % (re.escape(name), re.escape(value))


def validate_match(match, field):
    """A match step's ``match`` as an Istio HTTPMatchRequest: ``{headers: {name: {exact|prefix|regex: text}}}``, where
    ``cookie: NAME=VALUE`` stands for a regex on the ``cookie`` header. The message names the field and the fix."""
    example = 'e.g. {headers: {x-canary: {exact: "true"}}} or {cookie: canary=always}'
    if not isinstance(match, dict) or not match:
        raise TrafficError("%s: give the requests that go to the canary as headers or a cookie, %s; got %r" % (field, example, match))
    unknown = sorted(str(k) for k in set(match) - set(("headers", "cookie")))
    if unknown:
        raise TrafficError("%s: unknown key %s; a match step takes headers and cookie, %s" % (field, ", ".join(unknown), example))
    headers = {}
    if "headers" in match:
        given = match["headers"]
        if not isinstance(given, dict) or not given:
            raise TrafficError('%s.headers: a mapping of header name to one of exact, prefix or regex, e.g. {x-canary: {exact: "true"}}; got %r'
                               % (field, given))
        for name in sorted(given, key=str):
            where = "%s.headers.%s" % (field, name)
            if not isinstance(name, str) or not _HEADER_NAME.match(name):
                raise TrafficError("%s: a header name in lower case, letters, digits and -, e.g. x-canary (Istio matches header names"
                                   " in lower case)" % where)
            condition = given[name]
            if not isinstance(condition, dict) or len(condition) != 1 or set(condition) - set(STRING_MATCH_KINDS):
                raise TrafficError('%s: exactly one of exact, prefix or regex, e.g. {exact: "true"}; got %r' % (where, condition))
            [(kind, text)] = condition.items()
            if isinstance(text, bool):
                raise TrafficError('%s.%s: %r is a YAML boolean; quote it, e.g. %s: "%s"' % (where, kind, text, kind, str(text).lower()))
            if not isinstance(text, (str, int)):
                raise TrafficError("%s.%s: a text, got %r" % (where, kind, text))
            text = str(text)
            if kind != "exact" and not text:
                raise TrafficError("%s.%s: must not be empty (Istio refuses an empty %s)" % (where, kind, kind))
            if kind == "regex":
                try:
                    re.compile(text)
                except re.error as exc:
                    raise TrafficError("%s.regex: %r is not a regular expression (%s); Istio takes RE2 syntax" % (where, text, exc))
            headers[name] = {kind: text}
    if "cookie" in match:
        cookie = match["cookie"]
        if not isinstance(cookie, str) or "=" not in cookie:
            raise TrafficError("%s.cookie: NAME=VALUE, e.g. canary=always; got %r" % (field, cookie))
        name, value = cookie.split("=", 1)
        if not _COOKIE_NAME.match(name) or not _COOKIE_VALUE.match(value):
            raise TrafficError("%s.cookie: %r is no cookie NAME=VALUE (a name of letters, digits and !#$%%&'*+.^_`|~-, a value without"
                               " spaces, quotes, commas, semicolons or backslashes)" % (field, cookie))
        if "cookie" in headers:
            raise TrafficError("%s: give the cookie once, as cookie or as headers.cookie, not both" % field)
        headers["cookie"] = {"regex": cookie_regex(name, value)}
    return {"headers": headers}


def validate_mirror(value, field):
    """A mirror step's percentage: a number 0 < x <= 100 (Istio's mirrorPercentage), as an int when whole."""
    if isinstance(value, str):
        try:
            value = float(value.strip().rstrip("%"))
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 100:
        raise TrafficError("%s: a percentage 0 < x <= 100 of the target route's requests to copy to the canary, e.g. mirror: 10; got %r"
                           % (field, value))
    return int(value) if value == int(value) else float(value)


def and_match(route_matches, step_match, field="match"):
    """The target route's own match conditions (any of them, as Istio reads a list) each ANDed with the step's headers; the
    step's headers alone when the route matches everything. A header both name with different conditions cannot be met."""
    if not route_matches:
        return [copy.deepcopy(step_match)]
    combined = []
    for condition in route_matches:
        merged = copy.deepcopy(condition)
        headers = merged.get("headers") or {}
        for name, wanted in sorted(step_match["headers"].items()):
            if name in headers and headers[name] != wanted:
                raise TrafficError("%s.headers.%s: the target route already matches header %s with %s, the step with %s; no request"
                                   " meets both: match another header" % (field, name, name, json.dumps(headers[name]), json.dumps(wanted)))
            headers[name] = copy.deepcopy(wanted)
        merged["headers"] = headers
        combined.append(merged)
    return combined


def canary_destination(route, canary):
    """The canary's ``destination`` as the target route names it, or its first destination's with the canary's subset."""
    for dest in route.get("route") or []:
        if dest["destination"].get("subset") == canary:
            return copy.deepcopy(dest["destination"])
    destination = copy.deepcopy(route["route"][0]["destination"])
    destination["subset"] = canary
    return destination


def mirror_fields(route):
    """The route's mirror fields (``MIRROR_FIELDS``) that are set, as a dict."""
    return dict((f, copy.deepcopy(route[f])) for f in MIRROR_FIELDS if f in route)


def has_canary_mirror(route, canary):
    """The route mirrors to the canary's subset (a mirror step's work, or a leftover of one)."""
    if (route.get("mirror") or {}).get("subset") == canary:
        return True
    return any(((m or {}).get("destination") or {}).get("subset") == canary for m in route.get("mirrors") or [])


def canary_mirror(original, destination, percentage):
    """The mirror fields of the target route during a mirror step: ``mirror`` and ``mirrorPercentage`` to the canary; when
    the route mirrors somewhere of its own (``original``), ``mirrors`` with that mirror first and the canary's after it, as
    Istio allows no ``mirror`` next to ``mirrors``."""
    ours = {"destination": copy.deepcopy(destination), "percentage": {"value": percentage}}
    if "mirrors" in original:
        return {"mirrors": copy.deepcopy(original["mirrors"]) + [ours]}
    if "mirror" in original:
        theirs = {"destination": copy.deepcopy(original["mirror"])}
        if "mirrorPercentage" in original:
            theirs["percentage"] = copy.deepcopy(original["mirrorPercentage"])
        else:
            for legacy in ("mirrorPercent", "mirror_percent"):
                if legacy in original:
                    theirs["percentage"] = {"value": original[legacy]}
        return {"mirrors": [theirs, ours]}
    return {"mirror": copy.deepcopy(destination), "mirrorPercentage": {"value": percentage}}


class StepRoutes:
    """What a canary step sets around the target route besides its weights, as JSON patch operations.

    ``match`` (an HTTPMatchRequest from ``validate_match``, or None): a match route in front of the target route - a copy of
    it (timeouts, retries, headers ... and its own mirror) named ``own_route_name``, whose match is the target's ANDed with
    ``match`` and which sends 100 % to the canary. None: no such route (one there is removed).
    ``mirror`` (a percentage, or None): the target route copies that share of its requests to the canary (``canary_mirror``).
    None: the route's mirror fields are ``original``, the user's own (``mirror_fields`` of the route before the rollout).
    Every change is guarded by ``test`` operations on what it changes as read, so another writer's change in between makes
    the whole patch fail (and ``WeightChange.apply`` read again and rebuild it)."""

    def __init__(self, canary, match=None, mirror=None, original=None, field="match"):
        self.canary = canary
        self.match = match
        self.mirror = mirror
        self.original = original or {}
        self.field = field

    def match_route(self, route):
        """The match route for the target ``route`` as it is (or None without a match)."""
        if self.match is None:
            return None
        own = {"name": own_route_name(route), "match": and_match(route.get("match"), self.match, self.field)}
        for key in route:
            if key not in ("name", "match", "route") and key not in MIRROR_FIELDS:
                own[key] = copy.deepcopy(route[key])
        own["route"] = [{"destination": canary_destination(route, self.canary)}]
        own.update(copy.deepcopy(self.original))
        return own

    def ops(self, vs, index, route):
        """Operations that make the routes around ``spec.http[index]`` (the target ``route``) what this step wants. To follow
        the target route's weight operations: mirror fields at ``index`` first, then the match route at ``index - 1``
        (removed or replaced) or inserted at ``index`` (the target moves one down)."""
        http = vs["spec"]["http"]
        base = json_pointer("spec", "http", index)
        ops = []
        wanted = self.original if self.mirror is None else canary_mirror(self.original, canary_destination(route, self.canary), self.mirror)
        for field in MIRROR_FIELDS:
            path = "%s/%s" % (base, field)
            if field in route and field not in wanted:
                ops += [{"op": "test", "path": path, "value": route[field]}, {"op": "remove", "path": path}]
            elif field in wanted and route.get(field) != wanted[field]:
                ops += [{"op": "test", "path": path, "value": route.get(field)},
                        {"op": "replace" if field in route else "add", "path": path, "value": copy.deepcopy(wanted[field])}]
        found = http[index - 1] if index > 0 and http[index - 1].get("name") == own_route_name(route) else None
        desired = self.match_route(route)
        if found is None and desired is not None:
            ops += [{"op": "test", "path": base + "/name", "value": route.get("name")}, {"op": "add", "path": base, "value": desired}]
        elif found is not None and found != desired:
            previous = json_pointer("spec", "http", index - 1)
            ops.append({"op": "test", "path": previous, "value": found})
            ops.append({"op": "remove", "path": previous} if desired is None else {"op": "replace", "path": previous, "value": desired})
        return ops


def annotation_ops(obj, changes):
    """JSON patch operations that set (value is a str) or remove (value is None) annotations."""
    annotations = (obj.get("metadata") or {}).get("annotations")
    if annotations is None:
        wanted = dict((k, v) for k, v in changes.items() if v is not None)
        return [{"op": "add", "path": "/metadata/annotations", "value": wanted}] if wanted else []
    ops = []
    for key, value in sorted(changes.items()):
        path = json_pointer("metadata", "annotations", key)
        if value is None:
            if key in annotations:
                ops.append({"op": "remove", "path": path})
        elif annotations.get(key) != value:
            ops.append({"op": "replace" if key in annotations else "add", "path": path, "value": value})
    return ops


def annotation_tests(obj, keys):
    """JSON patch ``test`` operations that hold ``keys`` to their values in ``obj`` as read: a present annotation to its
    value, an absent one to its absence (a ``test`` against null passes only for a missing key); without any
    annotations, the absence of the whole map. Other annotations are not tested, so their writers never conflict."""
    annotations = (obj.get("metadata") or {}).get("annotations")
    if annotations is None:
        return [{"op": "test", "path": "/metadata/annotations", "value": None}]
    return [{"op": "test", "path": json_pointer("metadata", "annotations", key), "value": annotations.get(key)} for key in sorted(keys)]


def default_host(vs, host=None):
    if host:
        return host
    hosts = (vs.get("spec") or {}).get("hosts") or []
    if len(hosts) == 1:
        return hosts[0]
    raise TrafficError("service_host: VirtualService %s lists %d hosts (%s); set service_host to the service whose subsets get the weights"
                       % ((vs.get("metadata") or {}).get("name"), len(hosts), ", ".join(hosts) or "none"))


class WeightChange:
    """One change of the weights of one route, read-validate-patch, retried on conflicts.

    ``store`` is an ``IstioObjects`` (or a fake with ``get``, ``list`` and ``json_patch``).
    ``extra_ops(vs)`` may add operations (annotations) to the same patch, so that the weights
    and the rollout's record of them land in one write.

    A conflict (``K8sError.is_conflict``: the patch's ``test`` failed, or 409) means the object changed
    between the read and the patch: the object is read again, ``guard(vs)`` (when given) checks that what the
    caller relies on is still so and raises if not, and the patch is rebuilt from the fresh read - so another
    client's change to other fields is kept, never overwritten - and sent again, at most ``retries`` times more.
    """

    def __init__(self, store, namespace, name, host=None, route_name=None, route_index=None, retries=5, sleep=None, hide_own_routes=True):
        self.store = store
        self.namespace = namespace
        self.name = name
        self.host = host
        self.route_name = route_name
        self.route_index = route_index
        self.retries = retries
        self.sleep = sleep
        self.destination_rules = None
        self.hide_own_routes = hide_own_routes  # the match routes of canary_rollout's match steps are never the target

    def read(self):
        try:
            return self.store.get("virtualservices", self.namespace, self.name)
        except Exception as exc:  # K8sError: a 404 may mean the namespace, not the VirtualService, is missing
            if getattr(exc, "status", None) != 404 or not hasattr(self.store, "namespace_exists"):
                raise
            exists = self.store.namespace_exists(self.namespace)
            if exists is False:
                raise TrafficError("namespace: namespace %s does not exist (reading VirtualService %s/%s answered HTTP 404); check namespace"
                                   % (self.namespace, self.namespace, self.name))
            if exists is None:
                exc.args = ("%s (These credentials may not read namespaces, so it is not known whether namespace %s exists.)"
                            % (exc, self.namespace),)
            raise

    def locate(self, vs):
        host = default_host(vs, self.host)
        index, route = select_route(vs, host, self.namespace, self.route_name, self.route_index, hide_own=self.hide_own_routes)
        return host, index, route

    def validate(self, weights, vs=None, fields=None):
        """Check the weights and their subsets against the DestinationRules (read once, then kept).
        ``fields`` names the option behind a subset, for the message (see ``check_subsets``)."""
        weights = validate_weights(weights)
        vs = vs or self.read()
        host, index, route = self.locate(vs)
        if self.destination_rules is None:
            self.destination_rules = self.store.list("destinationrules", self.namespace)
        check_subsets(weights, self.destination_rules, host, self.namespace, fields)
        return weights, vs, index, route

    def apply(self, weights, check_mode=False, vs=None, extra_ops=None, validate=True, guard=None, routes=None):
        """Set ``weights`` (None: keep the route's weights as they are at each attempt, for ``extra_ops`` alone).

        ``guard(vs)`` is called with every object read for a write (the first and each one after a conflict)
        before the patch is built; it raises to stop. ``routes(vs, index, route)`` (a ``StepRoutes.ops``) may add
        operations on the target route's mirror fields and the match route in front of it; they follow the weights'
        operations and come before ``extra_ops``. Returns a dict: changed, before, after, route_index, route_name,
        object, attempts, patch.
        """
        from time import sleep as default_sleep  # pylint: disable=import-outside-toplevel
        sleep = self.sleep or default_sleep
        attempts = 0
        refused = None  # (error, resourceVersion the refused patch was built on)
        while True:
            attempts += 1
            if validate and weights is not None:
                weights, vs, index, route = self.validate(weights, vs)
            else:
                vs = vs or self.read()
                _host, index, route = self.locate(vs)
            if refused is not None and _resource_version(vs) is not None and _resource_version(vs) == refused[1]:
                raise refused[0]  # refused although nothing changed since: no conflict, the patch itself was refused
            if guard is not None:
                guard(vs)
            target = current_weights(route) if weights is None else weights
            before = current_weights(route)
            ops = []
            after = before
            if weights_changed(route, target):
                ops, new_route = weight_patch(index, route, target)
                after = current_weights(new_route)
            more = (routes(vs, index, route) if routes else []) + (extra_ops(vs) if extra_ops else [])
            if more:
                ops = (ops or [{"op": "test", "path": json_pointer("spec", "http", index, "route"), "value": route.get("route")}]) + more
            changed = any(op["op"] != "test" for op in ops)
            result = dict(changed=changed, before=before, after=after, route_index=index, route_name=route.get("name"),
                          object=vs, attempts=attempts, patch=ops if changed else [])
            if not changed or check_mode:
                return result
            try:
                result["object"] = self.store.json_patch("virtualservices", self.namespace, self.name, ops)
                return result
            except Exception as exc:  # K8sError; a conflict is retried with a fresh read
                if not getattr(exc, "is_conflict", False):
                    raise
                if attempts > self.retries:
                    raise TrafficError("VirtualService %s/%s kept changing under us: %d attempts met a conflict (%s); another writer is"
                                       " changing this route; stop it, or raise conflict_retries" % (self.namespace, self.name, attempts, exc))
                refused = (exc, _resource_version(vs))
                vs = None
                sleep(min(0.1 * attempts, 1.0))


def _resource_version(obj):
    return ((obj or {}).get("metadata") or {}).get("resourceVersion")


def subset_labels(destination_rules, host, namespace, subset):
    """The labels a DestinationRule gives ``subset`` of ``host`` (empty when not found)."""
    for dr in destination_rules or []:
        spec = dr.get("spec") or {}
        if same_host(spec.get("host"), host, namespace):
            for item in spec.get("subsets") or []:
                if item.get("name") == subset:
                    return dict(item.get("labels") or {})
    return {}
