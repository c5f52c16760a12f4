# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The connection under the canary modules (k8s_client.RetryingPool): the request timeout, bounded retries of
answers that mean "try again" (429, 5xx, no answer), which writes may be sent again, and a write whose answer was
lost found to have landed. The fake stands at urllib3's pool manager, under the official client, and answers as
kube-apiserver does (a failed JSON patch ``test`` is a 422 without causes). The same faults come from Envoy's fault
filter in front of the real API server in tests/integration/test_api_faults.py."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json

import jsonpatch
import pytest
import urllib3
from urllib3.exceptions import NewConnectionError, ProtocolError, ReadTimeoutError, SSLError

from ansible_collections.onprem.mesh.plugins.module_utils import k8s_client as kc
from ansible_collections.onprem.mesh.plugins.module_utils.canary_checks import K8sReadError, K8sWorkloadReader
from ansible_collections.onprem.mesh.plugins.module_utils.traffic import WeightChange, current_weights

pytestmark = pytest.mark.skipif(not kc.HAS_K8S, reason="the kubernetes library is not installed")

VS_PATH = "/apis/networking.istio.io/v1/namespaces/shop/virtualservices/payment"
DR_PATH = "/apis/networking.istio.io/v1/namespaces/shop/destinationrules"


def virtual_service(v1=100, v2=0, rv="10"):
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "payment", "namespace": "shop", "resourceVersion": rv, "annotations": {"team": "pay"}},
            "spec": {"hosts": ["payment"], "http": [{"name": "primary", "route": [
                {"destination": {"host": "payment", "subset": "v1"}, "weight": v1},
                {"destination": {"host": "payment", "subset": "v2"}, "weight": v2}]}]}}


DESTINATION_RULE = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "payment", "namespace": "shop"},
                    "spec": {"host": "payment", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                                            {"name": "v2", "labels": {"version": "v2"}}]}}

TEST_FAILED = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422,
               "message": "the server rejected our request due to an error in our request"}


def response(status, doc=None, headers=None, text=None):
    body = text.encode() if text is not None else json.dumps(doc if doc is not None else {}).encode()
    head = {"Content-Type": "application/json"}
    head.update(headers or {})
    return urllib3.HTTPResponse(body=body, status=status, headers=head, reason={200: "OK"}.get(status, "Error"), preload_content=False)


class FakeAPI:
    """kube-apiserver at urllib3's pool manager: one VirtualService (GET, JSON patch with ``test``), DestinationRules
    listed. ``faults`` are taken one per request before it is handled: a status (answered instead), an exception
    (raised instead), or ``("lost", exc)``: the request is handled, then ``exc`` is raised instead of the answer."""

    def __init__(self, vs=None, faults=()):
        self.vs = vs or virtual_service()
        self.faults = list(faults)
        self.requests = []
        self.applied = 0

    def request(self, method, url, fields=None, headers=None, body=None, preload_content=True, timeout=None, **kwargs):
        path = urllib3.util.parse_url(url).path
        self.requests.append(dict(method=method, path=path, timeout=timeout, retries=kwargs.get("retries"), headers=dict(headers or {})))
        fault = self.faults.pop(0) if self.faults else None
        if isinstance(fault, BaseException):
            raise fault  # pylint: disable=raising-bad-type
        if isinstance(fault, tuple) and fault[0] == "retry-after":
            return response(fault[1], {"kind": "Status", "code": fault[1], "message": "too many requests"}, {"Retry-After": fault[2]})
        if isinstance(fault, int):
            return response(fault, {"kind": "Status", "code": fault, "message": "the server is currently unable to handle the request"})
        if isinstance(fault, tuple) and fault[0] == "first":   # another client's change lands just before this request
            fault[1](self)
            fault = fault[2]
        answer = self.answer(method, path, body)
        if isinstance(fault, tuple) and fault[0] == "lost":
            raise fault[1]
        if isinstance(fault, tuple) and fault[0] == "as":   # handled, and answered with this status
            answer.status = fault[1]
        if isinstance(fault, tuple) and fault[0] == "handled":   # handled, and then a proxy answered this instead
            return response(fault[1], {"kind": "Status", "code": fault[1], "message": "upstream timed out"})
        return answer

    def answer(self, method, path, body):
        if method == "GET" and path == VS_PATH:
            return response(200, self.vs)
        if method == "GET" and path == DR_PATH:
            return response(200, {"kind": "DestinationRuleList", "items": [DESTINATION_RULE]})
        if method == "PATCH" and path == VS_PATH:
            try:
                patched = jsonpatch.apply_patch(self.vs, json.loads(body))
            except (jsonpatch.JsonPatchConflict, jsonpatch.JsonPatchTestFailed, jsonpatch.JsonPointerException):
                return response(422, TEST_FAILED)
            patched["metadata"]["resourceVersion"] = str(int(self.vs["metadata"]["resourceVersion"]) + 1)
            self.vs = patched
            self.applied += 1
            return response(200, self.vs)
        if method == "POST":
            return response(201, {})
        return response(404, {"kind": "Status", "code": 404, "message": "not found"})

    def count(self, method, path=VS_PATH):
        return sum(1 for r in self.requests if r["method"] == method and r["path"] == path)


