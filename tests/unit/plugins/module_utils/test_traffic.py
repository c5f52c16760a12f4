# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import copy
import os
import sys
import time

import pytest
import yaml

from ansible_collections.onprem.mesh.plugins.module_utils import traffic
from ansible_collections.onprem.mesh.plugins.module_utils.traffic import TrafficError, WeightChange
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.fake_istio import FakeIstio

HERE = os.path.dirname(os.path.abspath(__file__))
# Istio's Bookinfo samples come with the control plane's build cache (tools/controlplane, `make setup`).
CONTROLPLANE_TOOLS = os.path.join(HERE, "..", "..", "..", "..", "tools", "controlplane")


def samples_dir():
    if CONTROLPLANE_TOOLS not in sys.path:
        sys.path.insert(0, CONTROLPLANE_TOOLS)
    try:
        import components  # pylint: disable=import-error,import-outside-toplevel
        return str(components.data_path("istio", "samples"))
    except (ImportError, FileNotFoundError) as exc:
        pytest.fail("Istio's Bookinfo samples are not available from the control plane's build cache: %s" % exc, pytrace=False)


def sample(name):
    path = os.path.join(samples_dir(), name)
    if not os.path.isfile(path):
        pytest.fail("Istio sample %s is missing from %s: rebuild with `make setup` (tools/controlplane/build.py)"
                    % (name, os.path.dirname(path)), pytrace=False)
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def vs(routes, hosts=("reviews",), name="reviews"):
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": name, "namespace": "default"},
            "spec": {"hosts": list(hosts), "http": routes}}


def dr(subsets=("v1", "v2", "v3"), host="reviews"):
    return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": host, "namespace": "default"},
            "spec": {"host": host, "subsets": [{"name": s, "labels": {"version": s}} for s in subsets]}}


def dest(subset, weight=None, host="reviews"):
    d = {"destination": {"host": host, "subset": subset}}
    if weight is not None:
        d["weight"] = weight
    return d


