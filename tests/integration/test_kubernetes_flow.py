"""The kubernetes role's init and join logic with a stand-in for kubeadm (no kubeadm can run on these machines).

Proves the role's own decisions: init only where /etc/kubernetes/admin.conf is missing, join only where kubelet.conf
is missing (a second run calls kubeadm not once), a token and certificate key made at run time and never printed, the
JoinConfiguration written 0600 with the right discovery and control-plane fields and removed afterwards, and an expired
or refused token stopping with a message that says what to do.
"""
import json
import os
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.path.join(ROOT, "tests", "integration", "targets", "kubeadm_flow")
VENV_BIN = os.path.dirname(sys.executable)
TOKEN = "abcdef.0123456789abcdef"
CERT_KEY = "e" * 64
ADMIN_KEY = "QURNSU4gS0VZIG9mIHRoZSBjbHVzdGVy"
NODES = {"cp1": ("kube_control_plane", "192.0.2.11"), "cp2": ("kube_control_plane", "192.0.2.12"),
         "w1": ("kube_node", "192.0.2.21")}


def cluster(tmp_path, **extra_vars):
    """An inventory of three localhost aliases, each with its own configuration directory, and the fake kubeadm."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "kubeadm"
    fake.write_text(f"#!{sys.executable}\n" + open(os.path.join(TARGET, "fake_kubeadm.py"), encoding="utf-8").read())
    fake.chmod(0o755)
    groups = {"kube_control_plane": {"hosts": {}}, "kube_node": {"hosts": {}}}
    for name, (group, address) in NODES.items():
        conf = tmp_path / name / "etc-kubernetes"
        if group == "kube_control_plane":
            conf.mkdir(parents=True)   # kubeadm's package or a previous run made it; a new worker has none
        groups[group]["hosts"][name] = {"kubernetes_config_dir": str(conf), "kubernetes_advertise_address": address,
                                        "kubernetes_kubeadm_config_file": str(conf / "kubeadm-config.yaml")}
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": groups, "vars": {
        "kubernetes_bin_dir": str(bin_dir), "kubernetes_control_plane_endpoint": "k8s-api.lab.internal:6443",
        "kubernetes_admin_kubeconfig_dest": str(tmp_path / "controller" / "admin.conf"), **extra_vars}}}))
    (tmp_path / "state").mkdir()
    return inventory


def run(tmp_path, inventory, **env_extra):
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               FAKE_KUBEADM_DIR=str(tmp_path / "state"), PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""), **env_extra)
    log = tmp_path / "state" / "calls.jsonl"
    before = len(log.read_text().splitlines()) if log.exists() else 0
    proc = subprocess.run([os.path.join(VENV_BIN, "ansible-playbook"), "-i", str(inventory), os.path.join(TARGET, "flow.yml")],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
                          check=False)
    calls = [json.loads(line) for line in log.read_text().splitlines()[before:]] if log.exists() else []
    return proc.returncode, proc.stdout, calls


def total_changed(out):
    return sum(int(ln.split("changed=")[1].split()[0]) for ln in out.splitlines() if "changed=" in ln and " : ok=" in ln)


def test_init_once_join_with_run_time_secrets_then_nothing(tmp_path):
    inventory = cluster(tmp_path)
    rc, out, calls = run(tmp_path, inventory)
    assert rc == 0, out
    assert TOKEN not in out and CERT_KEY not in out, "secrets must never be printed"
    kinds = [" ".join(c["argv"][:3]) for c in calls]
    assert kinds.count("init --config " + str(tmp_path / "cp1" / "etc-kubernetes" / "kubeadm-config.yaml")) == 1, kinds
    assert sum(k.startswith("token create") for k in kinds) == 1 and sum(k.startswith("init phase upload-certs") for k in kinds) == 1
    assert [c for c in calls if c["argv"][:2] == ["token", "create"]][0]["ttl"] == "30m"
    joins = {yaml.safe_load(c["config"])["nodeRegistration"]["name"]: (yaml.safe_load(c["config"]), c["mode"])
             for c in calls if c["argv"][0] == "join"}
    assert sorted(joins) == ["cp2", "w1"], "the first control plane initialises, it does not join"
    for name, (config, mode) in joins.items():
        assert mode == "0o600", (name, mode)
        assert config["apiVersion"] == "kubeadm.k8s.io/v1beta4" and config["kind"] == "JoinConfiguration"
        assert config["discovery"]["bootstrapToken"] == {"apiServerEndpoint": "k8s-api.lab.internal:6443", "token": TOKEN,
                                                         "caCertHashes": ["sha256:" + "c" * 64]}
        assert config["nodeRegistration"]["kubeletExtraArgs"] == [{"name": "node-ip", "value": NODES[name][1]}]
        assert not (tmp_path / name / "etc-kubernetes" / "kubeadm-join.yaml").exists(), "the join file is removed"
    assert joins["cp2"][0]["controlPlane"] == {"localAPIEndpoint": {"advertiseAddress": "192.0.2.12", "bindPort": 6443},
                                               "certificateKey": CERT_KEY}
    assert "controlPlane" not in joins["w1"][0]
    init_config = list(yaml.safe_load_all([c for c in calls if c["argv"][0] == "init" and "phase" not in c["argv"]][0]["config"]))
    assert init_config[1]["controlPlaneEndpoint"] == "k8s-api.lab.internal:6443"
    # the admin kubeconfig of the first control plane, on the controller as kubeadm wrote it, 0600, never printed
    controller = tmp_path / "controller" / "admin.conf"
    assert controller.read_bytes() == (tmp_path / "cp1" / "etc-kubernetes" / "admin.conf").read_bytes()
    assert controller.stat().st_mode & 0o777 == 0o600 and (tmp_path / "controller").stat().st_mode & 0o777 == 0o700
    assert ADMIN_KEY not in out
    # Every node is a member now: the second run asks kubeadm nothing and changes nothing.
    rc, out, calls = run(tmp_path, inventory)
    assert rc == 0 and calls == [] and total_changed(out) == 0, (calls, out)


def test_the_controller_s_kubeconfig_names_the_api_as_the_controller_reaches_it(tmp_path):
    """kubernetes_admin_kubeconfig_server: the controller's copy points at a forwarded port (or a load balancer's public
    name); the rest is kubeadm's file, the nodes' copy is left alone, and a second run changes nothing."""
    inventory = cluster(tmp_path, kubernetes_admin_kubeconfig_server="https://127.0.0.1:16443")
    rc, out, dummy = run(tmp_path, inventory)
    assert rc == 0, out
    node_copy = (tmp_path / "cp1" / "etc-kubernetes" / "admin.conf").read_text()
    controller = (tmp_path / "controller" / "admin.conf").read_text()
    assert "    server: https://192.0.2.11:6443\n" in node_copy
    assert controller == node_copy.replace("https://192.0.2.11:6443", "https://127.0.0.1:16443")
    assert ADMIN_KEY not in out
    rc, out, dummy = run(tmp_path, inventory)
    assert rc == 0 and total_changed(out) == 0, out


def test_a_new_worker_joins_without_touching_the_members(tmp_path):
    inventory = cluster(tmp_path)
    assert run(tmp_path, inventory)[0] == 0
    (tmp_path / "w1" / "etc-kubernetes" / "kubelet.conf").unlink()      # w1 is a fresh machine again
    rc, out, calls = run(tmp_path, inventory)
    assert rc == 0, out
    assert [c["argv"][:2] for c in calls] == [["token", "create"], ["token", "list"], ["join", "--config"]], calls
    assert "controlPlane" not in yaml.safe_load(calls[-1]["config"]), "no certificate key for a worker"


def test_expired_token_stops_before_the_join(tmp_path):
    inventory = cluster(tmp_path)
    rc, out, calls = run(tmp_path, inventory, FAKE_KUBEADM_EXPIRED="1")
    assert rc != 0, out
    assert "The join token made at run time has expired" in out and "kubernetes_join_token_ttl" in out, out
    assert not [c for c in calls if c["argv"][0] == "join"], "no join may be attempted with an expired token"
    assert not (tmp_path / "w1" / "etc-kubernetes" / "kubelet.conf").exists()
    assert TOKEN not in out


def test_token_refused_by_kubeadm_is_explained_without_the_secret(tmp_path):
    inventory = cluster(tmp_path)
    rc, out, dummy = run(tmp_path, inventory, FAKE_KUBEADM_JOIN_FAIL="1")
    assert rc != 0, out
    assert "the join token was refused as expired or unknown" in out, out
    assert TOKEN not in out and CERT_KEY not in out
    assert not (tmp_path / "w1" / "etc-kubernetes" / "kubeadm-join.yaml").exists(), "the join file is removed on failure too"