def client(api, retries=5, timeout=30.0):
    """The official client as build_api_client makes it, over ``api``; returns (api_client, pool, sleeps)."""
    api_client = kc.build_api_client(dict(host="https://127.0.0.1:6443", api_key="t", request_timeout=timeout, api_retries=retries))
    sleeps = []
    pool = api_client.rest_client.pool_manager
    assert isinstance(pool, kc.RetryingPool) and (pool.timeout, pool.retries) == (timeout, retries)
    pool.pool = api
    pool.sleep = sleeps.append
    return api_client, pool, sleeps


def weights(vs):
    return current_weights(vs["spec"]["http"][0])


def read_timeout():
    return ReadTimeoutError(None, "/", "Read timed out. (read timeout=30)")


def refused():
    return NewConnectionError(None, "Failed to establish a new connection: [Errno 111] Connection refused")


# -- what is retried, and how long it waits ------------------------------------------------------------------------

def test_a_read_answered_503_twice_is_sent_again_with_a_doubling_wait():
    api = FakeAPI(faults=[503, 503])
    api_client, pool, sleeps = client(api)
    vs = kc.IstioObjects(api_client).get("virtualservices", "shop", "payment")
    assert weights(vs) == {"v1": 100, "v2": 0}
    assert api.count("GET") == 3 and sleeps == [0.5, 1.0]
    assert pool.last == dict(attempts=3, failures=["HTTP 503", "HTTP 503"]) and len(pool.retried) == 2


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_each_answer_that_means_try_again_is_retried(status):
    api = FakeAPI(faults=[status])
    api_client, _pool, sleeps = client(api)
    kc.IstioObjects(api_client).get("virtualservices", "shop", "payment")
    assert api.count("GET") == 2 and sleeps == [0.5]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 410, 422, 501, 505])
def test_other_answers_go_to_the_caller_at_once(status):
    api = FakeAPI(faults=[status])
    api_client, pool, sleeps = client(api)
    with pytest.raises(kc.K8sError) as err:
        kc.IstioObjects(api_client).get("virtualservices", "shop", "payment")
    assert err.value.status == status and api.count("GET") == 1 and sleeps == [] and pool.retried == []
    assert "attempts" not in str(err.value)


def test_the_wait_doubles_up_to_four_seconds():
    api = FakeAPI(faults=[503] * 7)
    api_client, _pool, sleeps = client(api, retries=7)
    kc.IstioObjects(api_client).get("virtualservices", "shop", "payment")
    assert sleeps == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]


@pytest.mark.parametrize("value, wait", [("2", 2.0), ("0", 0.0), ("1.5", 1.5), ("60", 10.0), ("Wed, 21 Oct 2026 07:28:00 GMT", 0.5), ("-3", 0.5),
                                         ("-0.5", 0.5)])
def test_retry_after_is_honoured_up_to_ten_seconds(value, wait):
    api = FakeAPI(faults=[("retry-after", 429, value)])
    api_client, _pool, sleeps = client(api)
    kc.IstioObjects(api_client).get("virtualservices", "shop", "payment")
    assert sleeps == [wait]


