"""Verify that the disk holding data before converge was left alone and the empty one was provisioned."""
import json

import pytest


@pytest.fixture(scope="module")
def disks(host):
    out = host.check_output("lsblk --json --output NAME,PATH,SERIAL,FSTYPE,LABEL,PTTYPE,MOUNTPOINT")
    return {d["serial"]: d for d in json.loads(out)["blockdevices"] if d["name"].startswith("nvme")}


def test_precious_disk_untouched(host, disks):
    disk = disks["SAFE2B"]
    assert disk["fstype"] == "ext4"
    assert disk["label"] == "precious"
    assert disk["pttype"] is None
    assert not disk.get("children")
    assert disk["mountpoint"] is None
    assert "/var/lib/etcd" not in host.file("/etc/fstab").content_string


def test_precious_file_intact(host, disks):
    dev = disks["SAFE2B"]["path"]
    expected = host.file("/root/precious.sha256").content_string.strip()
    try:
        host.check_output("mkdir -p /mnt/check && mount -o ro,noload %s /mnt/check" % dev)
        assert host.file("/mnt/check/keep.txt").content_string == "precious data written before converge\n"
        assert host.check_output("sha256sum /mnt/check/keep.txt").split()[0] == expected
    finally:
        host.run("umount /mnt/check")


def test_empty_disk_provisioned(host, disks):
    part = disks["SAFE2A"]["children"][0]
    assert part["fstype"] == "xfs"
    assert part["label"] == "containerd"
    assert part["mountpoint"] == "/var/lib/containerd"


def test_time_sync_installed_where_no_daemon_ran(host):
    # The image has systemd-timesyncd and no other time daemon: kvm_host keeps it running.
    service = host.service("systemd-timesyncd")
    assert service.is_running
    assert service.is_enabled
