# onprem.mesh developer entry points. Every target sets up what it needs first (tools/bootstrap.sh).
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
export PATH := $(VENV)/bin:$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg

.PHONY: setup test demo units integration static molecule molecule-cluster molecule-cluster-istio sanity lint mutation clean

setup:
	@bash tools/bootstrap.sh

## The whole test suite: every layer in one pytest session (ends with pytest's summary line), in two lanes
## (tests/conftest.py): the integration suites on the real control plane, and the tools beside them.
test: setup
	$(PY) -m pytest -n 2 --dist loadgroup tests $(PYTEST_ARGS)

## The main job on the built-in local lab (issue: local mesh lab).
demo: setup
	$(PY) lab/demo.py

units: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: setup
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

static: setup
	$(PY) -m pytest tests/layers/test_static.py $(PYTEST_ARGS)

sanity: setup
	$(PY) -m pytest tests/layers/test_static.py -k sanity $(PYTEST_ARGS)

lint: setup
	$(PY) -m pytest tests/layers/test_static.py -k lint $(PYTEST_ARGS)

molecule: setup
	$(PY) -m pytest tests/layers/test_molecule.py $(PYTEST_ARGS)

## The kubeadm cluster on two QEMU guests from the air-gapped mirror (extensions/molecule/cluster): about an hour under
## TCG, so not part of `make test`. Builds kube-proxy and CoreDNS first (they are not in make setup).
molecule-cluster: setup
	$(PY) tools/controlplane/build.py kube-proxy coredns
	ONPREM_MESH_MOLECULE_CLUSTER=1 $(PY) -m pytest -s tests/layers/test_molecule.py $(PYTEST_ARGS)

## The same with Istio installed by the istio role and a namespace meshed by mesh_namespace (converge_istio.yml).
molecule-cluster-istio:
	ONPREM_MESH_CLUSTER_PLAYBOOK=converge_istio.yml $(MAKE) molecule-cluster

## Mutation testing of the canary engine against tests/unit (tools/mutation/run.py): the score per file and the
## surviving mutants. Not part of `make test`: about half an hour on 2 cores, at the lowest CPU priority.
## MUTATION_ARGS: e.g. `rollout.py`, or `--survivors-only` to retest only the last run's survivors.
MUTATION_STAMP := $(VENV)/.mutation-requirements.sha256
mutation: setup
	@want=$$(sha256sum requirements/mutation.txt | cut -d' ' -f1); \
	  if [ "$$(cat $(MUTATION_STAMP) 2>/dev/null)" != "$$want" ]; then \
	    $(PY) -m pip install -q -r requirements/mutation.txt && echo "$$want" > $(MUTATION_STAMP); fi
	nice -n 19 $(PY) tools/mutation/run.py $(MUTATION_ARGS)

clean:
	rm -rf .build tests/output .pytest_cache
