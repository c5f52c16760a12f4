# -*- coding: utf-8 -*-
# Copyright (c) onprem.mesh contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Connection to the Kubernetes API through the official ``kubernetes`` client.

The options mirror kubernetes.core's (``kubeconfig``, ``context``, ``host``, ``api_key``,
``validate_certs``, ``ca_cert``, ``client_cert``, ``client_key``, ``proxy``) and read the same
``K8S_AUTH_*`` environment variables, so inventories written for kubernetes.core work unchanged.

``IstioObjects`` is the small surface the canary modules need: read a VirtualService or
DestinationRule, list DestinationRules, and send a JSON patch. Every call is counted
(``calls``) so that benchmarks and the module results can say what a step cost.

``RetryingPool`` sits under the client (at urllib3's pool manager, the layer every version of the
``kubernetes`` library calls the same way): every request gives up after ``request_timeout``, and an
answer that says "try again" (429, 500, 502, 503, 504, or none: connection refused or reset, a timeout) is
sent again up to ``api_retries`` more times. The library's own ``client_go_retries`` (kubernetes >= 37)
retries only GET and HEAD and only answers with a Retry-After header; load balancers in front of the API
answer 502/503/504 without one, and the canary modules' writes are JSON patches guarded by ``test``
operations, which are safe to send again (see ``RetryingPool``).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import math
import threading
import time
import traceback

from ansible.module_utils.basic import env_fallback

K8S_IMP_ERR = None
try:
    from kubernetes import client as k8s_client_lib
    from kubernetes import config as k8s_config
    from kubernetes.client.exceptions import ApiException
    HAS_K8S = True
except ImportError:  # pragma: no cover - reported by the module through missing_required_lib
    k8s_client_lib = None
    k8s_config = None
    ApiException = Exception
    HAS_K8S = False
    K8S_IMP_ERR = traceback.format_exc()

ISTIO_GROUP = "networking.istio.io"
ISTIO_VERSION = "v1"
JSON_PATCH = "application/json-patch+json"

K8S_AUTH_ARGSPEC = dict(
    kubeconfig=dict(type="raw", fallback=(env_fallback, ["K8S_AUTH_KUBECONFIG"])),
    context=dict(type="str", fallback=(env_fallback, ["K8S_AUTH_CONTEXT"])),
    host=dict(type="str", fallback=(env_fallback, ["K8S_AUTH_HOST"])),
    api_key=dict(type="str", no_log=True, fallback=(env_fallback, ["K8S_AUTH_API_KEY"])),
    validate_certs=dict(type="bool", aliases=["verify_ssl"], fallback=(env_fallback, ["K8S_AUTH_VERIFY_SSL"])),
    ca_cert=dict(type="path", aliases=["ssl_ca_cert"], fallback=(env_fallback, ["K8S_AUTH_SSL_CA_CERT"])),
    client_cert=dict(type="path", aliases=["cert_file"], fallback=(env_fallback, ["K8S_AUTH_CERT_FILE"])),
    client_key=dict(type="path", aliases=["key_file"], no_log=False, fallback=(env_fallback, ["K8S_AUTH_KEY_FILE"])),
    proxy=dict(type="str", fallback=(env_fallback, ["K8S_AUTH_PROXY"])),
    request_timeout=dict(type="float", default=30.0),
    api_retries=dict(type="int", default=5),
)

# answers that mean "try again": throttled (429, kube-apiserver's priority and fairness), etcd or a webhook timed out
# (500, 504), no healthy backend behind a load balancer (502, 503)
TRANSIENT_STATUSES = (429, 500, 502, 503, 504)
# answers given before the request was handled: a write answered so was not applied
NOT_HANDLED_STATUSES = (429, 503)
RETRY_AFTER_MAX = 10.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 4.0


