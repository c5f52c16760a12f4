#!/usr/bin/env bash
# Set up everything the tests and the local lab need, offline but for PyPI and Debian's packages.
# Idempotent: a second run only checks. Used by `make setup`, which `make test` and `make demo` call.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

ANSIBLE_WHEEL_VERSION=12.3.0   # the `ansible` package whose bundled collections we depend on
PIP_BOOTSTRAP_VERSION=24.2     # the pip version ansible-test 2.19 bootstraps in its sanity venvs
VENV=${VENV:-$ROOT/.venv}
COLLECTIONS=$ROOT/collections/ansible_collections
DEPENDENCIES="kubernetes/core ansible/posix community/general"

# Debian packages: shellcheck for sanity, qemu/debootstrap for the Molecule guests, prometheus and
# rsync for the mesh lab and the sanity tree. Only installed when missing.
APT_PACKAGES="shellcheck qemu-system-x86 qemu-utils debootstrap prometheus rsync make openssh-client"
missing=()
for p in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Python virtual environment with the pinned tool chain.
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha256"
want=$(cat requirements/test.txt requirements/runtime.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing pinned Python packages into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements/test.txt -r requirements/runtime.txt
  echo "$want" > "$stamp"
fi

# Dependency collections from the `ansible` wheel (no Galaxy server is reachable here).
# A user with Galaxy access runs instead: ansible-galaxy collection install -r collections/requirements.yml
mkdir -p "$COLLECTIONS"
need_wheel=0
for c in $DEPENDENCIES; do [ -f "$COLLECTIONS/$c/MANIFEST.json" ] || need_wheel=1; done
if [ "$need_wheel" = 1 ]; then
  echo "bootstrap: extracting $DEPENDENCIES from ansible==$ANSIBLE_WHEEL_VERSION"
  tmp=$(mktemp -d)
  "$VENV/bin/python" -m pip download -q --no-deps -d "$tmp" "ansible==$ANSIBLE_WHEEL_VERSION"
  # shellcheck disable=SC2086  # DEPENDENCIES is a list of words
  "$VENV/bin/python" - "$tmp"/ansible-*.whl "$COLLECTIONS" $DEPENDENCIES <<'PY'
import os, shutil, sys, zipfile
wheel, dest, names = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(wheel) as z:
    for name in names:
        prefix = f"ansible_collections/{name}/"
        target = os.path.join(dest, name)
        shutil.rmtree(target, ignore_errors=True)
        for member in z.namelist():
            if member.startswith(prefix) and not member.endswith("/"):
                out = os.path.join(target, member[len(prefix):])
                os.makedirs(os.path.dirname(out), exist_ok=True)
                with z.open(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
PY
  rm -rf "$tmp"
fi
# This collection itself, for ansible-playbook runs from the work tree (ansible.cfg points here).
mkdir -p "$COLLECTIONS/onprem"
[ -L "$COLLECTIONS/onprem/mesh" ] || ln -sfn ../../.. "$COLLECTIONS/onprem/mesh"

# The real control plane of the lab and the tests, built once from its Go modules into a versioned cache
# (~/.cache/onprem-mesh/bin/<component>-<version>-<hash>/): kube-apiserver, controller-manager, scheduler,
# kubectl (Kubernetes), etcd, KWOK, istiod and istioctl (Istio), and what a node installs from the artifact
# mirror: kubeadm, kubelet, crictl and the CNI plugins. Cold: about 20 minutes on 2 cores.
command -v go >/dev/null || { echo "bootstrap: Go (>= 1.26) is needed to build the control plane: install it and rerun" >&2; exit 1; }
python3 tools/controlplane/build.py

# ansible-test sanity bootstraps pip in its venvs from a script it downloads from a host that is
# unreachable here. Provide that script, built on the pip wheel from PyPI.
cache="$HOME/.ansible/test/cache"
script="$cache/get_pip_${PIP_BOOTSTRAP_VERSION//./_}.py"
if [ ! -f "$script" ] || ! ls "$cache"/pip-"$PIP_BOOTSTRAP_VERSION"-*.whl >/dev/null 2>&1; then
  mkdir -p "$cache"
  "$VENV/bin/python" -m pip download -q --no-deps -d "$cache" "pip==$PIP_BOOTSTRAP_VERSION"
  sed "s/@PIP_VERSION@/$PIP_BOOTSTRAP_VERSION/" tools/get_pip_offline.py > "$script"
fi
echo "bootstrap: ready (venv $VENV, collections $ROOT/collections)"
