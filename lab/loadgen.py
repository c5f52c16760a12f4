"""Bounded HTTP load generator for the lab (127.0.0.1, or the lab's pod network, which is local while the lab runs).

Stops by itself after `total` requests or `seconds`, whichever comes first. Keep-alive connections
(http.client), one per worker thread; optional fixed request rate (open-loop schedule shared by the
workers). Counts responses per version (the upstream's ``x-lab-version`` header; "none" when Envoy
answered itself, e.g. 503 with v2 crashed) and per status code, and keeps latencies for percentiles.

  python lab/loadgen.py http://127.0.0.1:PORT/ --requests 10000 --seconds 30 [--rps 500] [--json]
"""
import argparse
import http.client
import ipaddress
import itertools
import json
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

VERSION_HEADER = "x-lab-version"
LAB_POD_NETWORK = "10.213.0.0/17"  # lab/controlplane.py POD_NETWORK: routed to lo while a lab runs


def _local(host):
    if host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return addr.is_loopback or addr in ipaddress.ip_network(LAB_POD_NETWORK)


class LoadResult:
    def __init__(self):
        self.by_version = Counter()
        self.by_status = Counter()
        self.by_version_status = Counter()
        self.errors = Counter()  # client-side failures (connection refused, timeouts)
        self.latencies_ms = []
        self.elapsed = 0.0
        self.sent = 0

    @property
    def completed(self):
        return sum(self.by_status.values())

    def share(self, version):
        total = self.completed
        return self.by_version[version] / total if total else 0.0

    def success_rate(self, version=None):
        """Fraction of non-5xx answers (of one version, or of all)."""
        if version is None:
            ok = sum(n for code, n in self.by_status.items() if code < 500)
            total = self.completed
        else:
            ok = sum(n for (ver, code), n in self.by_version_status.items() if ver == version and code < 500)
            total = sum(n for (ver, dummy), n in self.by_version_status.items() if ver == version)
        return ok / total if total else None

    def percentile(self, p):
        if not self.latencies_ms:
            return None
        data = sorted(self.latencies_ms)
        k = min(len(data) - 1, max(0, int(round(p / 100.0 * len(data) + 0.5)) - 1))
        return data[k]

    def as_dict(self):
        return {
            "sent": self.sent, "completed": self.completed, "elapsed_s": round(self.elapsed, 3),
            "rps": round(self.completed / self.elapsed, 1) if self.elapsed else None,
            "by_version": dict(self.by_version), "by_status": {str(k): v for k, v in self.by_status.items()},
            "by_version_status": {f"{v}/{c}": n for (v, c), n in sorted(self.by_version_status.items())},
            "errors": dict(self.errors),
            "latency_ms": {f"p{p}": (round(self.percentile(p), 3) if self.latencies_ms else None)
                           for p in (50, 90, 99)},
        }


def run_load(url, total=10000, seconds=60.0, rps=None, concurrency=8, headers=None, timeout=10.0,
             keep_latencies=True, path=None):
    """Send up to `total` GET requests within `seconds`; return a LoadResult.

    rps: fixed total request rate (None = as fast as the workers go).
    """
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or 80
    if not _local(host):
        raise ValueError(f"the lab load generator only talks to 127.0.0.1 or the lab's pod network "
                         f"({LAB_POD_NETWORK}), not {host!r}")
    path = path or (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    total = max(0, int(total))
    concurrency = max(1, min(int(concurrency), 256, total or 1))
    headers = dict(headers or {})
    ticket = itertools.count()  # thread-safe in CPython: each next() is atomic
    start = time.monotonic()
    deadline = start + float(seconds)
    lock = threading.Lock()
    result = LoadResult()

    def worker():
        local_version, local_status, local_vs, local_err = Counter(), Counter(), Counter(), Counter()
        lat = []
        sent = 0
        conn = None
        while True:
            i = next(ticket)
            if i >= total:
                break
            if rps:
                due = start + i / float(rps)
                wait = due - time.monotonic()
                if wait > 0:
                    if due > deadline:
                        break
                    time.sleep(wait)
            now = time.monotonic()
            if now >= deadline:
                break
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
            t0 = time.perf_counter()
            sent += 1
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                resp.read()
                version = resp.getheader(VERSION_HEADER) or "none"
                code = resp.status
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                local_err[type(exc).__name__] += 1
                if conn is not None:
                    conn.close()
                conn = None
                continue
            if keep_latencies:
                lat.append((time.perf_counter() - t0) * 1000.0)
            local_version[version] += 1
            local_status[code] += 1
            local_vs[(version, code)] += 1
        if conn is not None:
            conn.close()
        with lock:
            result.by_version.update(local_version)
            result.by_status.update(local_status)
            result.by_version_status.update(local_vs)
            result.errors.update(local_err)
            result.latencies_ms.extend(lat)
            result.sent += sent

    threads = [threading.Thread(target=worker, name=f"load-{n}", daemon=True) for n in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + timeout + 1.0)
    result.elapsed = time.monotonic() - start
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rps", type=float, default=None)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--header", action="append", default=[], help="name:value, repeatable")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    headers = dict(h.split(":", 1) for h in args.header)
    res = run_load(args.url, args.requests, args.seconds, args.rps, args.concurrency, headers)
    print(json.dumps(res.as_dict(), indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