class K8sError(Exception):
    """An answer from the API server (or no answer), with the status code and the server's message.

    ``verb``, ``resource`` (with its API ``group``) and ``namespace`` say what was asked (for messages about RBAC); ``guarded`` is true
    when the request was a JSON patch that carried ``test`` operations.
    """

    def __init__(self, message, status=None, reason=None, body=None, verb=None, resource=None, namespace=None, guarded=False, group=None):
        super(K8sError, self).__init__(message)
        self.group = group
        self.status = status
        self.reason = reason
        self.body = body or {}
        self.verb = verb
        self.resource = resource
        self.namespace = namespace
        self.guarded = guarded

    @property
    def is_conflict(self):
        """The object changed between our read and our write: read again and rebuild the write.

        409 (a stale resourceVersion), or 422 without ``details.causes`` on a JSON patch that carried ``test``
        operations. kube-apiserver answers every JSON patch that cannot be applied to the object as it is now (a
        failed ``test``, a path that is gone) with HTTP 422, reason Invalid, the generic message "the server
        rejected our request due to an error in our request" and no causes (measured on kube-apiserver 1.35,
        tests/integration/test_canary_modules.py). A 422 from a schema or validation error lists its causes
        (the fields), so it is never taken for a conflict.
        """
        if self.status == 409:
            return True
        if self.status == 422 and self.guarded:
            details = self.body.get("details") if isinstance(self.body, dict) else None
            return not (details or {}).get("causes")
        return False


def _server_message(exc):
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {"message": str(exc.body)}
    if not isinstance(body, dict):
        body = {"message": str(body)}
    return body, body.get("message") or exc.reason or str(exc)


def resource_name(resource, group=None):
    """``virtualservices.networking.istio.io``, ``pods`` (the core group has no suffix)."""
    return "%s.%s" % (resource, group) if group else resource


def api_error(exc, what, verb=None, resource=None, namespace=None, guarded=False, group=None, note=""):
    """Turn an ApiException into a K8sError whose message says what failed and what to do (``note``: how many
    times it was sent, from ``attempts_note``)."""
    body, message = _server_message(exc)
    status = getattr(exc, "status", None)
    hint = ""
    if status in TRANSIENT_STATUSES:
        hint = (" The API server (or a load balancer in front of it) could not serve the request%s; retry later, or raise api_retries"
                " (and request_timeout) to wait longer." % (note or " now"))
        note = ""
    if status == 401:
        hint = " Check the credentials: api_key, client_cert/client_key or the kubeconfig user."
    elif status == 403:
        if verb and resource:
            hint = (" The identity used lacks RBAC permission to %s %s%s; grant that verb (the collection's README lists the"
                    " verbs, section RBAC) and check that the namespace exists (a Role grants nothing in a namespace that does"
                    " not exist)." % (verb, resource_name(resource, group), " in namespace %s" % namespace if namespace else ""))
        else:
            hint = (" The identity used lacks RBAC permission for this; grant the verbs listed in the"
                    " collection's README (section RBAC) on this resource.")
    elif status == 404:
        hint = " Check the name and namespace (and that the Istio CRDs are installed)."
    return K8sError("%s: HTTP %s %s%s.%s" % (what, status, message, note, hint), status=status, reason=getattr(exc, "reason", None), body=body,
                    verb=verb, resource=resource, namespace=namespace, guarded=guarded, group=group)


