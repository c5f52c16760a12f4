"""labctl: run the local mesh lab (real control plane, Istio installed by the istio role, istiod, Envoy, upstreams
v1/v2, Prometheus; see lab/meshlab.py).

  python lab/labctl.py up [--foreground]        start everything (in the background unless --foreground)
  python lab/labctl.py status                   what runs, URLs, VirtualService weights and generation
  python lab/labctl.py env                      `export` lines for ansible-playbook (K8S_AUTH_KUBECONFIG, ...)
  python lab/labctl.py weight 25                set the canary (v2) weight of the primary route
  python lab/labctl.py fault v2 --error-rate 0.2 | --latency-ms 300 | --crash | --clear
  python lab/labctl.py load --rps 200 --seconds 30 [--requests N] [--header end-user:jason]
  python lab/labctl.py down                     stop everything `up` started

Everything listens on 127.0.0.1 or on the lab's pod IPs (10.213.0.0/24, local to this machine while the lab runs;
making them local needs root). State (URLs, kubeconfig path, Prometheus URL, PIDs) is in
<run dir>/state.json; the run dir is .cache/lab/labctl unless --run-dir or ONPREM_MESH_LAB_RUN_DIR says.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import envoy_config  # noqa: E402
import meshlab  # noqa: E402
import procs  # noqa: E402
from loadgen import run_load  # noqa: E402

DEFAULT_RUN_DIR = os.environ.get("ONPREM_MESH_LAB_RUN_DIR") or os.path.join(meshlab.DEFAULT_RUN_DIR, "labctl")
MAX_LIFETIME = 12 * 3600  # a forgotten lab stops by itself


def _supervisor_pid(run_dir):
    path = os.path.join(run_dir, "supervisor.pid")
    try:
        with open(path, encoding="utf-8") as fh:
            pid = int(fh.read().strip())
    except (OSError, ValueError):
        return None
    cmd = procs.cmdline(pid)
    if procs.pid_alive(pid) and "labctl.py" in cmd and "_serve" in cmd:
        return pid
    return None


def _state(run_dir):
    try:
        return meshlab.MeshLab.read_state(run_dir)
    except FileNotFoundError:
        sys.exit(f"labctl: no lab is running in {run_dir} (start one with: python lab/labctl.py up)")


def serve(run_dir, max_seconds=MAX_LIFETIME, announce=True):
    """Run the lab in this process until SIGTERM/SIGINT (or max_seconds)."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "supervisor.pid"), "w", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()}\n")
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: done.set())
    try:
        with meshlab.MeshLab(run_dir=run_dir) as lab:
            if announce:
                _print_state(meshlab.MeshLab.read_state(run_dir))
                print("lab is up; Ctrl-C (or `labctl down`) stops it", flush=True)
            done.wait(max_seconds)
    finally:
        try:
            os.unlink(os.path.join(run_dir, "supervisor.pid"))
        except OSError:
            pass
    return 0