HEADER_ROUTE = {"name": "jason", "match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [dest("v2")]}
DEFAULT_ROUTE = {"name": "default", "route": [dest("v1", 100), dest("v2", 0)], "timeout": "3s",
                 "retries": {"attempts": 3, "perTryTimeout": "1s"}, "mirror": {"host": "reviews", "subset": "v3"}}


@pytest.mark.parametrize("weights, message", [
    ({"v1": 90, "v2": 20}, "sum to 110"),
    ({"v1": 50, "v2": 51}, "sum to 101"),
    ({"v1": 50, "v2": 49}, "sum to 99"),
    ({"v1": 110, "v2": -10}, "between 0 and 100"),
    ({"v1": -1, "v2": 101}, "weights.v1: weight must be between 0 and 100, got -1"),
    ({"v1": 101, "v2": -1}, "weights.v1: weight must be between 0 and 100, got 101"),
    ({"v1": 89.5, "v2": 10.5}, "whole number"),
    ({"v1": "ninety", "v2": 10}, "whole number from 0 to 100"),
    ({"v1": True}, "whole number"),
    ({}, "mapping of subset name to weight"),
])
def test_bad_weights_name_the_field(weights, message):
    with pytest.raises(TrafficError, match=message):
        traffic.validate_weights(weights)


def test_string_weights_from_surveys_are_accepted():
    assert traffic.validate_weights({"v1": "90", "v2": "10"}) == {"v1": 90, "v2": 10}


def test_short_and_full_host_names_match():
    assert traffic.same_host("reviews", "reviews.default.svc.cluster.local", "default")
    assert not traffic.same_host("reviews", "reviews.other.svc.cluster.local", "default")


def test_default_route_choice_is_ambiguous_with_header_route():
    with pytest.raises(TrafficError, match=r"ambiguous.*http\[0\] \(name: jason\), http\[1\] \(name: default\).*route_name or route_index"):
        traffic.select_route(vs([HEADER_ROUTE, DEFAULT_ROUTE]), "reviews", "default")


def test_route_by_name_index_and_default():
    obj = vs([HEADER_ROUTE, DEFAULT_ROUTE])
    assert traffic.select_route(obj, "reviews", "default", route_name="default")[0] == 1
    assert traffic.select_route(obj, "reviews", "default", route_index=0)[0] == 0
    assert traffic.select_route(vs([DEFAULT_ROUTE]), "reviews", "default")[0] == 0
    with pytest.raises(TrafficError, match="no HTTP route named 'nope'.*jason, default"):
        traffic.select_route(obj, "reviews", "default", route_name="nope")
    with pytest.raises(TrafficError, match="route_index: 5 is out of range"):
        traffic.select_route(obj, "reviews", "default", route_index=5)
    with pytest.raises(TrafficError, match=r"route_index: 2 is out of range; VirtualService reviews has 2 HTTP routes \(0..1\)"):
        traffic.select_route(obj, "reviews", "default", route_index=2)


def test_route_to_other_host_is_refused():
    other = {"route": [dest("v1", host="ratings")]}
    with pytest.raises(TrafficError, match="does not send only to subsets of host reviews"):
        traffic.select_route(vs([other]), "reviews", "default", route_index=0)


def test_lone_destination_without_weight_carries_everything():
    assert traffic.current_weights({"route": [dest("v3")]}) == {"v3": 100}
    assert traffic.current_weights({"route": [dest("v1", 90), dest("v2", 10)]}) == {"v1": 90, "v2": 10}


def test_patch_touches_only_weights_and_starts_with_a_test():
    ops, new_route = traffic.weight_patch(1, DEFAULT_ROUTE, {"v1": 90, "v2": 10})
    assert ops[0] == {"op": "test", "path": "/spec/http/1/route", "value": DEFAULT_ROUTE["route"]}
    assert ops[1:] == [{"op": "replace", "path": "/spec/http/1/route/0/weight", "value": 90},
                       {"op": "replace", "path": "/spec/http/1/route/1/weight", "value": 10}]
    assert new_route["timeout"] == "3s" and new_route["mirror"] == DEFAULT_ROUTE["mirror"]


def test_new_subset_is_appended_as_copy_of_first_destination():
    route = {"route": [{"destination": {"host": "reviews", "subset": "v1", "port": {"number": 9080}}, "headers": {"request": {"set": {"x": "1"}}}}]}
    ops, new_route = traffic.weight_patch(0, route, {"v1": 95, "v2": 5})
    assert ops[1] == {"op": "add", "path": "/spec/http/0/route/0/weight", "value": 95}
    added = ops[2]["value"]
    assert ops[2]["path"] == "/spec/http/0/route/-"
    assert added == {"destination": {"host": "reviews", "subset": "v2", "port": {"number": 9080}}, "headers": {"request": {"set": {"x": "1"}}}, "weight": 5}
    assert traffic.current_weights(new_route) == {"v1": 95, "v2": 5}


def test_apply_changes_weights_and_nothing_else():
    obj = vs([HEADER_ROUTE, DEFAULT_ROUTE])
    store = FakeIstio([obj, dr()])
    change = WeightChange(store, "default", "reviews", route_name="default")
    result = change.apply({"v1": 75, "v2": 25})
    assert result["changed"] and result["before"] == {"v1": 100, "v2": 0} and result["after"] == {"v1": 75, "v2": 25}
    stored = store.objects[("virtualservices", "default", "reviews")]
    expected = copy.deepcopy(obj["spec"])
    expected["http"][1]["route"][0]["weight"] = 75
    expected["http"][1]["route"][1]["weight"] = 25
    assert stored["spec"] == expected
    assert store.calls == {"read": 2, "write": 1}


def test_apply_is_idempotent():
    store = FakeIstio([vs([DEFAULT_ROUTE]), dr()])
    change = WeightChange(store, "default", "reviews")
    assert change.apply({"v1": 100, "v2": 0})["changed"] is False
    assert store.calls["write"] == 0


def test_check_mode_writes_nothing_but_reports_the_patch():
    store = FakeIstio([vs([DEFAULT_ROUTE]), dr()])
    result = WeightChange(store, "default", "reviews").apply({"v1": 50, "v2": 50}, check_mode=True)
    assert result["changed"] and result["after"] == {"v1": 50, "v2": 50} and len(result["patch"]) == 3
    assert store.calls["write"] == 0 and store.route()["route"][0]["weight"] == 100


def test_unknown_subset_is_refused_before_any_write():
    store = FakeIstio([vs([DEFAULT_ROUTE]), dr(subsets=("v1", "v2"))])
    with pytest.raises(TrafficError, match="subset v9 is not defined in the DestinationRule for host reviews.*v1, v2"):
        WeightChange(store, "default", "reviews").apply({"v1": 90, "v9": 10})
    assert store.calls["write"] == 0


def test_missing_destination_rule_is_refused():
    store = FakeIstio([vs([DEFAULT_ROUTE])])
    with pytest.raises(TrafficError, match="no DestinationRule in namespace default has host reviews"):
        WeightChange(store, "default", "reviews").apply({"v1": 90, "v2": 10})


def test_conflict_is_retried_with_a_fresh_read():
    store = FakeIstio([vs([HEADER_ROUTE, DEFAULT_ROUTE]), dr()])

    def other_writer(obj):
        obj["spec"]["http"][1]["route"][0]["weight"] = 60
        obj["spec"]["http"][1]["route"][1]["weight"] = 40

    store.interfere.append(other_writer)
    result = WeightChange(store, "default", "reviews", route_name="default", sleep=lambda s: None).apply({"v1": 90, "v2": 10})
    assert result["attempts"] == 2 and result["before"] == {"v1": 60, "v2": 40}
    assert traffic.current_weights(store.route(index=1)) == {"v1": 90, "v2": 10}


def test_conflict_past_the_retries_leaves_the_object_as_the_other_writer_left_it():
    store = FakeIstio([vs([DEFAULT_ROUTE]), dr()])
    counter = {"n": 0}

    def other_writer(obj):
        counter["n"] += 1
        obj["spec"]["http"][0]["route"][0]["weight"] = 100 - counter["n"]
        obj["spec"]["http"][0]["route"][1]["weight"] = counter["n"]

    store.interfere.extend([other_writer] * 10)
    with pytest.raises(TrafficError, match="kept changing under us: 3 attempts met a conflict.*conflict_retries"):
        WeightChange(store, "default", "reviews", retries=2, sleep=lambda s: None).apply({"v1": 50, "v2": 50})
    assert traffic.current_weights(store.route()) == {"v1": 97, "v2": 3}


def test_bookinfo_header_route_sample_keeps_its_match():
    objects = sample("virtual-service-reviews-jason-v2-v3.yaml") + sample("destination-rule-all.yaml")
    store = FakeIstio(objects)
    before = copy.deepcopy(store.route(index=0))
    result = WeightChange(store, "default", "reviews", route_index=1).apply({"v3": 80, "v1": 20})
    assert result["before"] == {"v3": 100} and result["after"] == {"v3": 80, "v1": 20}
    assert store.route(index=0) == before


def test_bookinfo_90_10_to_80_20():
    store = FakeIstio(sample("virtual-service-reviews-90-10.yaml") + sample("destination-rule-all.yaml"))
    result = WeightChange(store, "default", "reviews").apply({"v1": 80, "v2": 20})
    assert result["before"] == {"v1": 90, "v2": 10}
    assert [d["weight"] for d in store.route()["route"]] == [80, 20]


def test_annotation_ops_escape_slashes_and_create_the_map():
    assert traffic.annotation_ops({"metadata": {}}, {"a/b": "1", "c": None}) == [{"op": "add", "path": "/metadata/annotations", "value": {"a/b": "1"}}]
    ops = traffic.annotation_ops({"metadata": {"annotations": {"a/b": "0", "c": "x"}}}, {"a/b": "1", "c": None})
    assert ops == [{"op": "replace", "path": "/metadata/annotations/a~1b", "value": "1"}, {"op": "remove", "path": "/metadata/annotations/c"}]


def test_route_name_and_route_index_together_are_refused():
    with pytest.raises(TrafficError, match="route_name and route_index are mutually exclusive; set only one"):
        traffic.select_route(vs([HEADER_ROUTE, DEFAULT_ROUTE]), "reviews", "default", route_name="default", route_index=1)


def test_a_negative_route_index_is_out_of_range_not_the_last_route():
    with pytest.raises(TrafficError, match=r"route_index: -1 is out of range; VirtualService reviews has 2 HTTP routes \(0..1\)"):
        traffic.select_route(vs([HEADER_ROUTE, DEFAULT_ROUTE]), "reviews", "default", route_index=-1)


def test_a_route_name_used_twice_is_refused():
    second = dict(DEFAULT_ROUTE, match=[{"uri": {"prefix": "/v2"}}])
    with pytest.raises(TrafficError, match="VirtualService reviews has 2 HTTP routes named 'default'; set route_index instead"):
        traffic.select_route(vs([HEADER_ROUTE, DEFAULT_ROUTE, second]), "reviews", "default", route_name="default")


THREE_WAY = [dest("v1", 70), dest("v2", 10), dest("v3", 20)]


def test_a_destination_not_named_in_the_weights_gets_zero_on_a_three_way_route():
    store = FakeIstio([vs([{"name": "default", "route": THREE_WAY}]), dr()])
    result = WeightChange(store, "default", "reviews").apply({"v1": 80, "v2": 20})
    assert result["after"] == {"v1": 80, "v2": 20, "v3": 0}
    assert result["patch"][1:] == [{"op": "replace", "path": "/spec/http/0/route/0/weight", "value": 80},
                                   {"op": "replace", "path": "/spec/http/0/route/1/weight", "value": 20},
                                   {"op": "replace", "path": "/spec/http/0/route/2/weight", "value": 0}]
    assert [d["weight"] for d in store.route()["route"]] == [80, 20, 0]


def test_a_destination_not_named_that_already_has_zero_needs_no_write():
    store = FakeIstio([vs([{"name": "default", "route": [dest("v1", 90), dest("v2", 10), dest("v3", 0)]}]), dr()])
    result = WeightChange(store, "default", "reviews").apply({"v1": 90, "v2": 10})
    assert result["changed"] is False and result["patch"] == [] and store.calls["write"] == 0


def test_only_the_undeclared_destinations_weight_moving_is_a_change():
    route = {"name": "default", "route": [dest("v1", 90), dest("v2", 0), dest("v3", 10)]}
    assert traffic.weights_changed(route, {"v1": 90, "v3": 10}) is False
    assert traffic.weights_changed(route, {"v1": 90, "v2": 10}) is True


def test_subset_labels_are_those_the_destination_rule_of_that_host_gives_that_subset():
    rules = [dr(subsets=("v1", "v2"), host="ratings"),
             {"kind": "DestinationRule", "metadata": {"name": "reviews", "namespace": "default"},
              "spec": {"host": "reviews.default.svc.cluster.local",
                       "subsets": [{"name": "v1", "labels": {"version": "v1", "track": "stable"}}, {"name": "v2", "labels": {"version": "v2"}},
                                   {"name": "bare"}]}}]
    rules[0]["spec"]["subsets"][1]["labels"] = {"version": "ratings-v2"}
    assert traffic.subset_labels(rules, "reviews", "default", "v2") == {"version": "v2"}
    assert traffic.subset_labels(rules, "reviews", "default", "v1") == {"version": "v1", "track": "stable"}
    assert traffic.subset_labels(rules, "reviews", "default", "bare") == {}
    assert traffic.subset_labels(rules, "reviews", "default", "v9") == {}
    assert traffic.subset_labels(rules, "reviews", "other", "v1") == {}   # reviews of another namespace: no rule
    assert traffic.subset_labels(None, "reviews", "default", "v1") == {}
    labels = traffic.subset_labels(rules, "reviews", "default", "v2")
    labels["version"] = "changed"
    assert rules[1]["spec"]["subsets"][1]["labels"] == {"version": "v2"}   # a copy: the caller cannot change the rule


def moving_writer():
    """Another writer that moves the route's weights before each of our patches lands."""
    counter = {"n": 0}

    def other_writer(obj):
        counter["n"] += 1
        obj["spec"]["http"][0]["route"][0]["weight"] = 100 - counter["n"]
        obj["spec"]["http"][0]["route"][1]["weight"] = counter["n"]

    return other_writer


def test_conflicts_back_off_with_the_real_sleep_a_tenth_more_each_time_up_to_a_second(monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)   # the modules pass no sleep: the retry uses time.sleep
    store = FakeIstio([vs([DEFAULT_ROUTE]), dr()])
    store.interfere.extend([moving_writer()] * 12)
    result = WeightChange(store, "default", "reviews", retries=12).apply({"v1": 50, "v2": 50})
    assert result["attempts"] == 13 and traffic.current_weights(store.route()) == {"v1": 50, "v2": 50}
    assert slept == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.0, 1.0])


