"""Unit tests for roles/nvme_storage/files/nvme_storage_plan.py: mapping, bad input, and the data-safety decision."""
import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "..", "roles", "nvme_storage", "files", "nvme_storage_plan.py")
_SPEC = importlib.util.spec_from_file_location("nvme_storage_plan", _PATH)
nsp = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(nsp)

GIB = 1024 ** 3
PURPOSES = {
    "containerd": {"path": "/var/lib/containerd", "label": "containerd"},
    "etcd": {"path": "/var/lib/etcd", "mode": "0700"},
}


def disk(name, serial, signatures=(), partitions=(), model="QEMU NVMe Ctrl", size=2 * GIB):
    return {"name": name, "path": "/dev/" + name, "serial": serial, "model": model, "size": size,
            "signatures": [dict(s, device="/dev/" + name) for s in signatures], "partitions": list(partitions)}


def ours(name, serial, purpose, fs="xfs", label=None):
    part = {"path": "/dev/%sp1" % name, "type": "part", "partlabel": "onprem-" + purpose,
            "signatures": [{"device": "/dev/%sp1" % name, "type": fs, "label": label or purpose, "uuid": "u-" + serial}]
            if fs else []}
    return disk(name, serial, [{"type": "PMBR"}, {"type": "gpt"}, {"type": "gpt"}], [part])


def by_purpose(entries):
    return {e["purpose"]: e for e in entries}


def test_empty_disks_are_created_by_serial():
    disks = [disk("nvme0n1", "A"), disk("nvme1n1", "B")]
    plan = by_purpose(nsp.plan(disks, [{"serial": "B", "purpose": "etcd"}, {"serial": "A", "purpose": "containerd"}],
                               [], PURPOSES))
    assert plan["etcd"]["device"] == "/dev/nvme1n1"
    assert plan["etcd"]["action"] == "create"
    assert plan["etcd"]["partition"] == "/dev/nvme1n1p1"
    assert plan["etcd"]["label"] == "etcd"
    assert plan["etcd"]["mode"] == "0700"
    assert plan["containerd"]["device"] == "/dev/nvme0n1"


def test_uuid_is_stable_for_a_new_disk_and_read_back_for_an_existing_one():
    first = nsp.plan([disk("nvme0n1", "A")], [{"serial": "A", "purpose": "etcd"}], [], PURPOSES)[0]
    again = nsp.plan([disk("nvme0n1", "A")], [{"serial": "A", "purpose": "etcd"}], [], PURPOSES)[0]
    assert first["uuid"] == again["uuid"]
    other = nsp.plan([disk("nvme0n1", "Z")], [{"serial": "Z", "purpose": "etcd"}], [], PURPOSES)[0]
    assert other["uuid"] != first["uuid"]
    existing = nsp.plan([ours("nvme0n1", "A", "etcd")], [{"serial": "A", "purpose": "etcd"}], [], PURPOSES)[0]
    assert existing["uuid"] == "u-A"
    assert existing["fs_present"] is True


def test_a_disk_of_this_role_is_kept():
    entry = nsp.plan([ours("nvme0n1", "A", "etcd")], [{"serial": "A", "purpose": "etcd"}], [], PURPOSES)[0]
    assert entry["action"] == "keep"


def test_a_partition_of_this_role_without_file_system_is_kept_and_gets_one():
    entry = nsp.plan([ours("nvme0n1", "A", "etcd", fs=None)], [{"serial": "A", "purpose": "etcd"}], [], PURPOSES)[0]
    assert entry["action"] == "keep"
    assert entry["fs_present"] is False


@pytest.mark.parametrize("signatures,partitions,shown", [
    ([{"type": "ext4", "label": "precious"}], [], "ext4 (label precious)"),
    ([{"type": "LVM2_member"}], [], "LVM2_member"),
    ([{"type": "linux_raid_member"}], [], "linux_raid_member"),
    ([{"type": "in use by lvm"}], [], "in use by lvm"),
    ([{"type": "dos"}], [{"path": "/dev/nvme0n1p1", "partlabel": None, "signatures": []}], "dos"),
])
def test_a_disk_with_any_foreign_signature_is_refused(signatures, partitions, shown):
    entry = nsp.plan([disk("nvme0n1", "A", signatures, partitions)], [{"serial": "A", "purpose": "etcd"}], [], PURPOSES)[0]
    assert entry["action"] == "refuse"
    assert "/dev/nvme0n1" in entry["reason"]
    assert shown in entry["reason"]
    assert "nvme_storage_devices[0].wipe" in entry["reason"]


