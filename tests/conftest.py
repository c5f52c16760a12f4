"""Shared pytest set-up for every layer: import path for the collection and a per-layer time table."""
import os
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIONS = os.path.join(ROOT, "collections")

# Plain pytest imports the collection as ansible_collections.onprem.mesh through the link that
# tools/bootstrap.sh makes in collections/ansible_collections/onprem/mesh.
if COLLECTIONS not in sys.path and os.path.isdir(os.path.join(COLLECTIONS, "ansible_collections")):
    sys.path.insert(0, COLLECTIONS)

_LAYER_TIMES = defaultdict(float)
_LAYER_COUNTS = defaultdict(int)


_LAYER_OF = {}


def pytest_collection_modifyitems(items):
    for item in items:
        marker = item.get_closest_marker("layer")
        parts = item.nodeid.split("::")[0].split("/")
        if marker:
            _LAYER_OF[item.nodeid] = "layer: " + marker.args[0]
        elif len(parts) > 2 and parts[1] == "integration":
            _LAYER_OF[item.nodeid] = "integration: " + parts[2].replace("test_", "").replace(".py", "")
        else:
            _LAYER_OF[item.nodeid] = parts[1] if len(parts) > 1 else parts[0]


def _layer_of(nodeid):
    return _LAYER_OF.get(nodeid, nodeid.split("/")[1] if "/" in nodeid else nodeid)


def pytest_runtest_logreport(report):
    _LAYER_TIMES[_layer_of(report.nodeid)] += report.duration
    if report.when == "call":
        _LAYER_COUNTS[_layer_of(report.nodeid)] += 1


def pytest_terminal_summary(terminalreporter):
    if not _LAYER_TIMES:
        return
    terminalreporter.section("time per layer")
    for layer, seconds in sorted(_LAYER_TIMES.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{layer:<32} {seconds:8.1f} s  ({_LAYER_COUNTS[layer]} tests)")
    terminalreporter.write_line(f"{'total':<32} {sum(_LAYER_TIMES.values()):8.1f} s")