def test_an_injected_sleep_replaces_the_real_one(monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda seconds: pytest.fail("time.sleep called although a sleep was given"))
    injected = []
    store = FakeIstio([vs([DEFAULT_ROUTE]), dr()])
    store.interfere.append(moving_writer())
    WeightChange(store, "default", "reviews", sleep=injected.append).apply({"v1": 50, "v2": 50})
    assert injected == [0.1]


@pytest.mark.parametrize("host", ["reviews", "reviews.default", "reviews.default.svc", "reviews.default.svc.cluster.local",
                                  "reviews.default.svc.cluster.local."])
def test_every_spelling_of_a_host_in_its_namespace_is_the_same_host(host):
    assert traffic.short_host(host, "default") == "reviews" and traffic.same_host(host, "reviews", "default")
    assert traffic.short_host(host, "other") != "reviews" or host == "reviews"


def test_a_vs_without_http_routes_is_refused():
    with pytest.raises(TrafficError, match="VirtualService reviews has no spec.http routes; traffic splitting needs an HTTP route"):
        traffic.select_route(vs([]), "reviews", "default")


def test_no_route_to_subsets_of_the_host_is_refused_naming_the_fix():
    unnamed = {"route": [dest("v1"), {"destination": {"host": "reviews"}}]}   # one destination without a subset
    with pytest.raises(TrafficError, match="has no HTTP route whose destinations are all subsets of host reviews; check service_host"):
        traffic.select_route(vs([unnamed, {"route": []}]), "reviews", "default")
    with pytest.raises(TrafficError, match=r"^http\[0\] of VirtualService reviews does not send only to subsets of host reviews"):
        traffic.select_route(vs([unnamed]), "reviews", "default", route_index=0)
    with pytest.raises(TrafficError, match=r"no HTTP route named 'x' \(named routes: none; set route_index instead\)"):
        traffic.select_route(vs([unnamed]), "reviews", "default", route_name="x")