def build_api_client(params):
    """An ``kubernetes.client.ApiClient`` from module parameters (kubernetes.core's semantics).

    With ``host``, the connection is built from the options alone and TLS is verified unless
    ``validate_certs`` is false. Otherwise the kubeconfig (``kubeconfig``, ``K8S_AUTH_KUBECONFIG``,
    ``KUBECONFIG`` or ``~/.kube/config``) is loaded; options given explicitly override it.
    """
    if not HAS_K8S:
        raise K8sError("the kubernetes Python library is required (pip install kubernetes)")
    configuration = k8s_client_lib.Configuration()
    if params.get("host"):
        configuration.host = params["host"]
        configuration.verify_ssl = True
    else:
        kubeconfig = params.get("kubeconfig")
        try:
            if isinstance(kubeconfig, dict):
                k8s_config.load_kube_config_from_dict(kubeconfig, context=params.get("context"), client_configuration=configuration)
            else:
                k8s_config.load_kube_config(config_file=kubeconfig, context=params.get("context"), client_configuration=configuration)
        except Exception as exc:  # the library raises ConfigException, IOError or ValueError
            raise K8sError("could not load the kubeconfig %s: %s. Set kubeconfig (or K8S_AUTH_KUBECONFIG), or host and api_key."
                           % (kubeconfig or "(default)", exc))
    if params.get("api_key"):
        configuration.api_key = {"authorization": "Bearer %s" % params["api_key"]}
    if params.get("validate_certs") is not None:
        configuration.verify_ssl = params["validate_certs"]
    if params.get("ca_cert"):
        configuration.ssl_ca_cert = params["ca_cert"]
    if params.get("client_cert"):
        configuration.cert_file = params["client_cert"]
    if params.get("client_key"):
        configuration.key_file = params["client_key"]
    if params.get("proxy"):
        configuration.proxy = params["proxy"]
    timeout = params.get("request_timeout")
    timeout = 30.0 if timeout is None else timeout
    retries = params.get("api_retries")
    retries = 5 if retries is None else retries
    if timeout <= 0 or math.isnan(timeout):
        raise K8sError("request_timeout: seconds that an API request may take, more than 0, got %s; set request_timeout (default 30)" % timeout)
    if retries < 0:
        raise K8sError("api_retries: how many times a request answered 429, 5xx or not at all is sent again, 0 or more, got %s;"
                       " set api_retries (default 5)" % retries)
    api_client = k8s_client_lib.ApiClient(configuration)
    api_client.rest_client.pool_manager = RetryingPool(api_client.rest_client.pool_manager, timeout=timeout, retries=retries)
    return api_client


def _is_guarded_patch(method, headers, body):
    """A JSON patch whose operations include ``test``: sent again, it applies only to the object it was built for."""
    if method != "PATCH" or "json-patch" not in str((headers or {}).get("Content-Type", "")):
        return False
    try:
        ops = json.loads(body) if isinstance(body, (str, bytes)) else body
    except ValueError:
        return False
    return isinstance(ops, list) and any(isinstance(op, dict) and op.get("op") == "test" for op in ops)


_MISSING = object()


def _pointer_value(doc, pointer):
    """The value at JSON pointer ``pointer`` in ``doc``, or ``_MISSING``."""
    for raw in pointer.split("/")[1:]:
        key = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(doc, dict):
            if key not in doc:
                return _MISSING
            doc = doc[key]
        elif isinstance(doc, list):
            if key == "-" or not key.isdigit() or int(key) >= len(doc):
                return _MISSING
            doc = doc[int(key)]
        else:
            return _MISSING
    return doc


def patch_landed(ops, obj):
    """True when ``obj`` already holds what the JSON patch ``ops`` sets: every ``add`` or ``replace`` value is in
    place and every key that ``remove`` takes out of a map is gone. A patch applies whole or not at all, so this is
    how a write whose answer was lost is known to have landed. False when the patch sets nothing it can be checked
    by (only removals from lists, ``move`` or ``copy``)."""
    checked = False
    for op in ops or []:
        kind, path = op.get("op"), op.get("path", "")
        if kind == "test":
            continue
        if kind in ("add", "replace"):
            if _pointer_value(obj, path) != op.get("value"):
                return False
            checked = True
        elif kind == "remove":
            parent = _pointer_value(obj, path.rsplit("/", 1)[0])
            if isinstance(parent, dict):
                if _pointer_value(obj, path) is not _MISSING:
                    return False
                checked = True
            elif parent is _MISSING:
                return False
        else:
            return False
    return checked


