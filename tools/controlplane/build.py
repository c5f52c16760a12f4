"""Build the real control plane from its Go modules, pinned, once, into a versioned cache.

    python3 tools/controlplane/build.py            # every component not built yet
    python3 tools/controlplane/build.py istio      # one component
    python3 tools/controlplane/build.py --list     # where each one is (or would be)

Called by `make setup`. Each component is a wrapper module beside this script (go.mod and go.sum are
committed, so the module proxy serves exactly the pinned versions and sum.golang.org checks them).
A finished component is skipped; a failed or interrupted build leaves nothing in the cache.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import components as c  # noqa: E402  pylint: disable=wrong-import-position

ORDER = ["etcd", "kwok", "kubernetes", "istio", "kubernetes-node", "cri-tools", "cni-plugins", "pause",
         "kube-proxy", "coredns", "istio-proxy"]


def log(msg):
    print(f"controlplane: {msg}", flush=True)


def go_env():
    env = dict(os.environ)
    env.update({"CGO_ENABLED": "0", "GOFLAGS": "-mod=readonly -buildvcs=false", "GOTOOLCHAIN": "local"})
    return env


def copy_module_files(name, target):
    """Files the lab and the tests read from a component's module (kwok's stages, Istio's samples)."""
    for dest, (module, version, subdir) in c.COMPONENTS[name].get("module_files", {}).items():
        if (target / dest).exists():
            continue
        info = json.loads(subprocess.run(
            ["go", "mod", "download", "-json", f"{module}@{version}"], cwd=c.module_dir(name), env=go_env(),
            check=True, capture_output=True, text=True).stdout)
        shutil.copytree(Path(info["Dir"]) / subdir, target / (dest + ".tmp"))
        for path in (target / (dest + ".tmp")).rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        (target / (dest + ".tmp")).rename(target / dest)


def build(name):
    spec = c.COMPONENTS[name]
    final = c.component_dir(name)
    if c.is_built(name):
        copy_module_files(name, final)
        log(f"{name} {spec['version']}: built ({final})")
        return 0.0
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.monotonic()
    log(f"{name} {spec['version']}: building {', '.join(spec['binaries'])} (cold on 2 cores: minutes)")
    env = go_env()
    moddir = c.module_dir(name)
    subprocess.run(["go", "mod", "download"], cwd=moddir, env=env, check=True)
    pkgs = list(spec["binaries"].values())
    out = str(tmp / next(iter(spec["binaries"]))) if len(pkgs) == 1 else str(tmp) + "/"
    cmd = ["go", "build", "-trimpath", "-o", out,
           "-ldflags", " ".join(["-s", "-w"] + spec["ldflags"])]
    if spec["tags"]:
        cmd += ["-tags", ",".join(spec["tags"])]
    subprocess.run(cmd + pkgs, cwd=moddir, env=env, check=True)
    for binary in spec["binaries"]:
        if not (tmp / binary).is_file():
            raise SystemExit(f"controlplane: {name}: go build did not produce {binary}")
    copy_module_files(name, tmp)
    took = time.monotonic() - start
    (tmp / "build.json").write_text(json.dumps(
        {"component": name, "version": spec["version"], "seconds": round(took, 1),
         "go": subprocess.run(["go", "version"], env=env, capture_output=True, text=True, check=True).stdout.strip()},
        indent=1) + "\n")
    (tmp / ".complete").write_text("")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    log(f"{name} {spec['version']}: built in {took:.0f} s -> {final}")
    return took


def main(argv):
    if "--list" in argv:
        for name in ORDER:
            state = "built" if c.is_built(name) else "missing"
            print(f"{name:<15} {c.COMPONENTS[name]['version']:<22} {state:<8} {c.component_dir(name)}")
        return 0
    # with no names, what `make setup` needs: the components marked on_demand are built only when named
    names = [a for a in argv if not a.startswith("-")] or [n for n in ORDER if not c.COMPONENTS[n].get("on_demand")]
    unknown = sorted(set(names) - set(ORDER))
    if unknown:
        raise SystemExit(f"controlplane: unknown component(s) {unknown}; choose from {ORDER}")
    if shutil.which("go") is None:
        raise SystemExit("controlplane: `go` is not on PATH (Go >= 1.26 is needed to build the control plane)")
    total = 0.0
    for name in names:
        total += build(name)
    if total:
        log(f"Go build time: {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
