"""The lab's stand-in for istiod: VirtualService -> Envoy routes (path-based RDS) -> status.

Polls the lab VirtualService through the official `kubernetes` client (every ~200 ms), and when its
`metadata.generation` changes:
  1. translates its HTTP routes into an Envoy RouteConfiguration (header/URI matches, weighted subsets,
     timeout, retries, mirror),
  2. writes it atomically into the directory Envoy watches,
  3. waits (bounded) until Envoy's admin /config_dump shows that version,
  4. writes the status the way istiod does when status is enabled (PILOT_ENABLE_STATUS):
       status:
         observedGeneration: "<generation>"        # int64 in protojson: a string, as istiod writes it
         conditions:
         - type: Reconciled
           status: "True"
           message: 1/1 proxies up to date.
           lastProbeTime / lastTransitionTime / observedGeneration
     through the /status subresource.
Every applied generation is appended to <run dir>/translator-events.jsonl (a timeline for demos).
"""
import argparse
import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
import urllib.request
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import envoy_config as ec  # noqa: E402

GROUP = "networking.istio.io"


class TranslationError(ValueError):
    pass


def _duration(value):
    """Istio durations ("5s", "0.5s", "100ms", "1m") -> Envoy's proto duration string in seconds."""
    if value is None:
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)\s*", str(value))
    if not match:
        raise TranslationError(f"cannot read duration {value!r} (use e.g. 5s or 250ms)")
    number, unit = float(match.group(1)), match.group(2)
    seconds = number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return f"{seconds:.3f}s"


def _string_match(spec):
    if not isinstance(spec, dict) or len(spec) != 1:
        raise TranslationError(f"a string match needs exactly one of exact/prefix/regex, got {spec!r}")
    kind, value = next(iter(spec.items()))
    if kind == "exact":
        return {"exact": value}
    if kind == "prefix":
        return {"prefix": value}
    if kind == "regex":
        return {"safe_regex": {"regex": value}}
    raise TranslationError(f"unsupported string match {kind!r}")


def _route_match(match):
    out = {}
    uri = (match or {}).get("uri")
    if uri:
        kind, value = next(iter(uri.items()))
        if kind == "exact":
            out["path"] = value
        elif kind == "prefix":
            out["prefix"] = value
        elif kind == "regex":
            out["safe_regex"] = {"regex": value}
        else:
            raise TranslationError(f"unsupported uri match {kind!r}")
        if (match or {}).get("ignoreUriCase"):
            out["case_sensitive"] = False
    else:
        out["prefix"] = "/"
    headers = []
    for name, spec in sorted(((match or {}).get("headers") or {}).items()):
        headers.append({"name": name.lower(), "string_match": _string_match(spec)})
    method = (match or {}).get("method")
    if method:
        headers.append({"name": ":method", "string_match": _string_match(method)})
    if headers:
        out["headers"] = headers
    return out


def _cluster_for(destination, namespace):
    if not destination or not destination.get("host"):
        raise TranslationError("every route destination needs a host")
    port = (destination.get("port") or {}).get("number", ec.PORT)
    return ec.cluster_name(destination.get("subset"), destination["host"], port, namespace)