def test_an_ambiguous_choice_names_unnamed_routes_by_index():
    with pytest.raises(TrafficError, match=r"2 HTTP routes to subsets of reviews: http\[0\], http\[1\] \(name: default\)"):
        traffic.select_route(vs([{"route": [dest("v2")]}, DEFAULT_ROUTE]), "reviews", "default")


def test_destinations_of_the_same_subset_add_up_and_unweighted_ones_beside_others_carry_nothing():
    assert traffic.current_weights({"route": [dest("v1", 30), dest("v1", 20), dest("v2", 50)]}) == {"v1": 50, "v2": 50}
    assert traffic.current_weights({"route": [dest("v1"), dest("v2", 100)]}) == {"v1": 0, "v2": 100}
    assert traffic.current_weights({}) == {}


def test_weights_are_whole_numbers_keyed_by_name():
    assert traffic.validate_weights({"v1": 90.0, 2: 10}) == {"v1": 90, "2": 10}
    assert traffic.validate_weights({"v1": 100, "v2": 0}) == {"v1": 100, "v2": 0}
    with pytest.raises(TrafficError, match=r"traffic: weights must sum to 100, they sum to 90 \(v1=90\)"):
        traffic.validate_weights({"v1": 90}, field="traffic")
    with pytest.raises(TrafficError, match="weights.v1: weight must be a whole number from 0 to 100, got None"):
        traffic.validate_weights({"v1": None})


