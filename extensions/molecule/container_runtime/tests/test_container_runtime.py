"""containerd on the guest: Debian's package, systemd cgroups, root on the NVMe mount, answering on its socket."""
import re

import pytest

SOCKET = "/run/containerd/containerd.sock"


@pytest.fixture(name="root")
def root_host(host):
    """The guests are reached as root (no sudo in the image)."""
    assert host.user().name == "root"
    return host


def test_containerd_package_from_debian(host):
    assert host.package("containerd").is_installed
    assert host.package("containerd").version.startswith("1.6.")


def test_service_running_and_enabled(host):
    service = host.service("containerd")
    assert service.is_running and service.is_enabled


def test_answers_ctr_version_on_its_socket(root):
    out = root.check_output(f"ctr --address {SOCKET} version")
    assert re.search(r"Server:\s+Version:\s+1\.6\.", out), out


def test_systemd_cgroup_driver_and_cri_settings(root):
    config = root.file("/etc/containerd/config.toml").content_string
    assert "SystemdCgroup = true" in config
    assert 'root = "/var/lib/containerd"' in config
    assert 'config_path = "/etc/containerd/certs.d"' in config
    # containerd loaded the CRI plugin with that configuration.
    plugins = root.check_output(f"ctr --address {SOCKET} plugins ls")
    assert re.search(r"io\.containerd\.grpc\.v1\s+cri\s+.*\bok\b", plugins), plugins


def test_data_directory_on_the_nvme_mount(root):
    source = root.check_output("findmnt -n -o SOURCE -T /var/lib/containerd")
    assert source.startswith("/dev/nvme"), source
    assert root.check_output("findmnt -n -o TARGET -T /var/lib/containerd") == "/var/lib/containerd"
    # containerd wrote its state there (content store, snapshotters).
    assert root.file("/var/lib/containerd/io.containerd.content.v1.content").is_directory


def test_data_directory_mode_is_the_one_containerd_keeps(root):
    assert root.file("/var/lib/containerd").mode == 0o700


def test_migrated_images_are_the_ones_containerd_had_on_the_root_disk(root):
    before = root.file("/root/images.before").content_string
    assert "onprem.test/migrate:1" in before
    assert root.check_output(f"ctr --address {SOCKET} --namespace k8s.io images ls").strip() == before.strip()


def test_the_old_copy_under_the_mount_point_was_removed(root):
    # The root file system seen without the NVMe mount on top: nothing left under /var/lib/containerd.
    try:
        root.check_output("mkdir -p /mnt/rootfs && mount --bind / /mnt/rootfs")
        assert root.check_output("find /mnt/rootfs/var/lib/containerd -mindepth 1 | wc -l") == "0"
    finally:
        root.run("umount /mnt/rootfs")