def test_when_the_retries_are_used_up_the_error_names_each_answer_and_the_options():
    api = FakeAPI(faults=[503, 503, 503])
    api_client, _pool, sleeps = client(api, retries=2, timeout=7.5)
    with pytest.raises(kc.K8sError) as err:
        kc.IstioObjects(api_client).get("virtualservices", "shop", "payment")
    assert api.count("GET") == 3 and sleeps == [0.5, 1.0] and err.value.status == 503
    assert str(err.value) == (
        "reading VirtualService shop/payment: HTTP 503 the server is currently unable to handle the request. The API server (or a load"
        " balancer in front of it) could not serve the request after 3 attempts (HTTP 503 x3; api_retries 2,"
        " request_timeout 7.5 s); retry later, or raise api_retries (and request_timeout) to wait longer.")


def test_no_retries_sends_once_and_says_so():
    api = FakeAPI(faults=[503])
    api_client, _pool, sleeps = client(api, retries=0)
    with pytest.raises(kc.K8sError, match=r"HTTP 503 .* could not serve the request now; retry later, or raise api_retries"):
        kc.IstioObjects(api_client).get("virtualservices", "shop", "payment")
    assert api.count("GET") == 1 and sleeps == []


def test_no_answer_is_retried_and_the_last_error_is_named():
    api = FakeAPI(faults=[refused(), read_timeout()])
    api_client, pool, sleeps = client(api, retries=1, timeout=2)
    with pytest.raises(kc.K8sError) as err:
        kc.IstioObjects(api_client).get("virtualservices", "shop", "payment")
    assert api.count("GET") == 2 and sleeps == [0.5] and pool.last["attempts"] == 2
    message = str(err.value)
    assert message.startswith("reading VirtualService shop/payment: the API server did not answer after 2 attempts (NewConnectionError: ")
    assert "ReadTimeoutError: None: Read timed out. (read timeout=30); api_retries 1, request_timeout 2 s)" in message
    assert message.endswith("on a slow or busy API server raise request_timeout or api_retries.")


def test_no_answer_then_an_answer():
    api = FakeAPI(faults=[read_timeout(), ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))])
    api_client, _pool, sleeps = client(api)
    assert kc.IstioObjects(api_client).list("destinationrules", "shop") == [DESTINATION_RULE]
    assert api.count("GET", DR_PATH) == 3 and sleeps == [0.5, 1.0]


def test_a_tls_failure_is_not_retried():
    api = FakeAPI(faults=[SSLError("certificate verify failed")])
    api_client, _pool, sleeps = client(api)
    with pytest.raises(kc.K8sError, match="(?s)could not be reached: .*certificate verify failed.*Check host/kubeconfig and validate_certs/ca_cert"):
        kc.IstioObjects(api_client).get("virtualservices", "shop", "payment")
    assert api.count("GET") == 1 and sleeps == []


def test_every_request_gets_the_timeout_and_no_retries_of_urllib3():
    api = FakeAPI()
    api_client, _pool, _sleeps = client(api, timeout=4.0)
    kc.IstioObjects(api_client).get("virtualservices", "shop", "payment")
    assert api.requests[0]["timeout"] == 4.0 and api.requests[0]["retries"] is False
    pool = kc.RetryingPool(api, timeout=9)
    pool.request("GET", "https://127.0.0.1:6443" + VS_PATH, timeout=urllib3.Timeout(total=1), headers={})
    assert api.requests[1]["timeout"].total == 1 and api.requests[1]["retries"] is False   # a timeout the caller set is kept


# -- which writes are sent again ---------------------------------------------------------------------------------

GUARDED = [{"op": "test", "path": "/spec/http/0/route/1/weight", "value": 0},
           {"op": "replace", "path": "/spec/http/0/route/0/weight", "value": 90},
           {"op": "replace", "path": "/spec/http/0/route/1/weight", "value": 10}]


def test_a_guarded_patch_answered_503_is_sent_again_and_applied_once():
    api = FakeAPI(faults=[503, 429])
    api_client, _pool, sleeps = client(api)
    vs = kc.IstioObjects(api_client).json_patch("virtualservices", "shop", "payment", GUARDED)
    assert weights(vs) == {"v1": 90, "v2": 10} and api.applied == 1 and api.count("PATCH") == 3 and sleeps == [0.5, 1.0]