class RetryingPool:
    """urllib3's pool manager under the ``kubernetes`` client, with a timeout on every request and bounded retries
    of the answers that mean "try again".

    Retried: HTTP 429, 500, 502, 503 and 504, and no answer at all (connection refused or reset, a timeout);
    at most ``retries`` times more, waiting the answer's Retry-After (at most 10 s) or 0.5 s doubling up to 4 s.
    Reads (GET, HEAD) are always retried; a write only when it is a JSON patch guarded by ``test`` operations,
    which applies to the object it was built for or not at all. When an earlier attempt of such a write may have
    landed (no answer after it was sent, or 500, 502 or 504) and a later one is answered as a conflict (409, or 422
    for a failed ``test``), the object is read: if it already holds what the patch sets, the write landed and that
    read is the answer; otherwise the conflict goes to the caller, which reads again and rebuilds its write.
    Every other answer goes to the caller as it came. ``last`` (per thread) says how the last request went:
    attempts, and the status or error of each retried one.
    """

    def __init__(self, pool, timeout=30.0, retries=5, sleep=None):
        self.pool = pool
        self.timeout = timeout
        self.retries = retries
        self.sleep = sleep or time.sleep
        self.retried = []  # (method, url, status or error) of every attempt that was sent again
        self._local = threading.local()

    def __getattr__(self, name):  # clear(), connection_pool_kw, ... of the pool manager under it
        return getattr(self.pool, name)

    @property
    def last(self):
        return getattr(self._local, "last", None) or dict(attempts=0, failures=[])

    def _send(self, method, url, kwargs):
        args = dict(kwargs)
        args["headers"] = dict(kwargs.get("headers") or {})
        if args.get("timeout") is None:
            args["timeout"] = self.timeout
        args["retries"] = False  # this class retries; urllib3's own retries would multiply the timeout
        return self.pool.request(method, url, **args)

    @staticmethod
    def _delay(response, attempt):
        value = response.headers.get("Retry-After") if response is not None else None
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = None
        if seconds is not None and seconds >= 0:
            return min(seconds, RETRY_AFTER_MAX)
        return min(BACKOFF_FIRST * 2 ** (attempt - 1), BACKOFF_MAX)

    @staticmethod
    def _body(response):
        try:
            return json.loads(response.data or b"{}")
        except ValueError:
            return {}

    def _landed(self, url, kwargs):
        try:
            response = self._send("GET", url, dict(headers=kwargs.get("headers"), timeout=kwargs.get("timeout")))
            if response.status == 200 and patch_landed(json.loads(kwargs.get("body") or "[]"), self._body(response)):
                return response
        except Exception:  # pylint: disable=broad-except  # no answer: the conflict goes to the caller
            pass
        return None

    def request(self, method, url, **kwargs):
        guarded = _is_guarded_patch(method, kwargs.get("headers"), kwargs.get("body"))
        retriable = method in ("GET", "HEAD") or guarded
        self._local.last = last = dict(attempts=0, failures=[])
        maybe_landed = False
        while True:
            last["attempts"] += 1
            response = None
            try:
                response = self._send(method, url, kwargs)
            except Exception as exc:  # urllib3's errors: refused, reset, timed out (an SSL error is no retry matter)
                last["failures"].append(_short(exc))
                if not retriable or last["attempts"] > self.retries or _is_ssl_error(exc):
                    raise
                maybe_landed = maybe_landed or not _not_sent(exc)
            else:
                status = response.status
                if maybe_landed and guarded and (status == 409 or (status == 422 and not _lists_causes(self._body(response)))):
                    landed = self._landed(url, kwargs)
                    if landed is not None:
                        return landed
                if status not in TRANSIENT_STATUSES:
                    return response
                last["failures"].append("HTTP %d" % status)
                if not retriable or last["attempts"] > self.retries:
                    return response
                maybe_landed = maybe_landed or status not in NOT_HANDLED_STATUSES
                response.drain_conn()
            self.retried.append((method, url, last["failures"][-1]))
            self.sleep(self._delay(response, last["attempts"]))


def _lists_causes(body):
    return bool(isinstance(body, dict) and (body.get("details") or {}).get("causes"))


def _is_ssl_error(exc):
    return "SSL" in type(exc).__name__


def _not_sent(exc):
    """A connection that was never made carries no request: refused, or the connect timed out."""
    return any(name in ("NewConnectionError", "ConnectTimeoutError", "ConnectionRefusedError") for name in (c.__name__ for c in type(exc).__mro__))