def test_our_partition_name_with_a_foreign_file_system_is_refused():
    entry = nsp.plan([ours("nvme0n1", "A", "etcd", fs="ext4")], [{"serial": "A", "purpose": "etcd"}], [], PURPOSES)[0]
    assert entry["action"] == "refuse"


def test_a_gpt_of_another_purpose_is_refused():
    entry = nsp.plan([ours("nvme0n1", "A", "containerd")], [{"serial": "A", "purpose": "etcd"}], [], PURPOSES)[0]
    assert entry["action"] == "refuse"


def test_wipe_flag_allows_erasing_and_lists_partitions_first():
    part = {"path": "/dev/nvme0n1p1", "partlabel": "data", "signatures": [{"type": "ext4", "device": "/dev/nvme0n1p1"}]}
    d = disk("nvme0n1", "A", [{"type": "gpt"}], [part])
    entry = nsp.plan([d], [{"serial": "A", "purpose": "etcd", "wipe": True}], [], PURPOSES)[0]
    assert entry["action"] == "wipe"
    assert entry["wipe_targets"] == ["/dev/nvme0n1p1", "/dev/nvme0n1"]


def test_wipe_flag_does_not_wipe_a_disk_of_this_role_again():
    entry = nsp.plan([ours("nvme0n1", "A", "etcd")], [{"serial": "A", "purpose": "etcd", "wipe": True}], [], PURPOSES)[0]
    assert entry["action"] == "keep"


def test_rules_map_unclaimed_disks_in_name_order_and_serials_win():
    disks = [disk("nvme1n1", "B"), disk("nvme0n1", "A"), disk("nvme2n1", "C", model="Other", size=100 * GIB)]
    rules = [{"purpose": "containerd", "model": "^QEMU"}, {"purpose": "etcd", "min_size_gib": 50}]
    plan = by_purpose(nsp.plan(disks, [{"serial": "A", "purpose": "etcd"}], rules, PURPOSES))
    assert plan["etcd"]["serial"] == "A"          # by serial; the etcd rule is not used
    assert plan["containerd"]["serial"] == "B"    # first unclaimed QEMU disk by name
    plan = by_purpose(nsp.plan(disks, [], rules, PURPOSES))
    assert plan["containerd"]["serial"] == "A"
    assert plan["etcd"]["serial"] == "C"


def test_a_refused_disk_mapped_by_rule_says_how_to_wipe_it():
    entry = nsp.plan([disk("nvme0n1", "A", [{"type": "xfs"}])], [], [{"purpose": "etcd"}], PURPOSES)[0]
    assert entry["action"] == "refuse"
    assert "map it by serial in nvme_storage_devices with wipe: true" in entry["reason"]


@pytest.mark.parametrize("devices,rules,message", [
    ([{"serial": "A", "purpose": "scratch"}], [], "nvme_storage_devices[0].purpose: unknown purpose 'scratch'"),
    ([], [{"purpose": "scratch"}], "nvme_storage_rules[0].purpose: unknown purpose 'scratch'"),
    ([{"serial": "X", "purpose": "etcd"}], [], "nvme_storage_devices[0].serial: no NVMe namespace with serial 'X'"),
    ([{"serial": "A", "purpose": "etcd"}, {"serial": "A", "purpose": "containerd"}], [],
     "nvme_storage_devices[1].serial: two purposes on one disk"),
    ([{"serial": "A", "purpose": "etcd"}, {"serial": "B", "purpose": "etcd"}], [],
     "nvme_storage_devices[1].purpose: purpose 'etcd' is already mapped"),
    ([], [{"purpose": "etcd", "model": "Samsung"}], "nvme_storage_rules[0]: no unclaimed NVMe namespace matches"),
])
def test_bad_input_names_the_variable(devices, rules, message):
    with pytest.raises(nsp.PlanError, match=r"^" + __import__("re").escape(message)):
        nsp.plan([disk("nvme0n1", "A"), disk("nvme1n1", "B")], devices, rules, PURPOSES)