def test_a_patch_without_test_ops_is_sent_once():
    api = FakeAPI(faults=[503])
    api_client, _pool, sleeps = client(api)
    with pytest.raises(kc.K8sError, match=r"HTTP 503 .* could not serve the request now"):
        kc.IstioObjects(api_client).json_patch("virtualservices", "shop", "payment", GUARDED[1:])
    assert api.count("PATCH") == 1 and sleeps == [] and api.applied == 0


def test_a_post_is_sent_once():
    api = FakeAPI(faults=[503])
    pool = kc.RetryingPool(api, sleep=[].append)
    answer = pool.request("POST", "https://127.0.0.1:6443/api/v1/namespaces", body="{}", headers={"Content-Type": "application/json"})
    assert answer.status == 503 and len(api.requests) == 1


def test_a_write_whose_answer_was_lost_is_found_landed():
    api = FakeAPI(faults=[("lost", read_timeout())])
    api_client, pool, sleeps = client(api)
    vs = kc.IstioObjects(api_client).json_patch("virtualservices", "shop", "payment", GUARDED)
    # sent, applied, answer lost; sent again: its test op fails (422); the object holds the patch: landed
    assert weights(vs) == {"v1": 90, "v2": 10} and api.applied == 1 and api.count("PATCH") == 2 and api.count("GET") == 1
    assert sleeps == [0.5] and pool.last["failures"] == ["ReadTimeoutError: None: Read timed out. (read timeout=30)"]


@pytest.mark.parametrize("status", [500, 502, 504])
def test_a_write_answered_with_an_error_that_may_follow_it_is_found_landed(status):
    api = FakeAPI(faults=[("handled", status)])
    api_client, _pool, _sleeps = client(api)
    vs = kc.IstioObjects(api_client).json_patch("virtualservices", "shop", "payment", GUARDED)
    assert weights(vs) == {"v1": 90, "v2": 10} and api.applied == 1 and api.count("PATCH") == 2 and api.count("GET") == 1


@pytest.mark.parametrize("first", [429, 503, "refused"])
def test_after_an_answer_given_before_handling_a_conflict_goes_to_the_caller_unread(first):
    api = FakeAPI(faults=[refused() if first == "refused" else first])
    api.vs = jsonpatch.apply_patch(api.vs, GUARDED)   # the object holds our values, but not by this write
    api_client, _pool, _sleeps = client(api)
    with pytest.raises(kc.K8sError) as err:
        kc.IstioObjects(api_client).json_patch("virtualservices", "shop", "payment", GUARDED)
    assert err.value.is_conflict and api.count("GET") == 0 and api.count("PATCH") == 2


def test_a_lost_answer_and_another_writer_is_a_conflict_for_the_caller():
    def other_writer(api):   # sets 70/30 just before our patch, which then fails its test (and its answer is lost)
        api.vs = jsonpatch.apply_patch(api.vs, [{"op": "replace", "path": "/spec/http/0/route/0/weight", "value": 70},
                                                {"op": "replace", "path": "/spec/http/0/route/1/weight", "value": 30}])

    api = FakeAPI(faults=[("first", other_writer, ("lost", read_timeout()))])
    api_client, _pool, _sleeps = client(api)
    with pytest.raises(kc.K8sError) as err:
        kc.IstioObjects(api_client).json_patch("virtualservices", "shop", "payment", GUARDED)
    assert err.value.is_conflict and api.applied == 0 and api.count("PATCH") == 2 and api.count("GET") == 1
    assert weights(api.vs) == {"v1": 70, "v2": 30}


def test_a_schema_error_after_a_lost_answer_is_not_read_for_landing():
    api = FakeAPI(faults=[("lost", read_timeout())])
    api_client, _pool, _sleeps = client(api)
    invalid = dict(TEST_FAILED, details={"causes": [{"field": "spec.http[0].route[0].weight", "message": "must be <= 100"}]})
    api.answer = lambda method, path, body: response(422, invalid) if method == "PATCH" else FakeAPI.answer(api, method, path, body)
    with pytest.raises(kc.K8sError) as err:
        kc.IstioObjects(api_client).json_patch("virtualservices", "shop", "payment", GUARDED)
    assert not err.value.is_conflict and api.count("GET") == 0