def attempts_note(api_client):
    """`` after N attempts (HTTP 503, HTTP 503, ...; api_retries R, request_timeout T s)`` for the last request of
    this thread when it was sent more than once, else ``""``."""
    pool = getattr(getattr(api_client, "rest_client", None), "pool_manager", None)
    if not isinstance(pool, RetryingPool) or pool.last["attempts"] <= 1:
        return ""
    last = pool.last
    return " after %d attempts (%s; api_retries %d, request_timeout %g s)" % (last["attempts"], _tally(last["failures"]), pool.retries, pool.timeout)


def _tally(failures):
    """``HTTP 503 x3``, ``HTTP 503, ReadTimeoutError: ... x2``: each run of the same failure once, with its count."""
    runs = []
    for failure in failures:
        if runs and runs[-1][0] == failure:
            runs[-1][1] += 1
        else:
            runs.append([failure, 1])
    return ", ".join(failure if count == 1 else "%s x%d" % (failure, count) for failure, count in runs)


def _short(exc):
    return "%s: %s" % (type(exc).__name__, exc)


def json_pointer(*parts):
    """A JSON pointer (RFC 6901) from path parts; escapes ``~`` and ``/`` in keys such as annotations."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


class IstioObjects:
    """Reads and patches Istio networking objects; counts every call it makes."""

    def __init__(self, api_client, group=ISTIO_GROUP, version=ISTIO_VERSION):
        self.api_client = api_client
        self.custom = k8s_client_lib.CustomObjectsApi(api_client)
        self.group = group
        self.version = version
        self.calls = {"read": 0, "write": 0}

    def _call(self, kind, what, func, *args, **kwargs):
        request = kwargs.pop("request", {})
        self.calls[kind] += 1
        try:
            return func(*args, **kwargs)
        except Exception as exc:  # ApiException; or connection refused, TLS failure, timeout
            note = attempts_note(self.api_client)
            if isinstance(exc, ApiException) and getattr(exc, "status", None):
                raise api_error(exc, what, note=note, **request)
            if note:
                raise K8sError("%s: the API server did not answer%s. Check that it is up and reachable (host/kubeconfig, proxy); on a slow"
                               " or busy API server raise request_timeout or api_retries." % (what, note), **request)
            raise K8sError("%s: the API server could not be reached: %s. Check host/kubeconfig and validate_certs/ca_cert." % (what, exc),
                           **request)

    def get(self, plural, namespace, name):
        kind = "VirtualService" if plural == "virtualservices" else "DestinationRule" if plural == "destinationrules" else plural
        return self._call("read", "reading %s %s/%s" % (kind, namespace, name), self.custom.get_namespaced_custom_object,
                          self.group, self.version, namespace, plural, name,
                          request=dict(verb="get", resource=plural, namespace=namespace, group=self.group))

    def list(self, plural, namespace):
        return self._call("read", "listing %s in namespace %s" % (plural, namespace), self.custom.list_namespaced_custom_object,
                          self.group, self.version, namespace, plural,
                          request=dict(verb="list", resource=plural, namespace=namespace, group=self.group)).get("items", [])

    def json_patch(self, plural, namespace, name, operations):
        guarded = any(op.get("op") == "test" for op in operations)
        return self._call("write", "patching %s %s/%s" % (plural, namespace, name), self.custom.patch_namespaced_custom_object,
                          self.group, self.version, namespace, plural, name, operations, _content_type=JSON_PATCH,
                          request=dict(verb="patch", resource=plural, namespace=namespace, group=self.group, guarded=guarded))

    def namespace_exists(self, namespace):
        """True or False when the API server says; None when these credentials may not read namespaces (or no answer)."""
        core = k8s_client_lib.CoreV1Api(self.api_client)
        try:
            self._call("read", "reading namespace %s" % namespace, core.read_namespace, namespace,
                       request=dict(verb="get", resource="namespaces"))
        except K8sError as exc:
            return False if exc.status == 404 else None
        return True
