# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Steps beyond weights (issue 11), the VirtualService side in traffic.py: a match step's route in front of the target
route, a mirror step's mirror on it, their validation and their guarded JSON patch operations. The rollout's use of
them is in test_canary_steps.py."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import copy
import json
import re

import pytest

from ansible_collections.onprem.mesh.plugins.module_utils import traffic
from ansible_collections.onprem.mesh.plugins.module_utils.k8s_client import K8sError
from ansible_collections.onprem.mesh.plugins.module_utils.traffic import StepRoutes, TrafficError, WeightChange, current_weights
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.fake_istio import FakeIstio, server_answer

V1 = {"host": "payment", "subset": "v1"}
V2 = {"host": "payment", "subset": "v2"}
TARGET = {"name": "primary", "timeout": "2s", "retries": {"attempts": 2},
          "route": [{"destination": dict(V1), "weight": 100}, {"destination": dict(V2), "weight": 0}]}
HEADER_ROUTE = {"name": "jason", "match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [{"destination": dict(V2)}]}
X_CANARY = {"headers": {"x-canary": {"exact": "true"}}}
OWN = {"name": "onprem-mesh-canary-match-primary", "match": [X_CANARY], "timeout": "2s", "retries": {"attempts": 2},
       "route": [{"destination": dict(V2)}]}


def vs(*routes):
    return {"kind": "VirtualService", "metadata": {"name": "payment", "namespace": "shop"},
            "spec": {"hosts": ["payment"], "http": [copy.deepcopy(r) for r in routes]}}


DR = {"kind": "DestinationRule", "metadata": {"name": "payment", "namespace": "shop"},
      "spec": {"host": "payment", "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}}


# -- a match step's match ----------------------------------------------------------------------------------------------

def test_a_header_match_is_kept_as_istio_reads_it():
    assert traffic.validate_match({"headers": {"x-canary": {"exact": "true"}}}, "steps[0].match") == X_CANARY
    assert traffic.validate_match({"headers": {"x-user": {"prefix": "qa-"}, "x-b": {"regex": "^a+$"}, "x-n": {"exact": 7}}}, "m") == {
        "headers": {"x-user": {"prefix": "qa-"}, "x-b": {"regex": "^a+$"}, "x-n": {"exact": "7"}}}
    assert traffic.validate_match({"headers": {"x-empty": {"exact": ""}}}, "m") == {"headers": {"x-empty": {"exact": ""}}}


def test_a_cookie_becomes_istios_regex_on_the_cookie_header():
    match = traffic.validate_match({"cookie": "canary=always"}, "steps[0].match")
    assert match == {"headers": {"cookie": {"regex": r"^(.*?;\s*)?(canary=always)(;.*)?$"}}}
    regex = re.compile(match["headers"]["cookie"]["regex"])
    for header in ("canary=always", "a=1; canary=always", "a=1;canary=always; b=2", "canary=always;b"):
        assert regex.match(header), header
    for header in ("canary=always2", "xcanary=always", "a=1; canary=never", "canary=alwaysx; b=2", ""):
        assert not regex.match(header), header
    # names and values with regex metacharacters are matched literally
    assert traffic.cookie_regex("a.b", "1+2") == r"^(.*?;\s*)?(a\.b=1\+2)(;.*)?$"
    both = traffic.validate_match({"cookie": "c=1", "headers": {"x-a": {"exact": "b"}}}, "m")
    assert both == {"headers": {"x-a": {"exact": "b"}, "cookie": {"regex": r"^(.*?;\s*)?(c=1)(;.*)?$"}}}
    assert traffic.validate_match({"cookie": "c="}, "m") == {"headers": {"cookie": {"regex": r"^(.*?;\s*)?(c=)(;.*)?$"}}}
    # a value may hold "=" (base64): the name ends at the first one
    assert traffic.validate_match({"cookie": "t=YQ=="}, "m") == {"headers": {"cookie": {"regex": r"^(.*?;\s*)?(t=YQ==)(;.*)?$"}}}


@pytest.mark.parametrize("match, message", [
    (None, r'^steps\[1\]\.match: give the requests that go to the canary as headers or a cookie, e\.g\. \{headers: \{x-canary: '
           r'\{exact: "true"\}\}\} or \{cookie: canary=always\}; got None$'),
    ({}, r"^steps\[1\]\.match: give the requests .*; got \{\}$"),
    ("x-canary", r"^steps\[1\]\.match: give the requests .*; got 'x-canary'$"),
    ({"uri": {"prefix": "/"}}, r"^steps\[1\]\.match: unknown key uri; a match step takes headers and cookie, e\.g\. "),
    ({"headers": {}}, r"^steps\[1\]\.match\.headers: a mapping of header name to one of exact, prefix or regex, "
                      r'e\.g\. \{x-canary: \{exact: "true"\}\}; got \{\}$'),
    ({"headers": ["x-canary"]}, r"^steps\[1\]\.match\.headers: a mapping .*; got \['x-canary'\]$"),
    ({"headers": {"X-Canary": {"exact": "1"}}}, r"^steps\[1\]\.match\.headers\.X-Canary: a header name in lower case, letters, digits and -,"
                                                r" e\.g\. x-canary \(Istio matches header names in lower case\)$"),
    ({"headers": {"x canary": {"exact": "1"}}}, r"^steps\[1\]\.match\.headers\.x canary: a header name in lower case"),
    ({"headers": {"": {"exact": "1"}}}, r"^steps\[1\]\.match\.headers\.: a header name in lower case"),
    ({"headers": {"x-canary": "true"}}, r'^steps\[1\]\.match\.headers\.x-canary: exactly one of exact, prefix or regex, e\.g\. '
                                        r"\{exact: \"true\"\}; got 'true'$"),
    ({"headers": {"x-canary": {}}}, r"^steps\[1\]\.match\.headers\.x-canary: exactly one of exact, prefix or regex"),
    ({"headers": {"x-canary": {"exact": "a", "prefix": "b"}}}, r"^steps\[1\]\.match\.headers\.x-canary: exactly one of"),
    ({"headers": {"x-canary": {"suffix": "a"}}}, r"^steps\[1\]\.match\.headers\.x-canary: exactly one of"),
    ({"headers": {"x-canary": {"exact": True}}}, r'^steps\[1\]\.match\.headers\.x-canary\.exact: True is a YAML boolean; quote it, '
                                                 r'e\.g\. exact: "true"$'),
    ({"headers": {"x-canary": {"prefix": False}}}, r'^steps\[1\]\.match\.headers\.x-canary\.prefix: False is a YAML boolean; quote it, '
                                                   r'e\.g\. prefix: "false"$'),
    ({"headers": {"x-canary": {"exact": 1.5}}}, r"^steps\[1\]\.match\.headers\.x-canary\.exact: a text, got 1\.5$"),
    ({"headers": {"x-canary": {"exact": None}}}, r"^steps\[1\]\.match\.headers\.x-canary\.exact: a text, got None$"),
    ({"headers": {"x-canary": {"prefix": ""}}}, r"^steps\[1\]\.match\.headers\.x-canary\.prefix: must not be empty \(Istio refuses an empty prefix\)$"),
    ({"headers": {"x-canary": {"regex": ""}}}, r"^steps\[1\]\.match\.headers\.x-canary\.regex: must not be empty"),
    ({"headers": {"x-canary": {"regex": "(a"}}}, r"^steps\[1\]\.match\.headers\.x-canary\.regex: '\(a' is not a regular expression \("
                                                 r".*\); Istio takes RE2 syntax$"),
    ({"cookie": "canary"}, r"^steps\[1\]\.match\.cookie: NAME=VALUE, e\.g\. canary=always; got 'canary'$"),
    ({"cookie": 5}, r"^steps\[1\]\.match\.cookie: NAME=VALUE, e\.g\. canary=always; got 5$"),
    ({"cookie": "=x"}, r"^steps\[1\]\.match\.cookie: '=x' is no cookie NAME=VALUE \(a name of letters, digits"),
    ({"cookie": "a b=x"}, r"^steps\[1\]\.match\.cookie: 'a b=x' is no cookie"),
    ({"cookie": "a=x y"}, r"^steps\[1\]\.match\.cookie: 'a=x y' is no cookie"),
    ({"cookie": "a=x;y"}, r"^steps\[1\]\.match\.cookie: 'a=x;y' is no cookie"),
    ({"cookie": "a=x", "headers": {"cookie": {"exact": "a=x"}}}, r"^steps\[1\]\.match: give the cookie once, as cookie or as headers\.cookie, not both$"),
])
def test_bad_matches_name_the_field_and_the_fix(match, message):
    with pytest.raises(TrafficError, match=message):
        traffic.validate_match(match, "steps[1].match")


@pytest.mark.parametrize("value, clean", [(10, 10), (100, 100), (0.5, 0.5), (12.5, 12.5), (20.0, 20), ("25", 25), ("2.5%", 2.5), (" 50 ", 50)])
def test_a_mirror_percentage(value, clean):
    got = traffic.validate_mirror(value, "steps[0].mirror")
    assert got == clean and type(got) is type(clean)


@pytest.mark.parametrize("value", [0, -1, 100.5, 101, True, False, None, "ten", "", [10], {"value": 10}])
def test_a_mirror_outside_0_to_100_is_refused(value):
    with pytest.raises(TrafficError, match=r"^steps\[0\]\.mirror: a percentage 0 < x <= 100 of the target route's requests to copy to the canary,"
                                           r" e\.g\. mirror: 10; got %s$" % re.escape(repr(value))):
        traffic.validate_mirror(value, "steps[0].mirror")


def test_the_step_match_is_anded_with_each_of_the_routes_own():
    assert traffic.and_match(None, X_CANARY) == [X_CANARY]
    assert traffic.and_match([], X_CANARY) == [X_CANARY]
    own = [{"uri": {"prefix": "/api"}}, {"headers": {"x-tenant": {"exact": "a"}}, "name": "tenant-a"}]
    assert traffic.and_match(own, X_CANARY) == [{"uri": {"prefix": "/api"}, "headers": {"x-canary": {"exact": "true"}}},
                                                {"headers": {"x-tenant": {"exact": "a"}, "x-canary": {"exact": "true"}}, "name": "tenant-a"}]
    assert own == [{"uri": {"prefix": "/api"}}, {"headers": {"x-tenant": {"exact": "a"}}, "name": "tenant-a"}]  # not changed
    # the same condition twice is one
    assert traffic.and_match([X_CANARY], X_CANARY) == [X_CANARY]
    result = traffic.and_match(None, X_CANARY)
    result[0]["headers"]["x-canary"]["exact"] = "no"
    assert X_CANARY == {"headers": {"x-canary": {"exact": "true"}}}


def test_a_header_the_route_matches_otherwise_cannot_be_anded():
    with pytest.raises(TrafficError, match=r'^steps\[0\]\.match\.headers\.x-canary: the target route already matches header x-canary with '
                                           r'\{"prefix": "t"\}, the step with \{"exact": "true"\}; no request meets both: match another header$'):
        traffic.and_match([{"uri": {"prefix": "/"}}, {"headers": {"x-canary": {"prefix": "t"}}}], X_CANARY, "steps[0].match")


# -- mirrors ------------------------------------------------------------------------------------------------------------

def test_the_canary_mirror_without_a_mirror_of_the_users():
    assert traffic.canary_mirror({}, V2, 10) == {"mirror": V2, "mirrorPercentage": {"value": 10}}


@pytest.mark.parametrize("original, theirs", [
    ({"mirror": {"host": "audit"}}, {"destination": {"host": "audit"}}),
    ({"mirror": {"host": "audit"}, "mirrorPercentage": {"value": 5.5}}, {"destination": {"host": "audit"}, "percentage": {"value": 5.5}}),
    ({"mirror": {"host": "audit"}, "mirrorPercent": 7}, {"destination": {"host": "audit"}, "percentage": {"value": 7}}),
    ({"mirror": {"host": "audit"}, "mirror_percent": 8}, {"destination": {"host": "audit"}, "percentage": {"value": 8}}),
])
def test_next_to_the_users_mirror_both_become_mirrors(original, theirs):
    # Istio refuses mirror next to mirrors: the user's mirror goes on, as the first of two
    kept = copy.deepcopy(original)
    assert traffic.canary_mirror(original, V2, 10) == {"mirrors": [theirs, {"destination": V2, "percentage": {"value": 10}}]}
    assert original == kept


def test_the_canary_is_appended_to_the_users_mirrors():
    original = {"mirrors": [{"destination": {"host": "audit"}, "percentage": {"value": 1}}]}
    assert traffic.canary_mirror(original, V2, 50) == {"mirrors": [{"destination": {"host": "audit"}, "percentage": {"value": 1}},
                                                                   {"destination": V2, "percentage": {"value": 50}}]}
    assert len(original["mirrors"]) == 1


def test_which_routes_mirror_to_the_canary():
    assert traffic.has_canary_mirror({"mirror": V2}, "v2")
    assert not traffic.has_canary_mirror({"mirror": V1}, "v2")
    assert traffic.has_canary_mirror({"mirrors": [{"destination": {"host": "audit"}}, {"destination": V2}]}, "v2")
    assert not traffic.has_canary_mirror({"mirrors": [{"destination": {"host": "audit"}}]}, "v2")
    assert not traffic.has_canary_mirror(TARGET, "v2")
    assert traffic.mirror_fields(dict(TARGET, mirror=V1, mirrorPercent=3, mirrors=[])) == {"mirror": V1, "mirrorPercent": 3, "mirrors": []}
    assert traffic.mirror_fields(TARGET) == {}


def test_the_canary_destination_is_the_routes_own_or_a_copy_of_its_first():
    route = {"route": [{"destination": {"host": "payment", "subset": "v1", "port": {"number": 9080}}, "weight": 100}]}
    assert traffic.canary_destination(route, "v2") == {"host": "payment", "subset": "v2", "port": {"number": 9080}}
    assert route["route"][0]["destination"]["subset"] == "v1"
    two = {"route": [{"destination": {"host": "payment", "subset": "v1", "port": {"number": 1}}, "weight": 90},
                     {"destination": {"host": "payment", "subset": "v3", "port": {"number": 2}}, "weight": 10}]}
    assert traffic.canary_destination(two, "v2") == {"host": "payment", "subset": "v2", "port": {"number": 1}}
    listed = {"route": [{"destination": {"host": "payment", "subset": "v1"}}, {"destination": {"host": "payment.shop", "subset": "v2"}}]}
    assert traffic.canary_destination(listed, "v2") == {"host": "payment.shop", "subset": "v2"}


# -- the operations of a step ---------------------------------------------------------------------------------------------

def step_ops(obj, index, **kwargs):
    return StepRoutes("v2", **kwargs).ops(obj, index, obj["spec"]["http"][index])


def test_a_match_route_is_inserted_in_front_of_the_target_and_guarded():
    obj = vs(HEADER_ROUTE, TARGET)
    assert step_ops(obj, 1, match=X_CANARY) == [{"op": "test", "path": "/spec/http/1/name", "value": "primary"},
                                                {"op": "add", "path": "/spec/http/1", "value": OWN}]
    # an unnamed target: its name tested absent, the route named without a suffix
    unnamed = dict((k, v) for k, v in TARGET.items() if k != "name")
    obj = vs(unnamed)
    assert step_ops(obj, 0, match=X_CANARY) == [{"op": "test", "path": "/spec/http/0/name", "value": None},
                                                {"op": "add", "path": "/spec/http/0", "value": dict(OWN, name="onprem-mesh-canary-match")}]


def test_the_match_route_copies_the_target_but_its_weights_and_the_canarys_mirror():
    target = dict(TARGET, match=[{"uri": {"prefix": "/pay"}}], headers={"request": {"set": {"x-a": "1"}}}, mirror=V2, mirrorPercentage={"value": 10})
    route = StepRoutes("v2", match=X_CANARY, mirror=10, original={"mirror": {"host": "audit"}}).match_route(target)
    assert route == {"name": "onprem-mesh-canary-match-primary", "match": [{"uri": {"prefix": "/pay"}, "headers": X_CANARY["headers"]}],
                     "timeout": "2s", "retries": {"attempts": 2}, "headers": {"request": {"set": {"x-a": "1"}}},
                     "route": [{"destination": V2}], "mirror": {"host": "audit"}}
    assert list(route)[:2] == ["name", "match"]
    assert StepRoutes("v2").match_route(target) is None


def test_the_match_route_is_replaced_when_it_differs_and_left_when_it_does_not():
    obj = vs(HEADER_ROUTE, OWN, TARGET)
    assert step_ops(obj, 2, match=X_CANARY) == []
    other = {"headers": {"x-qa": {"exact": "1"}}}
    assert step_ops(obj, 2, match=other) == [{"op": "test", "path": "/spec/http/1", "value": OWN},
                                             {"op": "replace", "path": "/spec/http/1", "value": dict(OWN, match=[other])}]


def test_the_match_route_is_removed_guarded_by_its_whole_value():
    obj = vs(HEADER_ROUTE, OWN, TARGET)
    assert step_ops(obj, 2) == [{"op": "test", "path": "/spec/http/1", "value": OWN}, {"op": "remove", "path": "/spec/http/1"}]
    # only the route right in front of the target, named for it, is the step's
    assert step_ops(vs(OWN, HEADER_ROUTE, TARGET), 2) == []
    assert step_ops(vs(dict(OWN, name="onprem-mesh-canary-match-other"), TARGET), 1) == []
    assert step_ops(vs(TARGET), 0) == []
    assert step_ops(vs(TARGET, OWN), 0) == []  # a target in front has nothing in front of it (not the list's last route)
    assert step_ops(vs(OWN, TARGET), 1) == [{"op": "test", "path": "/spec/http/0", "value": OWN}, {"op": "remove", "path": "/spec/http/0"}]


def test_a_mirror_is_added_replaced_and_removed_field_by_field_with_tests():
    obj = vs(HEADER_ROUTE, TARGET)
    assert step_ops(obj, 1, mirror=20) == [
        {"op": "test", "path": "/spec/http/1/mirror", "value": None}, {"op": "add", "path": "/spec/http/1/mirror", "value": V2},
        {"op": "test", "path": "/spec/http/1/mirrorPercentage", "value": None},
        {"op": "add", "path": "/spec/http/1/mirrorPercentage", "value": {"value": 20}}]
    mirrored = vs(HEADER_ROUTE, dict(TARGET, mirror=V2, mirrorPercentage={"value": 20}))
    assert step_ops(mirrored, 1, mirror=20) == []
    assert step_ops(mirrored, 1, mirror=50) == [
        {"op": "test", "path": "/spec/http/1/mirrorPercentage", "value": {"value": 20}},
        {"op": "replace", "path": "/spec/http/1/mirrorPercentage", "value": {"value": 50}}]
    assert step_ops(mirrored, 1) == [
        {"op": "test", "path": "/spec/http/1/mirror", "value": V2}, {"op": "remove", "path": "/spec/http/1/mirror"},
        {"op": "test", "path": "/spec/http/1/mirrorPercentage", "value": {"value": 20}}, {"op": "remove", "path": "/spec/http/1/mirrorPercentage"}]


def test_the_users_own_mirror_is_put_back_as_it_was():
    theirs = {"mirror": {"host": "audit"}, "mirrorPercent": 5}
    during = vs(dict(TARGET, mirrors=[{"destination": {"host": "audit"}, "percentage": {"value": 5}},
                                      {"destination": V2, "percentage": {"value": 30}}]))
    assert step_ops(during, 0, original=theirs) == [
        {"op": "test", "path": "/spec/http/0/mirror", "value": None}, {"op": "add", "path": "/spec/http/0/mirror", "value": {"host": "audit"}},
        {"op": "test", "path": "/spec/http/0/mirrorPercent", "value": None}, {"op": "add", "path": "/spec/http/0/mirrorPercent", "value": 5},
        {"op": "test", "path": "/spec/http/0/mirrors", "value": during["spec"]["http"][0]["mirrors"]},
        {"op": "remove", "path": "/spec/http/0/mirrors"}]
    before = vs(dict(TARGET, **theirs))
    assert step_ops(before, 0, original=theirs, mirror=30) == [
        {"op": "test", "path": "/spec/http/0/mirror", "value": {"host": "audit"}}, {"op": "remove", "path": "/spec/http/0/mirror"},
        {"op": "test", "path": "/spec/http/0/mirrorPercent", "value": 5}, {"op": "remove", "path": "/spec/http/0/mirrorPercent"},
        {"op": "test", "path": "/spec/http/0/mirrors", "value": None},
        {"op": "add", "path": "/spec/http/0/mirrors", "value": during["spec"]["http"][0]["mirrors"]}]


def test_mirror_operations_come_before_the_match_route_moves_the_target():
    obj = vs(HEADER_ROUTE, dict(TARGET, mirror=V2, mirrorPercentage={"value": 20}))
    ops = step_ops(obj, 1, match=X_CANARY)
    assert [(op["op"], op["path"]) for op in ops] == [("test", "/spec/http/1/mirror"), ("remove", "/spec/http/1/mirror"),
                                                      ("test", "/spec/http/1/mirrorPercentage"), ("remove", "/spec/http/1/mirrorPercentage"),
                                                      ("test", "/spec/http/1/name"), ("add", "/spec/http/1")]
    store = FakeIstio([obj])
    store.json_patch("virtualservices", "shop", "payment", ops)
    assert store.objects[("virtualservices", "shop", "payment")]["spec"]["http"] == [HEADER_ROUTE, OWN, TARGET]


# -- the match route is never the target -------------------------------------------------------------------------------------

def test_own_routes_are_no_choice_for_the_target():
    obj = vs(HEADER_ROUTE, OWN, TARGET)
    assert traffic.is_own_route(OWN) and traffic.is_own_route({"name": "onprem-mesh-canary-match"}) and not traffic.is_own_route(TARGET)
    assert not traffic.is_own_route({"route": []})
    # the one route to subsets of the host, the own one left out
    assert traffic.select_route(vs(OWN, TARGET), "payment", "shop", hide_own=True) == (1, TARGET)
    # route_index counts the user's routes only; the real index comes back
    assert traffic.select_route(obj, "payment", "shop", route_index=1, hide_own=True) == (2, TARGET)
    assert traffic.select_route(obj, "payment", "shop", route_name="primary", hide_own=True) == (2, TARGET)
    with pytest.raises(TrafficError, match=r"route_index: 2 is out of range; VirtualService payment has 2 HTTP routes \(0\.\.1\)"):
        traffic.select_route(obj, "payment", "shop", route_index=2, hide_own=True)
    with pytest.raises(TrafficError, match=r"has no HTTP route named 'onprem-mesh-canary-match-primary' \(named routes: jason, primary\)"):
        traffic.select_route(obj, "payment", "shop", route_name="onprem-mesh-canary-match-primary", hide_own=True)
    # without hide_own they are routes like any other
    assert traffic.select_route(obj, "payment", "shop", route_index=1) == (1, OWN)
    with pytest.raises(TrafficError, match="ambiguous"):
        traffic.select_route(vs(OWN, TARGET), "payment", "shop")
    assert WeightChange(None, "shop", "payment").hide_own_routes is True
    assert WeightChange(FakeIstio([vs(OWN, TARGET)]), "shop", "payment").locate(vs(OWN, TARGET)) == ("payment", 1, TARGET)


def test_traffic_split_changes_the_users_route_next_to_a_held_match_route():
    store = FakeIstio([vs(HEADER_ROUTE, OWN, TARGET), DR])
    result = WeightChange(store, "shop", "payment", route_index=1).apply({"v1": 50, "v2": 50})
    assert result["route_index"] == 2
    http = store.objects[("virtualservices", "shop", "payment")]["spec"]["http"]
    assert http[:2] == [HEADER_ROUTE, OWN] and current_weights(http[2]) == {"v1": 50, "v2": 50}


# -- guarded, retried --------------------------------------------------------------------------------------------------------

def routes_hook(step):
    return step.ops


def test_a_route_inserted_in_front_by_another_client_makes_the_insert_retry_at_the_new_place():
    store = FakeIstio([vs(HEADER_ROUTE, TARGET), DR])
    other = {"name": "ops", "match": [{"uri": {"prefix": "/ops"}}], "route": [{"destination": dict(V1)}]}
    store.interfere.append(lambda obj: obj["spec"]["http"].insert(0, copy.deepcopy(other)))
    change = WeightChange(store, "shop", "payment", route_name="primary", sleep=lambda s: None)
    result = change.apply(None, routes=routes_hook(StepRoutes("v2", match=X_CANARY)))
    assert result["attempts"] == 2 and result["changed"]
    assert store.objects[("virtualservices", "shop", "payment")]["spec"]["http"] == [other, HEADER_ROUTE, OWN, TARGET]
    # the refused patch tested the target's name where it inserted; the retry where the target had moved
    assert [op for op in store.patches[0] if op["op"] != "test" or op["path"].endswith("/name")] == [
        {"op": "test", "path": "/spec/http/1/name", "value": "primary"}, {"op": "add", "path": "/spec/http/1", "value": OWN}]
    assert store.patches[1][1:] == [{"op": "test", "path": "/spec/http/2/name", "value": "primary"}, {"op": "add", "path": "/spec/http/2", "value": OWN}]


def test_a_changed_match_route_is_read_again_before_it_is_removed():
    store = FakeIstio([vs(HEADER_ROUTE, OWN, TARGET), DR])
    store.interfere.append(lambda obj: obj["spec"]["http"][1].update(timeout="9s"))
    change = WeightChange(store, "shop", "payment", route_name="primary", sleep=lambda s: None)
    result = change.apply({"v1": 0, "v2": 100}, routes=routes_hook(StepRoutes("v2")))
    assert result["attempts"] == 2
    http = store.objects[("virtualservices", "shop", "payment")]["spec"]["http"]
    assert http[0] == HEADER_ROUTE and len(http) == 2 and current_weights(http[1]) == {"v1": 0, "v2": 100}
    assert store.patches[1][-2:] == [{"op": "test", "path": "/spec/http/1", "value": dict(OWN, timeout="9s")}, {"op": "remove", "path": "/spec/http/1"}]


def test_another_clients_change_to_another_route_survives_a_mirror_write():
    store = FakeIstio([vs(HEADER_ROUTE, TARGET), DR])
    store.interfere.append(lambda obj: obj["spec"]["http"][0].update(timeout="3s"))
    change = WeightChange(store, "shop", "payment", route_name="primary", sleep=lambda s: None)
    result = change.apply(None, routes=routes_hook(StepRoutes("v2", mirror=25)),
                          extra_ops=lambda obj: [{"op": "test", "path": "/spec/http/0", "value": obj["spec"]["http"][0]}])
    assert result["attempts"] == 2
    http = store.objects[("virtualservices", "shop", "payment")]["spec"]["http"]
    assert http == [dict(HEADER_ROUTE, timeout="3s"), dict(TARGET, mirror=V2, mirrorPercentage={"value": 25})]


def test_a_step_that_changes_nothing_writes_nothing_and_the_routes_ops_follow_the_weights():
    store = FakeIstio([vs(HEADER_ROUTE, OWN, TARGET), DR])
    change = WeightChange(store, "shop", "payment", route_name="primary")
    assert change.apply(None, routes=routes_hook(StepRoutes("v2", match=X_CANARY)))["changed"] is False
    # operations that only test change nothing either
    tests_only = change.apply(None, routes=routes_hook(StepRoutes("v2", match=X_CANARY)),
                              extra_ops=lambda obj: [{"op": "test", "path": "/metadata/name", "value": "payment"}])
    assert tests_only["changed"] is False and tests_only["patch"] == []
    assert store.calls["write"] == 0
    result = change.apply({"v1": 90, "v2": 10}, routes=routes_hook(StepRoutes("v2")), check_mode=True)
    assert [(op["op"], op["path"]) for op in result["patch"]] == [
        ("test", "/spec/http/2/route"), ("replace", "/spec/http/2/route/0/weight"), ("replace", "/spec/http/2/route/1/weight"),
        ("test", "/spec/http/1"), ("remove", "/spec/http/1")]
    assert json.dumps(store.objects[("virtualservices", "shop", "payment")]["spec"]) == json.dumps(vs(HEADER_ROUTE, OWN, TARGET)["spec"])


def test_a_refused_read_is_not_taken_for_a_missing_namespace():
    # only a 404 makes WeightChange ask whether the namespace exists; a 403 is the answer as it is, whatever the namespace
    store = FakeIstio([vs(TARGET), DR])

    def forbidden(plural, namespace, name):
        raise server_answer(403, "Forbidden", {"message": "virtualservices is forbidden", "reason": "Forbidden"},
                            "reading VirtualService %s/%s" % (namespace, name), verb="get")

    store.get = forbidden
    with pytest.raises(K8sError, match="HTTP 403 virtualservices is forbidden") as err:
        WeightChange(store, "nope", "payment").read()
    assert err.value.status == 403 and store.calls["read"] == 0