def test_the_landing_read_failing_leaves_the_conflict_to_the_caller():
    api = FakeAPI(faults=[("lost", read_timeout()), None, refused()])
    api_client, _pool, _sleeps = client(api)
    with pytest.raises(kc.K8sError) as err:
        kc.IstioObjects(api_client).json_patch("virtualservices", "shop", "payment", GUARDED)
    assert err.value.is_conflict and api.applied == 1 and api.count("GET") == 1


def test_a_landing_read_answered_with_an_error_is_no_proof():
    api = FakeAPI(faults=[("lost", read_timeout()), None, ("as", 404)])
    api_client, _pool, _sleeps = client(api)
    with pytest.raises(kc.K8sError) as err:
        kc.IstioObjects(api_client).json_patch("virtualservices", "shop", "payment", GUARDED)
    assert err.value.is_conflict and api.applied == 1 and api.count("GET") == 1


def test_a_rollout_step_whose_answer_was_lost_goes_on_without_a_second_write():
    """Through WeightChange with a guard as the rollout's (the route's weights must be the ones it left): without the
    landing check, the retry's failed test would read as another writer having changed the route."""
    api = FakeAPI(faults=[None, None, ("lost", read_timeout())])
    api_client, _pool, _sleeps = client(api)
    change = WeightChange(kc.IstioObjects(api_client), "shop", "payment", retries=3, sleep=lambda s: None)

    def guard(vs):
        assert weights(vs) == {"v1": 100, "v2": 0}, "someone else changed the route: %s" % weights(vs)

    result = change.apply({"v1": 90, "v2": 10}, guard=guard)
    assert result["changed"] and result["attempts"] == 1 and weights(result["object"]) == {"v1": 90, "v2": 10} and api.applied == 1


# -- patch_landed --------------------------------------------------------------------------------------------------

OBJ = {"metadata": {"annotations": {"a/b": "1", "x": "y"}}, "spec": {"http": [{"name": "m"}, {"name": "primary", "weight": 5}]}}


@pytest.mark.parametrize("ops, landed", [
    ([{"op": "replace", "path": "/spec/http/1/weight", "value": 5}], True),
    ([{"op": "replace", "path": "/spec/http/1/weight", "value": 6}], False),
    ([{"op": "add", "path": "/metadata/annotations/a~1b", "value": "1"}], True),
    ([{"op": "add", "path": "/metadata/annotations/new", "value": "1"}], False),
    ([{"op": "add", "path": "/spec/http/0", "value": {"name": "m"}}], True),
    ([{"op": "add", "path": "/spec/http/-", "value": {"name": "primary", "weight": 5}}], False),
    ([{"op": "remove", "path": "/metadata/annotations/gone"}], True),
    ([{"op": "remove", "path": "/metadata/annotations/x"}], False),
    ([{"op": "remove", "path": "/metadata/labels/x"}], False),
    ([{"op": "remove", "path": "/metadata/labels/x"}, {"op": "replace", "path": "/spec/http/1/weight", "value": 5}], False),
    ([{"op": "remove", "path": "/spec/http/0"}], False),
    ([{"op": "remove", "path": "/spec/http/0"}, {"op": "replace", "path": "/spec/http/1/weight", "value": 5}], True),
    ([{"op": "test", "path": "/spec/http/1/weight", "value": 7}, {"op": "replace", "path": "/spec/http/1/weight", "value": 5}], True),
    ([{"op": "test", "path": "/spec/http/1/weight", "value": 5}], False),
    ([{"op": "move", "from": "/spec/http/0", "path": "/spec/http/1"}], False),
    ([{"op": "replace", "path": "/spec/http/7/weight", "value": None}], False),
    ([{"op": "replace", "path": "/spec/http/2", "value": None}], False),
    ([{"op": "replace", "path": "/spec/http/x", "value": None}], False),
    ([{"op": "replace", "path": "/metadata/annotations/x/deeper", "value": None}], False),
    ([], False),
])
def test_patch_landed(ops, landed):
    assert kc.patch_landed(ops, OBJ) is landed