def _route_action(http, namespace):
    destinations = http.get("route") or []
    if not destinations:
        raise TranslationError(f"http route {http.get('name', '')!r} has no route destinations "
                               "(redirect/direct_response are not supported by the lab)")
    action = {}
    if len(destinations) == 1:
        action["cluster"] = _cluster_for(destinations[0].get("destination"), namespace)
    else:
        weighted = []
        for dest in destinations:
            weight = int(dest.get("weight") or 0)
            if weight < 0:
                raise TranslationError("weights must not be negative")
            if weight == 0:
                continue  # istiod leaves zero-weight destinations out
            weighted.append({"name": _cluster_for(dest.get("destination"), namespace), "weight": weight})
        if not weighted:
            raise TranslationError(f"http route {http.get('name', '')!r}: all weights are 0")
        if len(weighted) == 1:
            action["cluster"] = weighted[0]["name"]
        else:
            action["weighted_clusters"] = {"clusters": weighted}
    # istiod disables Envoy's 15 s default route timeout unless the VirtualService sets one.
    action["timeout"] = _duration(http.get("timeout")) or "0s"
    retries = http.get("retries")
    if retries and int(retries.get("attempts") or 0) > 0:
        policy = {"num_retries": int(retries["attempts"]),
                  "retry_on": retries.get("retryOn") or "connect-failure,refused-stream,unavailable,cancelled"}
        if retries.get("perTryTimeout"):
            policy["per_try_timeout"] = _duration(retries["perTryTimeout"])
        action["retry_policy"] = policy
    mirrors = list(http.get("mirrors") or [])
    if http.get("mirror"):
        mirrors.insert(0, {"destination": http["mirror"], "percentage": http.get("mirrorPercentage")})
    policies = []
    for mirror in mirrors:
        policy = {"cluster": _cluster_for(mirror.get("destination"), namespace)}
        percent = (mirror.get("percentage") or {}).get("value")
        if percent is not None:
            policy["runtime_fraction"] = {"default_value": {"numerator": int(round(float(percent) * 10000)),
                                                            "denominator": "MILLION"}}
        policies.append(policy)
    if policies:
        action["request_mirror_policies"] = policies
    return action


def translate(virtual_service, generation=None):
    """A VirtualService (dict as the API returns it) -> Envoy RouteConfiguration (dict)."""
    meta = virtual_service.get("metadata") or {}
    namespace = meta.get("namespace") or ec.NAMESPACE
    generation = meta.get("generation") if generation is None else generation
    spec = virtual_service.get("spec") or {}
    routes = []
    for index, http in enumerate(spec.get("http") or []):
        action = _route_action(http, namespace)
        matches = http.get("match") or [None]
        for m_index, match in enumerate(matches):  # istiod: one Envoy route per match (they are ORed)
            route = {"match": _route_match(match), "route": action}
            name = http.get("name") or f"route-{index}"
            route["name"] = name if len(matches) == 1 else f"{name}.{m_index}"
            routes.append(route)
    if not routes:
        raise TranslationError("the VirtualService has no http routes")
    hosts = spec.get("hosts") or [ec.SERVICE]
    return {
        "@type": ec.T_ROUTES,
        "name": ec.ROUTE_CONFIG_NAME,
        "virtual_hosts": [{"name": f"{ec.fqdn(hosts[0], namespace)}:{ec.PORT}", "domains": ["*"], "routes": routes}],
        # Makes every generation a distinct config for Envoy and lets clients see which one served them.
        "response_headers_to_add": [{"header": {"key": "x-lab-route-generation", "value": str(generation)}}],
    }


def weights_of(virtual_service):
    """{route name: {subset: weight}} for the timeline."""
    out = {}
    for index, http in enumerate((virtual_service.get("spec") or {}).get("http") or []):
        dests = http.get("route") or []
        out[http.get("name") or f"route-{index}"] = {
            (d.get("destination") or {}).get("subset") or "": int(d.get("weight") or (100 if len(dests) == 1 else 0))
            for d in dests}
    return out


def _now():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def reconciled_status(generation, previous=None, as_string=True):
    """The status istiod writes once every proxy has acknowledged `generation`."""
    previous = previous or {}
    now = _now()
    old = next((c for c in previous.get("conditions") or [] if c.get("type") == "Reconciled"), {})
    transition = old.get("lastTransitionTime") if old.get("status") == "True" else None
    gen = str(generation) if as_string else int(generation)
    return {
        "observedGeneration": gen,
        "conditions": [{
            "type": "Reconciled",
            "status": "True",
            "message": "1/1 proxies up to date.",
            "lastProbeTime": now,
            "lastTransitionTime": transition or now,
            "observedGeneration": gen,
        }],
    }


