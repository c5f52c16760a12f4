"""TEST DOUBLE (onprem.mesh k8s_double) command line: run the fake Kubernetes API until interrupted.

    python -m k8s_double --port 0 --crds PATH --kubeconfig-out PATH [--tokens FILE] [--state FILE] [--tls]
"""
import argparse
import signal
import sys
import threading

from . import istio_crds_path, start


def main(argv=None):
    parser = argparse.ArgumentParser(prog="k8s_double", description="TEST DOUBLE of a Kubernetes API server (onprem.mesh k8s_double)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--crds", default=None, help="CRD YAML file (default: Istio's crd-all.gen.yaml when found; 'none' for none)")
    parser.add_argument("--kubeconfig-out", default=None, help="where to write the kubeconfig (context k8s-double)")
    parser.add_argument("--tokens", default=None, help="YAML/JSON token file (see auth.py)")
    parser.add_argument("--state", default=None, help="JSON state file: loaded at start, rewritten after every write")
    parser.add_argument("--tls", action="store_true", help="serve HTTPS with a throw-away CA (path printed)")
    parser.add_argument("--no-controllers", action="store_true", help="do not mark Deployments rolled out")
    args = parser.parse_args(argv)
    crds = None if args.crds == "none" else (args.crds or istio_crds_path())
    handle = start(port=args.port, crds=crds, tokens=args.tokens, state=args.state, tls=args.tls, host=args.host,
                   kubeconfig=args.kubeconfig_out, controllers=not args.no_controllers)
    print(handle.url, flush=True)
    print(f"# TEST DOUBLE onprem.mesh k8s_double; kubeconfig: {handle.kubeconfig}" + (f"; CA: {handle.ca_file}" if handle.ca_file else ""),
          file=sys.stderr, flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_args: done.set())
    while not done.wait(1):
        pass
    handle.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