@pytest.mark.parametrize("method, headers, body, guarded", [
    ("PATCH", {"Content-Type": "application/json-patch+json"}, json.dumps(GUARDED), True),
    ("PATCH", {"Content-Type": "application/json-patch+json"}, json.dumps(GUARDED[1:]), False),
    ("PATCH", {"Content-Type": "application/merge-patch+json"}, json.dumps(GUARDED), False),
    ("PUT", {"Content-Type": "application/json-patch+json"}, json.dumps(GUARDED), False),
    ("PATCH", {"Content-Type": "application/json-patch+json"}, "not json", False),
    ("PATCH", {"Content-Type": "application/json-patch+json"}, json.dumps({"op": "test"}), False),
    ("PATCH", None, json.dumps(GUARDED), False),
])
def test_which_writes_are_guarded(method, headers, body, guarded):
    assert kc._is_guarded_patch(method, headers, body) is guarded  # pylint: disable=protected-access


# -- options -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params, message", [
    (dict(request_timeout=0), "request_timeout: seconds that an API request may take, more than 0, got 0; set request_timeout (default 30)"),
    (dict(request_timeout=-1.5), "request_timeout: seconds that an API request may take, more than 0, got -1.5"),
    (dict(request_timeout=float("nan")), "request_timeout: seconds that an API request may take, more than 0, got nan"),
    (dict(api_retries=-1), "api_retries: how many times a request answered 429, 5xx or not at all is sent again, 0 or more, got -1;"
                           " set api_retries (default 5)"),
])
def test_bad_options_are_named(params, message):
    with pytest.raises(kc.K8sError) as err:
        kc.build_api_client(dict(host="https://127.0.0.1:6443", **params))
    assert str(err.value).startswith(message)


def test_defaults_when_the_options_are_not_given():
    pool = kc.build_api_client(dict(host="https://127.0.0.1:6443")).rest_client.pool_manager
    assert (pool.timeout, pool.retries) == (30.0, 5) and kc.K8S_AUTH_ARGSPEC["request_timeout"]["default"] == 30.0
    assert kc.K8S_AUTH_ARGSPEC["api_retries"]["default"] == 5
    pool = kc.build_api_client(dict(host="https://127.0.0.1:6443", api_retries=0, request_timeout=0.5)).rest_client.pool_manager
    assert (pool.timeout, pool.retries) == (0.5, 0)


def test_the_pool_under_it_still_answers_for_itself():
    api = FakeAPI()
    api.clear = lambda: "cleared"
    assert kc.RetryingPool(api).clear() == "cleared"


def test_a_workload_read_names_the_attempts():
    api = FakeAPI(faults=[503, 503])
    api_client, _pool, _sleeps = client(api, retries=1)
    with pytest.raises(K8sReadError) as err:
        K8sWorkloadReader(api_client).read_deployment("shop", "payment-v2")
    assert str(err.value) == ("reading Deployment shop/payment-v2: Kubernetes API answered 503: the server is currently unable to handle the"
                              " request after 2 attempts (HTTP 503 x2; api_retries 1, request_timeout 30 s)")
    api.faults = [refused(), refused()]
    with pytest.raises(K8sReadError, match=r"Kubernetes API unreachable: .*Connection refused after 2 attempts \(NewConnectionError: "):
        K8sWorkloadReader(api_client).read_deployment("shop", "payment-v2")


def test_the_note_counts_each_run_of_the_same_failure_once():
    api = FakeAPI(faults=[503, read_timeout(), read_timeout(), 503, 503])
    api_client, _pool, _sleeps = client(api, retries=4)
    with pytest.raises(kc.K8sError) as err:
        kc.IstioObjects(api_client).get("virtualservices", "shop", "payment")
    assert ("after 5 attempts (HTTP 503, ReadTimeoutError: None: Read timed out. (read timeout=30) x2, HTTP 503 x2; api_retries 4,"
            in str(err.value))


def test_attempts_note_is_empty_for_one_attempt_or_another_pool():
    api = FakeAPI()
    api_client, _pool, _sleeps = client(api)
    kc.IstioObjects(api_client).get("virtualservices", "shop", "payment")
    assert kc.attempts_note(api_client) == ""
    assert kc.attempts_note(object()) == ""


# -- the rest of the connection: errors, options, IstioObjects -------------------------------------------------------

