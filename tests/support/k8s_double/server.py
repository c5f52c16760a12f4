"""TEST DOUBLE (onprem.mesh k8s_double): the HTTP(S) front of the fake Kubernetes API server.

Every response carries `X-Test-Double: onprem.mesh k8s_double`. Test controls live under /_double/ (never /api).
"""
import copy
import json
import os
import select
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import yaml

from . import errors, protobuf, tables
from .api import Api, Request
from .auth import allowed
from .faults import Faults, RequestLog
from .schema import SKIPPED_CEL_RULES

BANNER = "onprem.mesh k8s_double"
VERSION_INFO = {
    "major": "1", "minor": "32", "gitVersion": "v1.32.0+k8s-double", "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23.0", "compiler": "gc",
    "platform": "linux/amd64", "emulationMajor": "1", "emulationMinor": "32", "minCompatibilityMajor": "1", "minCompatibilityMinor": "31",
}
PUBLIC_PATHS = ("/version", "/healthz", "/livez", "/readyz")
BUMP_ANNOTATION = "k8s-double.onprem.mesh/concurrent-write"


class DoubleHTTPServer(ThreadingHTTPServer):  # pylint: disable=too-many-instance-attributes
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address, api, authn, state_file=None):
        super().__init__(address, Handler)
        self.api = api
        self.authn = authn
        self.faults = Faults()
        self.log = RequestLog()
        self.stopping = threading.Event()
        self.state_file = state_file
        self.bumps = 0
        self.public_url = ""
        api.bump_hooks.append(self._before_write_hook)
        if state_file:
            api.on_write = self.save_state

    def save_state(self):
        if not self.state_file:
            return
        tmp = f"{self.state_file}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(self.api.snapshot(), handle)
        os.replace(tmp, self.state_file)

    def bump(self, rtype, namespace, name):
        """A concurrent writer touches the object (new resourceVersion, annotation changed, generation unchanged)."""
        api = self.api
        with api.lock:
            table = api.objects.get(rtype.key, {})
            obj = table.get((namespace if rtype.namespaced else None, name))
            if obj is None:
                return None
            self.bumps += 1
            new = copy.deepcopy(obj)
            new["metadata"].setdefault("annotations", {})[BUMP_ANNOTATION] = str(self.bumps)
            new["metadata"]["resourceVersion"] = str(api.rv + 1)
            api.rv += 1
            table[(new["metadata"].get("namespace"), name)] = new
            api._record("MODIFIED", rtype, new, obj)  # pylint: disable=protected-access
            return new

    def _before_write_hook(self, req, _phase):
        ctx = {"verb": getattr(req, "verb", "patch"), "resource": req.rtype.plural, "group": req.rtype.group, "namespace": req.namespace,
               "name": req.name, "user": req.user, "subresource": req.subresource}
        if self.faults.take("bump", ctx, when="before-write"):
            self.bump(req.rtype, req.namespace, req.name)


def injected_error(fault):
    """The Status of an `error` fault: 500 InternalError, 503 ServiceUnavailable, 429 TooManyRequests, or any code."""
    code = int(fault.get("code", 500))
    message = fault.get("message")
    if code == 500:
        err = errors.internal_error(message or "injected fault (k8s_double)")
    elif code == 503:
        err = errors.unavailable(message or "the server is currently unable to handle the request")
    elif code == 429:
        err = errors.ApiError(429, "TooManyRequests", message or "the server has received too many requests and has asked us to try again later",
                              {})
    else:
        err = errors.ApiError(code, fault.get("reason", ""), message or f"injected fault {code} (k8s_double)", {})
    if fault.get("retryAfter"):  # urllib3 (python client) retries 413/429/503 by itself when Retry-After is present
        err.headers["Retry-After"] = str(fault["retryAfter"])
    return err


