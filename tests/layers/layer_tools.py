"""Helpers for the outer layers: run a tool and show its output; list the files the collection tracks."""
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.dirname(sys.executable)
# Outside the work tree: inside it, ansible-test would list files with git and miss the ignored copy.
_BUILD_ROOT = os.environ.get("ONPREM_MESH_BUILD_DIR") or os.path.join(tempfile.gettempdir(), "onprem-mesh-build-%d" % os.getpid())
BUILD = os.path.join(_BUILD_ROOT, "ansible_collections")
DEPENDENCIES = ("kubernetes/core", "ansible/posix", "community/general")


def run(cmd, cwd=ROOT, env=None, timeout=1800):
    """Run a tool, show its output in the test report, and fail the test on a non-zero exit."""
    full_env = dict(os.environ)
    full_env["PATH"] = VENV_BIN + os.pathsep + full_env.get("PATH", "")
    full_env.update(env or {})
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout, check=False)
    sys.stdout.write(proc.stdout[-20000:])
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-6000:]}"
    return proc.stdout


def tracked_files():
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         check=True, stdout=subprocess.PIPE).stdout
    return [f for f in out.decode().split("\0") if f and os.path.isfile(os.path.join(ROOT, f))]