def test_rules_take_candidates_in_serial_order_not_by_device_name():
    # Device names follow probe order, which may change at the next boot; serials do not.
    disks = [disk("nvme0n1", "ZZZ"), disk("nvme1n1", "AAA")]
    plan = by_purpose(nsp.plan(disks, [], [{"purpose": "containerd"}, {"purpose": "etcd"}], PURPOSES))
    assert plan["containerd"]["serial"] == "AAA"
    assert plan["etcd"]["serial"] == "ZZZ"
    swapped = [disk("nvme0n1", "AAA"), disk("nvme1n1", "ZZZ")]
    again = by_purpose(nsp.plan(swapped, [], [{"purpose": "containerd"}, {"purpose": "etcd"}], PURPOSES))
    assert again["containerd"]["serial"] == "AAA"


def test_a_disk_carrying_a_purpose_keeps_it_under_rules_whatever_the_rule_order():
    disks = [disk("nvme0n1", "A"), ours("nvme1n1", "B", "containerd")]
    for rules in ([{"purpose": "containerd"}, {"purpose": "etcd"}], [{"purpose": "etcd"}, {"purpose": "containerd"}]):
        plan = by_purpose(nsp.plan(disks, [], rules, PURPOSES))
        assert plan["containerd"]["serial"] == "B"
        assert plan["containerd"]["action"] == "keep"
        assert plan["etcd"]["serial"] == "A"
        assert plan["etcd"]["action"] == "create"


def test_a_disk_carrying_another_purpose_is_never_offered_by_a_rule():
    disks = [ours("nvme0n1", "A", "etcd")]
    with pytest.raises(nsp.PlanError) as err:
        nsp.plan(disks, [], [{"purpose": "containerd", "min_size_gib": 1}], PURPOSES)
    message = str(err.value)
    assert message.startswith("nvme_storage_rules[0]: no unclaimed NVMe namespace matches")
    assert "carries etcd" in message
    assert "at least 1 GiB" in message
    assert "None" not in message


@pytest.mark.parametrize("rule,text", [
    ({}, "any size"), ({"min_size_gib": 50}, "at least 50 GiB"), ({"max_size_gib": 8}, "at most 8 GiB"),
    ({"min_size_gib": 4, "max_size_gib": 8}, "4-8 GiB"),
])
def test_a_rule_that_matches_nothing_states_its_size_bounds(rule, text):
    with pytest.raises(nsp.PlanError) as err:
        nsp.plan([disk("nvme0n1", "A", model="Other")], [], [dict(rule, purpose="etcd", model="^Samsung")], PURPOSES)
    assert "(model '^Samsung', %s)" % text in str(err.value)
    assert "None" not in str(err.value)


def test_a_disk_of_this_role_mapped_by_serial_to_another_purpose_is_refused_without_proposing_a_wipe():
    entry = nsp.plan([ours("nvme0n1", "A", "etcd")], [{"serial": "A", "purpose": "containerd"}], [], PURPOSES)[0]
    assert entry["action"] == "refuse"
    assert "the etcd file system of this role" in entry["reason"]
    assert "map this namespace to etcd" in entry["reason"]
    assert "nvme_storage_devices[0].serial" in entry["reason"]
    assert "wipe" not in entry["reason"]
    assert "nvme_storage_on_refuse: warn" in entry["reason"]


def test_a_mounted_disk_is_refused_and_never_wiped_even_with_the_flag():
    mounted = disk("nvme0n1", "A", [{"type": "ext4", "label": "data"}])
    mounted["mountpoint"] = "/srv/data"
    entry = nsp.plan([mounted], [{"serial": "A", "purpose": "etcd"}], [], PURPOSES)[0]
    assert entry["action"] == "refuse"
    assert "mounted on /srv/data" in entry["reason"]
    assert "wipe" not in entry["reason"]
    flagged = nsp.plan([mounted], [{"serial": "A", "purpose": "etcd", "wipe": True}], [], PURPOSES)[0]
    assert flagged["action"] == "refuse"
    assert "wipe never erases a mounted namespace" in flagged["reason"]
    part = {"path": "/dev/nvme1n1p1", "partlabel": "x", "mountpoint": "/mnt",
            "signatures": [{"type": "ext4", "device": "/dev/nvme1n1p1"}]}
    by_part = nsp.plan([disk("nvme1n1", "B", [{"type": "gpt"}], [part])],
                       [{"serial": "B", "purpose": "etcd", "wipe": True}], [], PURPOSES)[0]
    assert by_part["action"] == "refuse"
    assert "mounted on /mnt" in by_part["reason"]