def test_destination_rules_of_the_host_are_merged_and_others_ignored():
    rules = [dr(subsets=("v1",)), dr(subsets=("v2",)), dr(subsets=("v9",), host="ratings"),
             {"spec": {"host": "reviews", "subsets": [{"labels": {"version": "x"}}]}}]
    assert traffic.destination_rule_subsets(rules, "reviews", "default") == (True, {"v1", "v2"})
    assert traffic.destination_rule_subsets(rules, "details", "default") == (False, set())


def test_a_destination_rule_without_subsets_says_so():
    store = FakeIstio([vs([DEFAULT_ROUTE]), dr(subsets=())])
    with pytest.raises(TrafficError, match=r"subset v1, v2 is not defined in the DestinationRule for host reviews \(defined: none\)"):
        WeightChange(store, "default", "reviews").apply({"v1": 90, "v2": 10})


def test_an_unchanged_weight_is_left_out_of_the_patch():
    ops, _new = traffic.weight_patch(0, {"route": THREE_WAY}, {"v1": 80, "v2": 10, "v3": 10})
    assert ops[1:] == [{"op": "replace", "path": "/spec/http/0/route/0/weight", "value": 80},
                       {"op": "replace", "path": "/spec/http/0/route/2/weight", "value": 10}]


def test_annotation_ops_leave_what_is_already_so():
    assert traffic.annotation_ops({"metadata": {}}, {"a": None}) == []
    assert traffic.annotation_ops({}, {"a": "1"}) == [{"op": "add", "path": "/metadata/annotations", "value": {"a": "1"}}]
    obj = {"metadata": {"annotations": {"a": "1"}}}
    assert traffic.annotation_ops(obj, {"a": "1", "b": None}) == []
    assert traffic.annotation_ops(obj, {"b": "2"}) == [{"op": "add", "path": "/metadata/annotations/b", "value": "2"}]