class Answer(Exception):
    """An ApiException's shape: status, reason, body."""

    def __init__(self, status, reason=None, body=None):
        super(Answer, self).__init__("(%s) Reason: %s" % (status, reason))
        self.status, self.reason, self.body = status, reason, body


@pytest.mark.parametrize("status, hint", [
    (401, " Check the credentials: api_key, client_cert/client_key or the kubeconfig user."),
    (404, " Check the name and namespace (and that the Istio CRDs are installed)."),
    (400, ""), (402, ""), (403, " The identity used lacks RBAC permission for this; grant the verbs listed in the collection's README"
                                " (section RBAC) on this resource."), (405, ""),
])
def test_each_refusal_gets_its_hint(status, hint):
    err = kc.api_error(Answer(status, "Why", json.dumps({"message": "no"})), "reading X")
    assert str(err) == "reading X: HTTP %d no.%s" % (status, hint) and err.status == status and err.reason == "Why"


@pytest.mark.parametrize("verb, resource, rbac", [("patch", "virtualservices", True), ("patch", None, False), (None, "pods", False)])
def test_a_403_names_verb_and_resource_only_when_both_are_known(verb, resource, rbac):
    err = kc.api_error(Answer(403, "Forbidden", "{}"), "x", verb=verb, resource=resource, namespace="shop", group="networking.istio.io")
    expected = "lacks RBAC permission to patch virtualservices.networking.istio.io in namespace shop; grant that verb"
    assert (expected in str(err)) is rbac and ("lacks RBAC permission for this; grant the verbs listed" in str(err)) is not rbac


@pytest.mark.parametrize("body, reason, message", [
    (json.dumps({"message": "from the server"}), "R", "from the server"),
    (json.dumps({"kind": "Status"}), "Gone", "Gone"),
    ("not json", "R", "not json"),
    (json.dumps(["a", "list"]), "R", "['a', 'list']"),
    (12, "R", "12"),
    (None, None, "(500) Reason: None"),
])
def test_the_server_message_is_found_whatever_the_body(body, reason, message):
    assert str(kc.api_error(Answer(500, reason, body), "w")).startswith("w: HTTP 500 %s." % message)


def test_a_422_without_causes_is_a_conflict_only_on_a_guarded_patch():
    body = json.dumps(TEST_FAILED)
    assert not kc.api_error(Answer(422, "Invalid", body), "w").is_conflict
    assert kc.api_error(Answer(422, "Invalid", body), "w", guarded=True).is_conflict
    assert not kc.K8sError("m", status=422, body=TEST_FAILED).is_conflict and kc.K8sError("m", status=409).is_conflict
    api = FakeAPI()
    api.answer = lambda method, path, body: response(422, TEST_FAILED)
    api_client, _pool, _sleeps = client(api)
    with pytest.raises(kc.K8sError) as err:   # no test op: a refused patch of another kind, not a conflict
        kc.IstioObjects(api_client).json_patch("virtualservices", "shop", "payment", GUARDED[1:])
    assert not err.value.guarded and not err.value.is_conflict


def test_a_conflict_409_after_a_lost_answer_is_read_for_landing():
    api = FakeAPI(faults=[("lost", read_timeout()), 409])
    api_client, _pool, _sleeps = client(api)
    vs = kc.IstioObjects(api_client).json_patch("virtualservices", "shop", "payment", GUARDED)
    assert weights(vs) == {"v1": 90, "v2": 10} and api.count("GET") == 1


def test_a_conflict_whose_body_is_not_json_is_read_for_landing():
    api = FakeAPI(faults=[("lost", read_timeout())])
    api_client, _pool, _sleeps = client(api)
    answer = api.answer
    api.answer = lambda method, path, body: (response(422, text="<html>proxy</html>") if method == "PATCH" and api.applied
                                             else answer(method, path, body))
    vs = kc.IstioObjects(api_client).json_patch("virtualservices", "shop", "payment", GUARDED)
    assert weights(vs) == {"v1": 90, "v2": 10} and api.count("GET") == 1


