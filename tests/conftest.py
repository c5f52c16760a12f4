"""Shared pytest set-up for every layer: import path for the collection and a per-layer time table."""
import os
import sys
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIONS = os.path.join(ROOT, "collections")

# Plain pytest imports the collection as ansible_collections.onprem.mesh through the link that
# tools/bootstrap.sh makes in collections/ansible_collections/onprem/mesh.
if COLLECTIONS not in sys.path and os.path.isdir(os.path.join(COLLECTIONS, "ansible_collections")):
    sys.path.insert(0, COLLECTIONS)

_LAYER_TIMES = defaultdict(float)
_LAYER_COUNTS = defaultdict(int)


_LAYER_OF = {}


def _layer_name(item):
    marker = item.get_closest_marker("layer")
    parts = item.nodeid.split("::")[0].split("/")
    if marker:
        return "layer: " + marker.args[0]
    if len(parts) > 2 and parts[1] == "integration":
        return "integration: " + parts[2].replace("test_", "").replace(".py", "")
    return parts[1] if len(parts) > 1 else parts[0]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Each test's layer for the time table; and, for `pytest -n 2 --dist loadgroup` (make test), two lanes:
    every integration suite on one worker (they share the session's control plane, which starts once per
    worker), the tools (unit tests, ansible-test, lint, Molecule's QEMU guests) on the other. The integration
    suites spend much of their time waiting (rollout steps, istiod, Prometheus scrapes), which the CPU-bound
    tools fill. tryfirst: xdist's worker reads the xdist_group markers in its own modifyitems hook, which
    otherwise runs before this one and leaves every test ungrouped (two Molecule scenarios then ran at once)."""
    for item in items:
        layer = _layer_name(item)
        _LAYER_OF[item.nodeid] = layer
        item.user_properties.append(("layer", layer))
        item.add_marker(pytest.mark.xdist_group("cluster" if layer.startswith("integration") else "tools"))


def pytest_collection_finish(session):
    """Refuse to run two lanes that are not: if xdist did not tag a test with its group (pytest-xdist
    reads a private pytest attribute for it), two Molecule scenarios or two session clusters would run
    at once."""
    if getattr(session.config.option, "loadgroup", False):
        ungrouped = [item.nodeid for item in session.items if "@" not in item.nodeid.rsplit("]", 1)[-1]]
        if ungrouped:
            raise pytest.UsageError(
                f"--dist loadgroup left {len(ungrouped)} tests without their lane (first: {ungrouped[0]}); "
                "pytest and pytest-xdist must be the versions in requirements/test.txt")


def _layer_of(report):
    for key, value in getattr(report, "user_properties", ()):
        if key == "layer":
            return value
    nodeid = report.nodeid
    return _LAYER_OF.get(nodeid, nodeid.split("/")[1] if "/" in nodeid else nodeid)


def pytest_runtest_logreport(report):
    _LAYER_TIMES[_layer_of(report)] += report.duration
    if report.when == "call":
        _LAYER_COUNTS[_layer_of(report)] += 1


def pytest_terminal_summary(terminalreporter):
    if not _LAYER_TIMES:
        return
    terminalreporter.section("time per layer")
    for layer, seconds in sorted(_LAYER_TIMES.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{layer:<32} {seconds:8.1f} s  ({_LAYER_COUNTS[layer]} tests)")
    terminalreporter.write_line(f"{'total (both lanes added up)':<32} {sum(_LAYER_TIMES.values()):8.1f} s")
