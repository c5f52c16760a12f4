"""Run one module task through ansible-playbook and read back its registered result.

The target playbooks (tests/integration/targets/*/) call the module with ``module_args``, register
the result with ``ignore_errors`` and write it as JSON to ``result_file``; this runs them with the
work tree's ansible.cfg and the venv's ansible-playbook, bounded in time.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.dirname(sys.executable)


def ansible_env(extra=None):
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
               PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""), NO_PROXY="127.0.0.1,localhost")
    env.update(extra or {})
    return env


def run_playbook(playbook, tmp_path, variables=None, env=None, check=False, diff=False, timeout=600, extra_args=()):
    """Returns (returncode, result dict or None, output). ``variables`` go in as a JSON extra-vars file."""
    result_file = os.path.join(str(tmp_path), "result-%d.json" % len(os.listdir(str(tmp_path))))
    variables = dict(variables or {}, result_file=result_file)
    vars_file = os.path.join(str(tmp_path), "vars-%d.json" % len(os.listdir(str(tmp_path))))
    with open(vars_file, "w") as f:
        json.dump(variables, f)
    cmd = [os.path.join(VENV_BIN, "ansible-playbook"), playbook, "-e", "@" + vars_file] + list(extra_args)
    if check:
        cmd.append("--check")
    if diff:
        cmd.append("--diff")
    proc = subprocess.run(cmd, cwd=ROOT, env=ansible_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, check=False)
    result = None
    if os.path.exists(result_file):
        with open(result_file) as f:
            result = json.load(f)
    return proc.returncode, result, proc.stdout