def test_the_host_is_the_one_given_or_the_only_one_the_vs_lists():
    assert traffic.default_host(vs([], hosts=("a", "b")), "c") == "c"
    assert traffic.default_host(vs([], hosts=("reviews",))) == "reviews"
    with pytest.raises(TrafficError, match=r"service_host: VirtualService reviews lists 2 hosts \(a, b\); set service_host"):
        traffic.default_host(vs([], hosts=("a", "b")))
    with pytest.raises(TrafficError, match=r"lists 0 hosts \(none\)"):
        traffic.default_host(vs([], hosts=()))


def test_extra_operations_alone_do_not_make_a_change_unless_they_change_something():
    store = FakeIstio([vs([DEFAULT_ROUTE]), dr()])
    change = WeightChange(store, "default", "reviews")
    result = change.apply({"v1": 100, "v2": 0}, extra_ops=lambda obj: [])
    assert result["changed"] is False and store.calls["write"] == 0
    result = change.apply({"v1": 100, "v2": 0}, extra_ops=lambda obj: traffic.annotation_ops(obj, {"note": "x"}))
    assert result["changed"] is True and result["patch"][0] == {"op": "test", "path": "/spec/http/0/route", "value": DEFAULT_ROUTE["route"]}
    assert store.objects[("virtualservices", "default", "reviews")]["metadata"]["annotations"] == {"note": "x"}
    assert result["route_index"] == 0 and result["route_name"] == "default" and result["attempts"] == 1


