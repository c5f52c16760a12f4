"""Integration suites import their harnesses from tests/support."""
import os
import sys

SUPPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support")
if SUPPORT not in sys.path:
    sys.path.insert(0, SUPPORT)

# The local mesh lab (lab/meshlab.py) for suites that need a running mesh.
LAB = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "lab")
if LAB not in sys.path:
    sys.path.insert(0, LAB)

# The real control plane (lab/cluster.py): `cluster` (one per session) and `ns` (a fresh namespace per test).
from cluster_fixtures import cluster, ns  # noqa: E402,F401 pylint: disable=wrong-import-position,unused-import