class Handler(BaseHTTPRequestHandler):  # pylint: disable=too-many-public-methods
    protocol_version = "HTTP/1.1"
    server_version = "k8s-double/TEST-DOUBLE"
    code = 0
    entry = None
    query = None

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
        return

    # ------------------------------------------------------------------------------------------ plumbing
    def _body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, code, body, headers=None, content_type="application/json"):
        data = body if isinstance(body, bytes) else (json.dumps(body) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Test-Double", BANNER)
        self.send_header("Audit-Id", str(uuid.uuid4()))
        self.send_header("Cache-Control", "no-cache, private")
        for key, value in (headers or {}).items():
            if isinstance(value, list):
                for item in value:
                    self.send_header(key, item)
            else:
                self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.code = code

    def _error(self, err):
        self._send(err.code, err.status(), err.headers)

    def do_GET(self):  # noqa: N802 pylint: disable=invalid-name
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

    def _dispatch(self):
        self.code = 0
        self.entry = {"method": self.command, "path": self.path}
        try:
            self._route()
        except errors.ApiError as err:
            self._error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # pylint: disable=broad-except
            self._error(errors.internal_error(f"{type(exc).__name__}: {exc}"))
        finally:
            self.entry["code"] = self.code
            if not self.entry.get("control") and not self.entry.pop("logged", False):
                self.server.log.add(self.entry)

    # ------------------------------------------------------------------------------------------ routing
    def _route(self):  # pylint: disable=too-many-return-statements,too-many-branches
        split = urlsplit(self.path)
        path = split.path.rstrip("/") or "/"
        query = parse_qs(split.query, keep_blank_values=True)
        self.query = query
        if path.startswith("/_double"):
            self.entry["control"] = True
            return self._control(path, query)
        if path in ("/healthz", "/livez", "/readyz"):
            return self._send(200, b"ok", content_type="text/plain; charset=utf-8")
        user, token = self.server.authn.authenticate(self.headers.get("Authorization"))
        if path == "/version":
            return self._send(200, VERSION_INFO)
        if user is None:
            raise errors.unauthorized()
        self.entry.update({"user": user.name, "token": token})
        fault = self.server.faults.take("delay", {"user": user.name, "token": token, "verb": "discovery"})
        if fault:
            time.sleep(float(fault.get("seconds", 0)))
        api = self.server.api
        if path == "/api":
            host = self.headers.get("Host", "127.0.0.1")
            return self._send(200, {"kind": "APIVersions", "versions": ["v1"],
                                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}]})
        if path == "/apis":
            return self._send(200, api.registry.group_list())
        if path == "/api/v1":
            return self._send(200, api.registry.resource_list("", "v1"))
        parts = [p for p in path.split("/") if p]
        if parts[0] == "apis" and len(parts) == 2:
            doc = api.registry.group_document(parts[1])
            if doc is None:
                raise errors.path_not_found()
            return self._send(200, doc)
        if parts[0] == "apis" and len(parts) == 3:
            doc = api.registry.resource_list(parts[1], parts[2])
            if doc is None:
                raise errors.path_not_found()
            return self._send(200, doc)
        if path == "/openapi/v3":
            return self._send(200, api.registry.openapi_v3_index())
        if parts[0] == "openapi" and len(parts) >= 3 and parts[1] == "v3":
            rest = parts[2:]
            doc = api.registry.openapi_v3("", rest[1]) if rest[0] == "api" and len(rest) == 2 else (
                api.registry.openapi_v3(rest[1], rest[2]) if rest[0] == "apis" and len(rest) == 3 else None)
            if doc is None:
                raise errors.path_not_found()
            return self._send(200, doc)
        if parts[0] in ("api", "apis"):
            return self._resource(parts, query, user, token)
        raise errors.path_not_found()

    def _resolve(self, parts):
        api = self.server.api
        if parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        else:
            if len(parts) < 4:
                raise errors.path_not_found()
            group, version, rest = parts[1], parts[2], parts[3:]
        namespace = None
        ns_type = api.registry.types[("", "namespaces")]
        if len(rest) >= 3 and rest[0] == "namespaces" and not (group == "" and len(rest) == 3 and rest[2] in ns_type.subresources["v1"]):
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise errors.path_not_found()
        rtype = api.registry.lookup(group, version, rest[0])
        if rtype is None:
            raise errors.path_not_found()
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else ""
        if rtype.namespaced and namespace is None and name is not None:
            raise errors.path_not_found()
        if not rtype.namespaced and namespace is not None:
            raise errors.path_not_found()
        if sub and sub not in rtype.subresources.get(version, ()):
            raise errors.path_not_found()
        return rtype, version, namespace, name, sub

    def _verb(self, name, query):
        method = self.command
        watch = (query.get("watch") or [""])[0] in ("true", "1")
        if method in ("GET", "HEAD"):
            return "watch" if watch else ("get" if name else "list")
        if method == "POST":
            return "create"
        if method == "PUT":
            return "update"
        if method == "PATCH":
            return "patch"
        if method == "DELETE":
            return "delete" if name else "deletecollection"
        return method.lower()

    def _resource(self, parts, query, user, token):  # pylint: disable=too-many-branches,too-many-statements,too-many-locals
        srv = self.server
        api = srv.api
        rtype, version, namespace, name, sub = self._resolve(parts)
        verb = self._verb(name, query)
        ctx = {"verb": verb, "resource": rtype.plural, "group": rtype.group, "namespace": namespace, "name": name, "user": user.name,
               "token": token, "subresource": sub}
        self.entry.update({k: v for k, v in ctx.items() if k != "token"})
        self.entry["version"] = version
        self.entry["contentType"] = self.headers.get("Content-Type")
        self.entry["logged"] = True
        srv.log.add(self.entry)  # logged now (a watch may last); the answer code is filled in when known
        body = self._body() if self.command in ("POST", "PUT", "PATCH", "DELETE") else b""
        check_name = None if verb == "create" else name
        if not allowed(user, verb, rtype.group, rtype.plural, sub, namespace, check_name) or srv.faults.take("forbid", ctx):
            raise errors.forbidden(user.name, verb, rtype.plural, rtype.group, check_name, namespace, sub)
        fault = srv.faults.take("delay", ctx)
        if fault:
            time.sleep(float(fault.get("seconds", 0)))
        fault = srv.faults.take("error", ctx)
        if fault:
            raise injected_error(fault)
        if verb in ("update", "patch", "delete") and srv.faults.take("conflict", ctx):
            raise errors.stale(rtype.plural, rtype.group, name)
        req = Request(rtype, version, namespace, name, sub, query, user.name)
        req.verb = verb
        if verb == "watch":
            return self._watch(req)
        dry = (query.get("dryRun") or [""])[0] == "All"
        if dry and verb in ("create", "update", "patch", "delete", "deletecollection"):
            code, result = self._perform_dry_run(api, req, verb, body)
        else:
            code, result = self._perform(api, req, verb, body)
        headers = {}
        if req.warnings:
            headers["Warning"] = ['299 - ' + errors.go_quote(w) for w in req.warnings]
        if verb in ("get", "list") and tables.wants_table(self.headers.get("Accept")):
            items = result.get("items", []) if verb == "list" else [result]
            if verb == "list" and rtype.builtin:  # lists of built-in kinds carry no per-item apiVersion/kind
                items = [dict(i, apiVersion=rtype.api_version(version), kind=rtype.kind) for i in items]
            result = tables.table(rtype, version, items, result.get("metadata", {}).get("resourceVersion") or api.rv,
                                  req.q("includeObject", "Metadata") or "Metadata")
        self._send(code, result, headers)
        if verb == "get" and srv.faults.take("bump", ctx, when="after-get"):
            srv.bump(rtype, namespace, name)
        return None

    def _perform_dry_run(self, api, req, verb, body):
        """dryRun=All: the whole request runs, then the store is put back (under the lock, so no watcher sees it)."""
        with api.lock:
            saved = (copy.deepcopy(api.objects), api.rv, len(api.events), api.on_write, api.first_event_rv)
            api.on_write = None
            try:
                code, result = self._perform(api, req, verb, body)
            finally:
                api.objects, api.rv = saved[0], saved[1]
                while len(api.events) > saved[2]:
                    api.events.pop()
                api.on_write, api.first_event_rv = saved[3], saved[4]
        if isinstance(result, dict) and result.get("metadata") and verb == "create":
            result["metadata"].pop("resourceVersion", None)
        return code, result

    def _perform(self, api, req, verb, body):  # pylint: disable=too-many-return-statements
        if verb == "get":
            return 200, api.get(req)
        if verb == "list":
            return 200, api.list(req)
        if verb == "create":
            if req.name:
                raise errors.method_not_supported(req.rtype.plural, req.rtype.group, "create")
            return 201, api.create(req, self._decode(body, req.rtype))
        if verb == "update":
            return 200, api.update(req, self._decode(body, req.rtype))
        if verb == "patch":
            result = api.patch(req, self.headers.get("Content-Type"), body)
            return (201 if req.created else 200), result
        if verb == "delete":
            return 200, api.delete(req, self._options(body, req))
        if verb == "deletecollection":
            return 200, api.delete_collection(req, self._options(body, req))
        raise errors.ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource", {})

    def _decode(self, body, rtype):
        ctype = (self.headers.get("Content-Type") or "application/json").split(";")[0].strip().lower()
        accepted = ["application/json", "application/yaml"] + (["application/vnd.kubernetes.protobuf"] if rtype.builtin else [])
        unknown = errors.unsupported_media_type(
            "the body of the request was in an unknown format - accepted media types include: " + ", ".join(accepted))
        if ctype not in accepted:
            raise unknown
        if ctype == "application/vnd.kubernetes.protobuf":
            try:
                obj = protobuf.decode(body)
            except (ValueError, IndexError, UnicodeDecodeError) as exc:
                raise errors.bad_request(f"error decoding protobuf body: {exc}") from exc
            if obj is None:  # a kind the double cannot decode (the real server could): say so instead of guessing
                raise errors.unsupported_media_type("k8s_double (TEST DOUBLE) decodes protobuf bodies only for Namespace, ConfigMap, "
                                                    "Secret, ServiceAccount; send application/json")
            return obj
        try:
            if ctype == "application/yaml":
                return yaml.safe_load(body)
            return json.loads(body or b"null")
        except (ValueError, yaml.YAMLError) as exc:
            raise errors.bad_request(f"error decoding body: {exc}") from exc

    def _options(self, body, req):
        options = {}
        if body.strip():
            try:
                options = json.loads(body)
            except ValueError as exc:
                raise errors.bad_request(f"error decoding DeleteOptions: {exc}") from exc
        for key in ("propagationPolicy", "gracePeriodSeconds"):
            if req.q(key):
                options[key] = req.q(key)
        return options

    def _client_gone(self):
        """A watching client sends nothing more: a readable socket means it closed the connection."""
        try:
            readable, _writable, _errored = select.select([self.connection], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def _watch(self, req):
        srv = self.server
        try:
            timeout = float(req.q("timeoutSeconds") or 1800)
        except ValueError:
            timeout = 1800.0
        srv.api.matcher(req)  # a bad selector answers 400 before the stream starts
        rv_param = req.q("resourceVersion")
        if rv_param not in ("", "0") and not rv_param.isdigit():
            raise errors.bad_request(f"invalid resource version: {rv_param}")
        events = srv.api.watch(req, time.monotonic() + timeout, lambda: srv.stopping.is_set() or self._client_gone())
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Test-Double", BANNER)
        self.send_header("Audit-Id", str(uuid.uuid4()))
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.code = 200
        self.close_connection = True

        def chunk(data):
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        try:
            as_table = tables.wants_table(self.headers.get("Accept"))
            headers = True
            for event in events:
                if as_table and event["type"] in ("ADDED", "MODIFIED", "DELETED"):  # a one-row Table; headers in the first only
                    obj = event["object"]
                    event = {"type": event["type"], "object": tables.table(
                        req.rtype, req.version, [obj], obj["metadata"].get("resourceVersion", ""),
                        req.q("includeObject", "Metadata") or "Metadata", headers)}
                    headers = False
                chunk((json.dumps(event) + "\n").encode())
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass

    # ------------------------------------------------------------------------------------------ test controls
    def _control(self, path, query):  # pylint: disable=too-many-return-statements,too-many-branches
        srv = self.server
        body = self._body()
        payload = json.loads(body) if body.strip() else {}
        sub = path[len("/_double"):].strip("/")
        if sub in ("", "info"):
            return self._send(200, {"testDouble": BANNER, "url": srv.public_url, "resourceVersion": srv.api.rv,
                                    "types": sorted(f"{t.plural}.{t.group}" if t.group else t.plural for t in srv.api.registry.types.values()),
                                    "skippedCelRules": sorted(SKIPPED_CEL_RULES)})
        if sub == "requests":
            if self.command == "DELETE":
                srv.log.reset()
                return self._send(200, {"reset": True})
            return self._send(200, srv.log.snapshot())
        if sub == "counters":
            return self._send(200, srv.log.snapshot()["counters"])
        if sub == "reset":
            srv.log.reset()
            srv.faults.clear()
            if (query.get("state") or [""])[0] == "true" or payload.get("state"):
                fresh = Api(controllers=srv.api.controllers)
                srv.api.load(fresh.snapshot())
            return self._send(200, {"reset": True})
        if sub == "faults":
            if self.command == "POST":
                try:
                    specs = payload if isinstance(payload, list) else [payload]
                    return self._send(201, [srv.faults.add(s) for s in specs])
                except ValueError as exc:
                    raise errors.bad_request(str(exc)) from exc
            if self.command == "DELETE":
                srv.faults.clear()
                return self._send(200, {"cleared": True})
            return self._send(200, srv.faults.list())
        if sub == "state":
            if self.command in ("POST", "PUT"):
                srv.api.load(payload)
                return self._send(200, {"loaded": len(payload.get("objects") or [])})
            return self._send(200, srv.api.snapshot())
        if sub == "save":
            target = payload.get("path") or srv.state_file
            if not target:
                raise errors.bad_request("no state file: start with --state FILE or POST {\"path\": ...}")
            with open(target, "w", encoding="utf-8") as handle:
                json.dump(srv.api.snapshot(), handle)
            return self._send(200, {"saved": target})
        if sub == "tokens" and self.command == "POST":
            srv.authn.add(payload["token"], payload.get("user") or payload["token"], payload.get("rules"), bool(payload.get("admin")))
            return self._send(201, {"added": payload.get("user") or payload["token"]})
        raise errors.path_not_found()
