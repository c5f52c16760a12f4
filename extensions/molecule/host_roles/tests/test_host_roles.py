"""Verify the host roles on the guest: kernel preparation, swap, time sync, NVMe file systems and mounts."""
import json

import pytest

PURPOSES = {"/var/lib/containerd": ("containerd", "0o700"), "/var/lib/etcd": ("etcd", "0o700")}
SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
    "net.bridge.bridge-nf-call-iptables": "1",
    "net.bridge.bridge-nf-call-ip6tables": "1",
    "fs.inotify.max_user_instances": "8192",
    "fs.inotify.max_user_watches": "524288",
}


@pytest.fixture(scope="module")
def fstab(host):
    return [line.split() for line in host.file("/etc/fstab").content_string.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


@pytest.fixture(scope="module")
def blockdevices(host):
    out = host.check_output("lsblk --json --output NAME,PATH,SERIAL,FSTYPE,LABEL,UUID,PARTLABEL,MOUNTPOINT")
    return json.loads(out)["blockdevices"]


def test_modules_loaded_and_persisted(host):
    loaded = host.check_output("cut -d' ' -f1 /proc/modules").split()
    for module in ("overlay", "br_netfilter"):
        assert module in loaded
        assert host.file("/etc/modules-load.d/onprem-mesh.conf").contains("^%s$" % module)


def test_sysctls_applied_and_persisted(host):
    persisted = host.file("/etc/sysctl.d/90-onprem-mesh.conf").content_string
    for name, value in SYSCTLS.items():
        assert host.check_output("sysctl -n %s" % name).strip() == value, name
        assert "%s=%s" % (name, value) in persisted, name


def test_swap_off_and_gone_from_fstab(host, fstab):
    assert host.check_output("swapon --show --noheadings").strip() == ""
    assert not [f for f in fstab if len(f) > 2 and f[2] == "swap"]


def test_the_running_chrony_is_kept_with_the_role_servers(host):
    service = host.service("chrony")
    assert service.is_running
    assert service.is_enabled
    assert not host.package("systemd-timesyncd").is_installed
    assert host.file("/etc/chrony/sources.d/onprem-mesh.sources").contains("^server 127.0.0.1 iburst$")
    assert "127.0.0.1" in host.check_output("chronyc -n sources")


def test_udev_rule_names_the_mapped_namespaces_by_serial(host):
    rule = host.file("/etc/udev/rules.d/60-onprem-mesh-nvme.rules").content_string
    assert 'ATTRS{serial}=="MESH1A"' in rule
    assert 'ATTRS{serial}=="MESH1B"' in rule


@pytest.mark.parametrize("mount_point", sorted(PURPOSES))
def test_nvme_mounted_by_uuid_with_noatime(host, fstab, blockdevices, mount_point):
    label, mode = PURPOSES[mount_point]
    parts = [c for d in blockdevices if d["name"].startswith("nvme") for c in d.get("children", [])]
    part = [p for p in parts if p["mountpoint"] == mount_point]
    assert len(part) == 1, parts
    part = part[0]
    assert part["fstype"] == "xfs"
    assert part["label"] == label
    assert part["partlabel"] == "onprem-" + label
    entry = [f for f in fstab if len(f) > 3 and f[1] == mount_point]
    assert entry and entry[0][0] == "UUID=" + part["uuid"]
    assert entry[0][2] == "xfs"
    assert "noatime" in entry[0][3].split(",")
    mount = host.mount_point(mount_point)
    assert "noatime" in mount.options
    assert oct(host.file(mount_point).mode) == mode


def test_scheduler_none_by_udev_rule(host):
    assert host.file("/etc/udev/rules.d/60-onprem-mesh-nvme.rules").contains('ATTR{queue/scheduler}="none"')
    for name in ("nvme0n1", "nvme1n1"):
        assert "[none]" in host.file("/sys/block/%s/queue/scheduler" % name).content_string