def test_five_conflicts_are_retried_by_default_not_six():
    store = FakeIstio([vs([DEFAULT_ROUTE]), dr()])
    store.interfere.extend([moving_writer()] * 5)
    assert WeightChange(store, "default", "reviews", sleep=lambda s: None).apply({"v1": 50, "v2": 50})["attempts"] == 6
    store = FakeIstio([vs([DEFAULT_ROUTE]), dr()])
    store.interfere.extend([moving_writer()] * 6)
    with pytest.raises(TrafficError, match="6 attempts met a conflict"):
        WeightChange(store, "default", "reviews", sleep=lambda s: None).apply({"v1": 50, "v2": 50})


def test_subsets_the_route_lacks_are_appended_in_name_order():
    route = {"route": [dest("v1", 100)]}
    ops, new_route = traffic.weight_patch(0, route, {"v1": 80, "v3": 5, "v2": 15})
    assert [d["destination"]["subset"] for d in new_route["route"]] == ["v1", "v2", "v3"]
    assert [op["value"]["destination"]["subset"] for op in ops if op["path"] == "/spec/http/0/route/-"] == ["v2", "v3"]


def test_an_error_that_is_no_conflict_is_raised_at_once_not_retried():
    store = FakeIstio([vs([DEFAULT_ROUTE]), dr()])
    store.refuse.append(ValueError("the client could not encode the patch"))   # not an API answer: no is_conflict
    with pytest.raises(ValueError, match="could not encode") as err:
        WeightChange(store, "default", "reviews", sleep=lambda s: pytest.fail("retried")).apply({"v1": 50, "v2": 50})
    assert not isinstance(err.value, TrafficError)   # raised as it came, not reported as a conflict
    assert store.calls["write"] == 1 and traffic.current_weights(store.route()) == {"v1": 100, "v2": 0}


def test_a_new_destination_copies_the_first_one_not_the_last():
    route = {"route": [{"destination": {"host": "reviews", "subset": "v1", "port": {"number": 9080}}, "weight": 50},
                       {"destination": {"host": "reviews", "subset": "v2", "port": {"number": 9090}}, "weight": 50}]}
    _ops, new_route = traffic.weight_patch(0, route, {"v1": 50, "v2": 40, "v3": 10})
    assert new_route["route"][2] == {"destination": {"host": "reviews", "subset": "v3", "port": {"number": 9080}}, "weight": 10}


def test_a_zero_weight_for_a_subset_the_route_lacks_is_no_change():
    store = FakeIstio([vs([DEFAULT_ROUTE]), dr()])
    result = WeightChange(store, "default", "reviews").apply({"v1": 100, "v2": 0, "v3": 0})
    assert result["changed"] is False and store.calls["write"] == 0 and len(store.route()["route"]) == 2


def test_without_validation_the_weights_are_written_as_given_and_no_destination_rule_is_read():
    # what the rollout relies on after checking its subsets once: each write reads only the VirtualService
    store = FakeIstio([vs([DEFAULT_ROUTE]), dr(subsets=("v1", "v2"))])
    result = WeightChange(store, "default", "reviews").apply({"v1": 90, "v3": 10}, validate=False)
    assert result["changed"] is True and traffic.current_weights(store.route()) == {"v1": 90, "v2": 0, "v3": 10}
    assert store.calls == {"read": 1, "write": 1}