def test_each_retry_is_recorded_with_its_own_failure():
    api = FakeAPI(faults=[503, ("retry-after", 429, "0")])
    api_client, pool, _sleeps = client(api)
    kc.IstioObjects(api_client).get("virtualservices", "shop", "payment")
    url = "https://127.0.0.1:6443" + VS_PATH
    assert pool.retried == [("GET", url, "HTTP 503"), ("GET", url, "HTTP 429")]


def test_a_fresh_pool_and_its_defaults():
    api = FakeAPI(faults=[503])
    pool = kc.RetryingPool(api)
    assert pool.last == dict(attempts=0, failures=[]) and pool.sleep is kc.time.sleep and (pool.timeout, pool.retries) == (30.0, 5)
    pool.sleep = [].append
    assert pool.request("GET", "https://127.0.0.1:6443" + VS_PATH).status == 200   # no headers given: none sent
    assert api.requests[0]["headers"] == {} and api.requests[0]["timeout"] == 30.0


def test_istio_objects_count_their_calls_and_name_the_kind():
    api = FakeAPI()
    api_client, _pool, _sleeps = client(api)
    store = kc.IstioObjects(api_client)
    assert store.calls == {"read": 0, "write": 0}
    store.get("virtualservices", "shop", "payment")
    store.list("destinationrules", "shop")
    store.json_patch("virtualservices", "shop", "payment", GUARDED)
    assert store.calls == {"read": 2, "write": 1}
    for plural, kind in (("destinationrules", "DestinationRule"), ("gateways", "gateways"), ("virtualservices", "VirtualService")):
        with pytest.raises(kc.K8sError, match=r"^reading %s shop/other: HTTP 404 " % kind):
            store.get(plural, "shop", "other")


@pytest.mark.parametrize("status, exists", [(200, True), (404, False), (403, None), (503, None)])
def test_namespace_exists(status, exists):
    api = FakeAPI(faults=[status] if status != 200 else [])
    api.answer = lambda method, path, body: response(200, {"kind": "Namespace"}) if path == "/api/v1/namespaces/shop" else None
    api_client, _pool, _sleeps = client(api, retries=0)
    assert kc.IstioObjects(api_client).namespace_exists("shop") is exists


def test_without_the_kubernetes_library_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setattr(kc, "HAS_K8S", False)
    with pytest.raises(kc.K8sError, match=r"^the kubernetes Python library is required \(pip install kubernetes\)$"):
        kc.build_api_client(dict(host="https://127.0.0.1:6443"))


def test_with_host_tls_is_verified_unless_told_otherwise():
    assert kc.build_api_client(dict(host="https://127.0.0.1:6443")).configuration.verify_ssl is True
    assert kc.build_api_client(dict(host="https://127.0.0.1:6443", validate_certs=False)).configuration.verify_ssl is False


KUBECONFIG = {"apiVersion": "v1", "kind": "Config", "current-context": "c",
              "clusters": [{"name": "k", "cluster": {"server": "https://10.1.2.3:6443", "insecure-skip-tls-verify": True}}],
              "users": [{"name": "u", "user": {"token": "abc"}}], "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}


def test_a_kubeconfig_as_a_dictionary_or_a_file(tmp_path):
    assert kc.build_api_client(dict(kubeconfig=KUBECONFIG)).configuration.host == "https://10.1.2.3:6443"
    path = tmp_path / "config"
    path.write_text(json.dumps(KUBECONFIG))
    assert kc.build_api_client(dict(kubeconfig=str(path))).configuration.host == "https://10.1.2.3:6443"


def test_a_kubeconfig_that_cannot_be_loaded_is_named(tmp_path, monkeypatch):
    with pytest.raises(kc.K8sError, match=r"^could not load the kubeconfig %s: .*Set kubeconfig \(or K8S_AUTH_KUBECONFIG\), or host and api_key\.$"
                       % (tmp_path / "missing")):
        kc.build_api_client(dict(kubeconfig=str(tmp_path / "missing")))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(kc.K8sError, match=r"^could not load the kubeconfig \(default\): "):
        kc.build_api_client({})


def test_the_token_is_never_logged():
    assert kc.K8S_AUTH_ARGSPEC["api_key"]["no_log"] is True
    assert kc.K8S_AUTH_ARGSPEC["client_key"]["no_log"] is False   # a path, not the key: said so, or Ansible warns about it