def test_a_signature_found_twice_is_named_once():
    d = disk("nvme0n1", "A", [{"type": "gpt"}, {"type": "gpt"}, {"type": "PMBR"}])
    entry = nsp.plan([d], [{"serial": "A", "purpose": "etcd"}], [], PURPOSES)[0]
    assert entry["reason"].count("gpt on /dev/nvme0n1") == 1
    assert "PMBR on /dev/nvme0n1" in entry["reason"]


def _planned(action="create", services=("containerd",)):
    return {"action": action, "path": "/var/lib/containerd", "purpose": "containerd", "device": "/dev/nvme0n1",
            "serial": "A", "reason": "planned", "services": list(services), "migrate": False}


def test_a_mount_point_holding_data_is_refused_naming_the_path_its_users_and_the_way_out():
    entry = nsp.decide_mount_point(_planned(), {"state": "data", "entries": 12, "bytes": 3 * 1024 * 1024})
    assert entry["action"] == "refuse"
    for text in ("/var/lib/containerd already holds data (12 entries, 3.0 MiB) used by containerd",
                 "nvme_storage_existing_data: migrate", "nvme_storage_purposes.containerd.path",
                 "nvme_storage_purposes.containerd.services", "nvme_storage_on_refuse: warn"):
        assert text in entry["reason"]
    assert entry["migrate"] is False


def test_migrate_plans_the_copy_instead_of_refusing():
    entry = nsp.decide_mount_point(_planned("keep"), {"state": "data", "entries": 3, "bytes": 10}, "migrate")
    assert entry["action"] == "keep"
    assert entry["migrate"] is True
    assert "stop containerd" in entry["reason"]


@pytest.mark.parametrize("found", [{"state": "absent"}, {"state": "empty"}])
def test_a_free_mount_point_changes_nothing(found):
    entry = nsp.decide_mount_point(_planned(), found, "migrate")
    assert (entry["action"], entry["migrate"], entry["reason"]) == ("create", False, "planned")


def test_a_mount_point_of_another_device_is_refused_even_with_migrate():
    entry = nsp.decide_mount_point(_planned(), {"state": "mountpoint", "source": "/dev/sda3"}, "migrate")
    assert entry["action"] == "refuse"
    assert "already a mount point of /dev/sda3" in entry["reason"]
    assert entry["migrate"] is False


def test_an_entry_already_refused_keeps_its_reason():
    entry = nsp.decide_mount_point(_planned("refuse"), {"state": "data", "entries": 1, "bytes": 1})
    assert entry["reason"] == "planned"


def test_inspect_path_counts_entries_and_bytes(tmp_path):
    assert nsp.inspect_path(str(tmp_path / "missing")) == {"state": "absent"}
    assert nsp.inspect_path(str(tmp_path)) == {"state": "empty"}
    (tmp_path / "io.containerd.content.v1.content").mkdir()
    (tmp_path / "io.containerd.content.v1.content" / "blob").write_bytes(b"x" * 100)
    (tmp_path / "meta.db").write_bytes(b"y" * 28)
    assert nsp.inspect_path(str(tmp_path)) == {"state": "data", "entries": 3, "bytes": 128}
    assert nsp.inspect_path("/proc")["state"] == "mountpoint"


@pytest.mark.parametrize("action,word", [("refuse", "REFUSED: "), ("create", "new: "), ("keep", "kept: "),
                                         ("wipe", "wiped: ")])
def test_the_summary_says_refused_for_a_refused_namespace(action, word):
    assert nsp.summarize(_planned(action))["summary"] == word + "planned"
