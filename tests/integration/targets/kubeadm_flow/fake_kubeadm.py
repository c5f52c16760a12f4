"""A stand-in for kubeadm used by test_kubernetes_flow.py. It prints what kubeadm prints (secrets included, so the test
can check the role hides them), writes admin.conf / kubelet.conf as kubeadm does, and records every call and every
JoinConfiguration (with its file mode) in FAKE_KUBEADM_DIR. FAKE_KUBEADM_EXPIRED=1 lists the token as expired;
FAKE_KUBEADM_JOIN_FAIL=1 makes join fail as kubeadm does for an unknown token."""
import json
import os
import stat
import sys

TOKEN = "abcdef.0123456789abcdef"
CA_HASH = "sha256:" + "c" * 64
CERT_KEY = "e" * 64
ADMIN_KEY = "QURNSU4gS0VZIG9mIHRoZSBjbHVzdGVy"   # base64 of the admin client key admin.conf carries
STATE = os.environ["FAKE_KUBEADM_DIR"]


def record(entry):
    with open(os.path.join(STATE, "calls.jsonl"), "a", encoding="utf-8") as log:
        log.write(json.dumps(entry) + "\n")


# what kubeadm writes as admin.conf (the cluster-admin's key included, which must never be printed)
ADMIN_CONF = """apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: Q0EgZGF0YQ==
    server: https://192.0.2.11:6443
  name: onprem-mesh
contexts:
- context:
    cluster: onprem-mesh
    user: kubernetes-admin
  name: kubernetes-admin@onprem-mesh
current-context: kubernetes-admin@onprem-mesh
kind: Config
users:
- name: kubernetes-admin
  user:
    client-certificate-data: Q0VSVCBkYXRh
    client-key-data: %s
""" % ADMIN_KEY


def main(argv):
    entry = {"argv": argv}
    if argv[:1] == ["init"] and "phase" not in argv:
        config = argv[argv.index("--config") + 1]
        entry["config"] = open(config, encoding="utf-8").read()
        with open(os.path.join(os.path.dirname(config), "admin.conf"), "w", encoding="utf-8") as handle:
            handle.write(ADMIN_CONF)
        print("Your Kubernetes control-plane has initialized successfully!")
        print(f"  kubeadm join 192.0.2.10:6443 --token {TOKEN} --discovery-token-ca-cert-hash {CA_HASH} "
              f"--control-plane --certificate-key {CERT_KEY}")
    elif argv[:2] == ["token", "create"]:
        entry["ttl"] = argv[argv.index("--ttl") + 1]
        print(f"kubeadm join 192.0.2.10:6443 --token {TOKEN} --discovery-token-ca-cert-hash {CA_HASH} ")
    elif argv[:3] == ["init", "phase", "upload-certs"]:
        print("[upload-certs] Storing the certificates in Secret \"kubeadm-certs\" in the \"kube-system\" Namespace")
        print("[upload-certs] Using certificate key:")
        print(CERT_KEY)
    elif argv[:2] == ["token", "list"]:
        ttl = "<invalid>" if os.environ.get("FAKE_KUBEADM_EXPIRED") else "29m"
        print("TOKEN                     TTL         EXPIRES                USAGES                   DESCRIPTION")
        print(f"{TOKEN}   {ttl}   2026-01-01T00:30:00Z   authentication,signing   onprem.mesh join")
    elif argv[:1] == ["join"]:
        config = argv[argv.index("--config") + 1]
        entry["config"] = open(config, encoding="utf-8").read()
        entry["mode"] = oct(stat.S_IMODE(os.stat(config).st_mode))
        record(entry)
        if os.environ.get("FAKE_KUBEADM_JOIN_FAIL"):
            sys.stderr.write("error execution phase preflight: couldn't validate the identity of the API Server: could not "
                             f"find a JWS signature in the cluster-info ConfigMap for token ID \"{TOKEN.split('.', 1)[0]}\"\n")
            sys.exit(1)
        with open(os.path.join(os.path.dirname(config), "kubelet.conf"), "w", encoding="utf-8") as handle:
            handle.write(ADMIN_CONF)
        print("This node has joined the cluster")
        return
    else:
        sys.exit(f"fake kubeadm: unsupported {argv}")
    record(entry)


if __name__ == "__main__":
    main(sys.argv[1:])