class Translator:
    def __init__(self, kubeconfig, rds_path, envoy_admin_url, namespace=ec.NAMESPACE, name=ec.SERVICE,
                 api_version="v1", interval=0.2, events_path=None, status_as_string=True, log=None):
        from kubernetes import client, config  # imported here: pure translation needs no client

        self.api = client.CustomObjectsApi(config.new_client_from_config(config_file=kubeconfig))
        self.rds_path = rds_path
        self.envoy_admin_url = envoy_admin_url.rstrip("/")
        self.namespace, self.name, self.api_version = namespace, name, api_version
        self.interval = interval
        self.events_path = events_path
        self.status_as_string = status_as_string
        self.applied = None  # generation live in Envoy
        self.unacknowledged = None  # routes version Envoy did not load
        self.last_error = None
        self.log = log or (lambda msg: print(f"translator: {msg}", file=sys.stderr, flush=True))
        self._stop = threading.Event()

    def _get(self):
        return self.api.get_namespaced_custom_object(GROUP, self.api_version, self.namespace,
                                                     "virtualservices", self.name)

    def _envoy_version(self):
        url = f"{self.envoy_admin_url}/config_dump?resource=dynamic_route_configs"
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - 127.0.0.1 admin
            dump = json.load(resp)
        for cfg in dump.get("configs") or []:
            if (cfg.get("route_config") or {}).get("name") == ec.ROUTE_CONFIG_NAME:
                return cfg.get("version_info")
        return None

    def _wait_envoy(self, version, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self._envoy_version() == version:
                    return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def _event(self, **fields):
        if not self.events_path:
            return
        fields = dict(time=time.time(), **fields)
        with open(self.events_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(fields, sort_keys=True) + "\n")

    def step(self):
        """One poll; returns the generation live in Envoy (or None)."""
        vs = self._get()
        meta, status = vs.get("metadata") or {}, vs.get("status") or {}
        generation = int(meta.get("generation") or 0)
        if generation != self.applied:
            try:
                routes = translate(vs, generation)
            except TranslationError as exc:
                if self.last_error != (generation, str(exc)):
                    self.log(f"generation {generation} not applied: {exc}")
                    self._event(event="rejected", generation=generation, error=str(exc))
                    self.last_error = (generation, str(exc))
                return self.applied
            version = f"{generation}-{hashlib.sha256(json.dumps(routes, sort_keys=True).encode()).hexdigest()[:8]}"
            if self.unacknowledged == version:
                return self.applied  # Envoy did not take it; wait for the next generation (as istiod would)
            ec.write_xds(self.rds_path, version, [routes])
            if not self._wait_envoy(version):
                self.unacknowledged = version
                self.log(f"Envoy did not load routes version {version} (rejected? see its log); "
                         f"status stays at generation {self.applied}")
                self._event(event="not_acknowledged", generation=generation, version=version)
                return self.applied
            self.applied = generation
            self._event(event="applied", generation=generation, weights=weights_of(vs), version=version)
            self.log(f"generation {generation} live in Envoy: {weights_of(vs)}")
        if str(status.get("observedGeneration")) != str(self.applied) or not any(
                c.get("type") == "Reconciled" and c.get("status") == "True" for c in status.get("conditions") or []):
            body = {"status": reconciled_status(self.applied, status, self.status_as_string)}
            self.api.patch_namespaced_custom_object_status(GROUP, self.api_version, self.namespace,
                                                           "virtualservices", self.name, body)
            self._event(event="status", generation=self.applied)
        return self.applied

    def run(self, max_seconds=24 * 3600):
        deadline = time.monotonic() + max_seconds
        failures = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.step()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - the API may be restarting; keep polling, bounded by time
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    self.log(f"poll failed ({failures}x): {type(exc).__name__}: {exc}")
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--rds-file", required=True)
    parser.add_argument("--envoy-admin", required=True, help="e.g. http://127.0.0.1:15000")
    parser.add_argument("--namespace", default=ec.NAMESPACE)
    parser.add_argument("--name", default=ec.SERVICE)
    parser.add_argument("--api-version", default="v1")
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--events", help="JSON lines timeline of applied generations")
    parser.add_argument("--status-generation-int", action="store_true",
                        help="write observedGeneration as an integer (istiod writes a string)")
    parser.add_argument("--max-seconds", type=float, default=24 * 3600)
    args = parser.parse_args(argv)
    tr = Translator(args.kubeconfig, args.rds_file, args.envoy_admin, args.namespace, args.name, args.api_version,
                    max(0.05, min(args.interval, 5.0)), args.events, not args.status_generation_int)
    signal.signal(signal.SIGTERM, lambda *_: tr.stop())
    signal.signal(signal.SIGINT, lambda *_: tr.stop())
    tr.run(args.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