def cmd_up(args):
    run_dir = args.run_dir
    pid = _supervisor_pid(run_dir)
    if pid:
        print(f"labctl: the lab is already up (supervisor PID {pid}); `labctl down` first to restart it")
        _print_state(_state(run_dir))
        return 0
    if args.foreground:
        return serve(run_dir)
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    state_file = os.path.join(run_dir, "state.json")
    if os.path.exists(state_file):
        os.unlink(state_file)
    log_path = os.path.join(run_dir, "logs", "labctl.log")
    with open(log_path, "ab") as log:
        child = subprocess.Popen(  # noqa: S603
            [sys.executable, os.path.abspath(__file__), "--run-dir", run_dir, "_serve"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + args.timeout
    try:
        while time.monotonic() < deadline:
            if os.path.exists(state_file):
                _print_state(_state(run_dir))
                return 0
            if child.poll() is not None:
                break
            time.sleep(0.2)
    except KeyboardInterrupt:  # Ctrl-C while starting: stop what was started
        print("labctl: interrupted; stopping the lab", file=sys.stderr)
        args.timeout = 0
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
    procs.kill_stale(run_dir)
    with open(log_path, encoding="utf-8", errors="replace") as fh:
        tail = fh.read()[-3000:]
    print(f"labctl: the lab did not come up (log {log_path}):\n{tail}", file=sys.stderr)
    return 1


def cmd_down(args):
    run_dir = args.run_dir
    pid = _supervisor_pid(run_dir)
    if pid:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while procs.pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if procs.pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    left = procs.kill_stale(run_dir)  # children of a supervisor that was killed hard
    for name in ("state.json", "supervisor.pid"):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            os.unlink(path)
    print("lab is down" + (f" (also stopped leftovers: {left})" if left else "") if pid or left else "no lab was running")
    return 0


def _vs_summary(state):
    from kubernetes import client, config

    api = client.CustomObjectsApi(config.new_client_from_config(config_file=state["kubeconfig"]))
    vs = api.get_namespaced_custom_object("networking.istio.io", "v1", state["namespace"], "virtualservices",
                                          state["virtual_service"])
    weights = {}
    for route in vs["spec"]["http"]:
        if route.get("name") == "primary":
            weights = {d["destination"].get("subset"): d.get("weight", 0) for d in route["route"]}
    envoy = meshlab._http_json(f"{state['envoy_admin_url']}/config_dump?resource=dynamic_route_configs", timeout=10)
    return {"generation": vs["metadata"].get("generation"), "weights": weights,
            "envoy_weights": envoy_config.route_weights(envoy)}


def _print_state(state):
    print(f"run dir:      {state['run_dir']}")
    print(f"service URL:  {state['url']}   (Envoy, send Host: {state['host_header']}; admin {state['envoy_admin_url']})")
    print(f"Kubernetes:   {state['kube_url']}   kubeconfig {state['kubeconfig']}")
    print(f"istiod:       {state['istiod']}")
    print(f"Prometheus:   {state['prometheus_url']}")
    for version, up in sorted(state["upstreams"].items()):
        print(f"upstream {version}:  {', '.join(up.get('addresses') or [])} port {up['port']}  "
              f"(faults: http://127.0.0.1:{up['admin_port']}/admin/fault)")


def cmd_status(args):
    state = _state(args.run_dir)
    _print_state(state)
    alive = {name: procs.pid_alive(pid) for name, pid in state["children"].items()}
    alive["supervisor"] = bool(_supervisor_pid(args.run_dir))
    print("processes:    " + ", ".join(f"{n} {'up' if ok else 'DOWN'}" for n, ok in sorted(alive.items())))
    try:
        print(f"VirtualService {state['namespace']}/{state['virtual_service']}: {json.dumps(_vs_summary(state))}")
    except Exception as exc:  # noqa: BLE001
        print(f"VirtualService: unreadable ({exc})")
    for version, up in sorted(state["upstreams"].items()):
        try:
            faults = meshlab._http_json(f"http://127.0.0.1:{up['admin_port']}/admin/fault")
            print(f"faults {version}: {json.dumps(faults)}")
        except OSError as exc:
            print(f"faults {version}: unreachable ({exc})")
    return 0 if all(alive.values()) else 1


def cmd_env(args):
    state = _state(args.run_dir)
    env = {"K8S_AUTH_KUBECONFIG": state["kubeconfig"], "KUBECONFIG": state["kubeconfig"],
           "ONPREM_MESH_PROMETHEUS_URL": state["prometheus_url"], "ONPREM_MESH_LAB_URL": state["url"],
           "ONPREM_MESH_LAB_RUN_DIR": state["run_dir"]}
    for key, value in env.items():
        print(f"export {key}={value}")
    return 0


def cmd_weight(args):
    state = _state(args.run_dir)
    lab = meshlab.MeshLab.attach(state)
    generation = lab.set_canary_weight(args.weight)
    started = time.monotonic()
    served = lab.wait_programmed(timeout=30)
    print(f"v2 weight {args.weight}: generation {generation}, Envoy serves {json.dumps(served)} "
          f"({time.monotonic() - started:.2f} s after the patch)")
    return 0


def cmd_fault(args):
    state = _state(args.run_dir)
    doc = {}
    if args.clear:
        doc["clear"] = True
    if args.error_rate is not None:
        doc["error_rate"] = args.error_rate
    if args.latency_ms is not None:
        doc["latency_ms"] = args.latency_ms
    if args.crash:
        doc["crash"] = True
    if not doc:
        sys.exit("labctl fault: say what: --error-rate F, --latency-ms N, --crash or --clear")
    print(json.dumps(meshlab.set_fault(state["upstreams"], args.version, doc)))
    return 0


def cmd_load(args):
    state = _state(args.run_dir)
    headers = dict(h.split(":", 1) for h in args.header)
    requests = args.requests if args.requests is not None else int(args.rps * args.seconds)
    headers = dict({"Host": state["host_header"]}, **headers)
    res = run_load(state["url"], requests, args.seconds, args.rps, args.concurrency, headers)
    print(json.dumps(res.as_dict(), indent=1))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=DEFAULT_RUN_DIR)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the lab")
    up.add_argument("--foreground", action="store_true", help="stay in the foreground until Ctrl-C")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the lab to come up")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the lab").set_defaults(func=cmd_down)
    sub.add_parser("status", help="show the running lab").set_defaults(func=cmd_status)
    sub.add_parser("env", help="print export lines").set_defaults(func=cmd_env)
    weight = sub.add_parser("weight", help="set the v2 weight of the primary route")
    weight.add_argument("weight", type=int)
    weight.set_defaults(func=cmd_weight)
    fault = sub.add_parser("fault", help="switch faults of an upstream")
    fault.add_argument("version", choices=["v1", "v2"])
    group = fault.add_argument_group("faults (combine freely)")
    group.add_argument("--error-rate", type=float, help="fraction of requests answered 503, 0..1")
    group.add_argument("--latency-ms", type=float, help="added latency per request")
    group.add_argument("--crash", action="store_true", help="stop serving (connections refused)")
    group.add_argument("--clear", action="store_true", help="all faults off (applied first)")
    fault.set_defaults(func=cmd_fault)
    load = sub.add_parser("load", help="send bounded load through Envoy")
    load.add_argument("--rps", type=float, default=100.0)
    load.add_argument("--seconds", type=float, default=10.0)
    load.add_argument("--requests", type=int, help="default: rps x seconds")
    load.add_argument("--concurrency", type=int, default=8)
    load.add_argument("--header", action="append", default=[], help="name:value")
    load.set_defaults(func=cmd_load)
    serve_p = sub.add_parser("_serve", help=argparse.SUPPRESS)
    serve_p.set_defaults(func=lambda a: serve(a.run_dir, announce=False))
    args = parser.parse_args(argv)
    args.run_dir = os.path.abspath(args.run_dir)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
