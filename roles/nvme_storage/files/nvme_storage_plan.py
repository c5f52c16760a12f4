# -*- coding: utf-8 -*-
# Copyright: onprem.mesh maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Discover NVMe namespaces, map them to purposes and decide, without writing anything, what to do with each.

Run on the managed host by the onprem.mesh.nvme_storage role (ansible.builtin.script) with one argument:
base64 of a JSON object with devices, rules, purposes, fstype and partlabel_prefix (the role's variables).
Reads the namespaces with lsblk JSON, wipefs --no-act and blkid -p; never writes to a disk.
Prints one JSON object: {"plan": [...], "namespaces": [...], "error": null or a message naming the variable}.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import base64
import grp
import json
import os
import pwd
import re
import stat
import subprocess
import sys
import uuid

UUID_NAMESPACE = uuid.UUID("6f6e7072-656d-2d6d-6573-682d6e766d65")  # "onprem-mesh-nvme"
NAMESPACE_RE = re.compile(r"^nvme\d+n\d+$")
GIB = 1024 ** 3


class PlanError(Exception):
    """Bad input: the message names the variable at fault."""


def partition_path(device, number=1):
    """/dev/nvme0n1 -> /dev/nvme0n1p1."""
    return "%sp%d" % (device, number)


def describe(signatures):
    """Human text for a list of signatures: 'ext4 (label data) on /dev/nvme1n1'."""
    parts = []
    for sig in signatures:
        text = sig.get("type") or "unknown"
        if sig.get("label"):
            text += " (label %s)" % sig["label"]
        text += " on %s" % sig.get("device", "?")
        parts.append(text)
    return ", ".join(parts) or "nothing"


def classify(disk, purpose, fstype, partlabel):
    """Return (state, signatures) for a namespace: empty, ours (partition and file system as this role makes
    them; file system possibly still missing) or foreign."""
    parts = disk.get("partitions", [])
    sigs = list(disk.get("signatures", []))
    for part in parts:
        sigs.extend(part.get("signatures", []))
    if not sigs and not parts:
        return "empty", sigs
    disk_types = set(s.get("type") for s in disk.get("signatures", []))
    if (len(parts) == 1 and disk_types <= set(["gpt", "PMBR"]) and "gpt" in disk_types
            and parts[0].get("partlabel") == partlabel):
        part_sigs = parts[0].get("signatures", [])
        if not part_sigs:
            return "ours", sigs
        if len(part_sigs) == 1 and part_sigs[0].get("type") == fstype and part_sigs[0].get("label") == purpose["label"]:
            return "ours", sigs
    return "foreign", sigs


def _check_purpose(name, purposes, where):
    if name not in purposes:
        raise PlanError("%s: unknown purpose %r; known purposes (nvme_storage_purposes): %s"
                        % (where, name, ", ".join(sorted(purposes))))


def _matches(rule, disk):
    if rule.get("model") and not re.search(rule["model"], disk.get("model") or ""):
        return False
    if rule.get("min_size_gib") is not None and disk["size"] < float(rule["min_size_gib"]) * GIB:
        return False
    if rule.get("max_size_gib") is not None and disk["size"] > float(rule["max_size_gib"]) * GIB:
        return False
    return True


def assign(disks, devices, rules, purposes):
    """Map purposes to namespaces. Returns a list of (purpose, disk, entry, source). Raises PlanError."""
    by_serial = dict((d["serial"], d) for d in disks if d.get("serial"))
    taken = {}      # serial -> (purpose, where)
    used = {}       # purpose -> where
    result = []
    for i, entry in enumerate(devices):
        where = "nvme_storage_devices[%d]" % i
        purpose = entry.get("purpose")
        serial = entry.get("serial")
        _check_purpose(purpose, purposes, where + ".purpose")
        if serial in taken:
            raise PlanError("%s.serial: two purposes on one disk: serial %s is given for %r (%s) and %r"
                            % (where, serial, taken[serial][0], taken[serial][1], purpose))
        if purpose in used:
            raise PlanError("%s.purpose: purpose %r is already mapped by %s; one namespace per purpose"
                            % (where, purpose, used[purpose]))
        if serial not in by_serial:
            raise PlanError("%s.serial: no NVMe namespace with serial %r on this host; present: %s"
                            % (where, serial, ", ".join(sorted(by_serial)) or "none"))
        taken[serial] = (purpose, where)
        used[purpose] = where
        result.append((purpose, by_serial[serial], entry, where))
    for i, rule in enumerate(rules):
        where = "nvme_storage_rules[%d]" % i
        purpose = rule.get("purpose")
        _check_purpose(purpose, purposes, where + ".purpose")
        if purpose in used:
            continue    # a mapping by serial (or an earlier rule) wins
        for disk in sorted(disks, key=lambda d: d["name"]):
            if disk.get("serial") not in taken and _matches(rule, disk):
                taken[disk.get("serial")] = (purpose, where)
                used[purpose] = where
                result.append((purpose, disk, {"wipe": False}, where))
                break
        else:
            raise PlanError("%s: no unclaimed NVMe namespace matches (model %r, size %s-%s GiB); present: %s"
                            % (where, rule.get("model"), rule.get("min_size_gib"), rule.get("max_size_gib"),
                               ", ".join("%s (%s, %s, %d GiB)" % (d["name"], d.get("serial"), d.get("model"),
                                                                  d["size"] // GIB) for d in disks) or "none"))
    return result


def plan(disks, devices, rules, purposes, fstype="xfs", partlabel_prefix="onprem-"):
    """Decide per mapped namespace: create (empty), keep (already ours), wipe (flagged) or refuse."""
    entries = []
    for purpose_name, disk, entry, where in assign(disks, devices, rules, purposes):
        purpose = dict(purposes[purpose_name])
        purpose.setdefault("label", purpose_name[:12])
        partlabel = partlabel_prefix + purpose_name
        state, sigs = classify(disk, purpose, fstype, partlabel)
        part = partition_path(disk["path"])
        existing = [p for p in disk.get("partitions", []) if p["path"] == part]
        fs_uuid = None
        fs_present = False
        if state == "ours" and existing and existing[0].get("signatures"):
            fs_present = True
            fs_uuid = existing[0]["signatures"][0].get("uuid")
        if not fs_uuid:
            fs_uuid = str(uuid.uuid5(UUID_NAMESPACE, "%s/%s" % (disk.get("serial"), purpose_name)))
        if state == "empty":
            action, reason = "create", "%s (serial %s) is empty: partitioned and formatted for %s" % (
                disk["path"], disk.get("serial"), purpose_name)
        elif state == "ours":
            action, reason = "keep", "%s (serial %s) already holds the %s file system of this role" % (
                disk["path"], disk.get("serial"), purpose_name)
        elif entry.get("wipe"):
            action, reason = "wipe", "%s (serial %s) holds %s: erased because %s.wipe is true" % (
                disk["path"], disk.get("serial"), describe(sigs), where)
        else:
            how = ("set %s.wipe: true" % where if where.startswith("nvme_storage_devices")
                   else "map it by serial in nvme_storage_devices with wipe: true")
            action, reason = "refuse", ("%s (serial %s, for %s) left alone: it already holds %s. To erase it, %s"
                                        % (disk["path"], disk.get("serial"), purpose_name, describe(sigs), how))
        entries.append({
            "purpose": purpose_name, "source": where, "action": action, "reason": reason,
            "device": disk["path"], "serial": disk.get("serial"), "model": disk.get("model"), "size": disk["size"],
            "signatures": sigs, "partition": part, "partlabel": partlabel, "label": purpose["label"],
            "fstype": fstype, "uuid": fs_uuid, "fs_present": fs_present,
            "wipe_targets": [p["path"] for p in disk.get("partitions", [])] + [disk["path"]],
            "path": purpose["path"], "owner": purpose.get("owner", "root"), "group": purpose.get("group", "root"),
            "mode": purpose.get("mode", "0755"),
        })
    return entries


def _run(cmd):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    out, err = proc.communicate()
    return proc.returncode, out, err


def _wipefs(path):
    """Signatures on one block device, read without writing (wipefs --no-act)."""
    rc, out, err = _run(["wipefs", "--no-act", "--json", path])
    if rc != 0:
        raise RuntimeError("wipefs --no-act %s failed: %s" % (path, err.strip()))
    sigs = json.loads(out).get("signatures", []) if out.strip() else []
    result = []
    for sig in sigs:
        result.append({"device": path, "type": sig.get("type"), "label": sig.get("label"), "uuid": sig.get("uuid"),
                       "offset": sig.get("offset")})
    if not result:
        # blkid -p also knows signatures wipefs does not list (and confirms an empty device).
        rc, out, err = _run(["blkid", "-p", "-o", "export", path])
        if rc == 0:
            info = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
            kind = info.get("TYPE") or info.get("PTTYPE")
            if kind:
                result.append({"device": path, "type": kind, "label": info.get("LABEL"), "uuid": info.get("UUID"),
                               "offset": None})
    return result


def discover():
    """NVMe namespaces with serial, model, size, partitions and signatures."""
    _run(["udevadm", "settle", "--timeout=10"])
    rc, out, err = _run(["lsblk", "--json", "--bytes", "--output",
                         "NAME,PATH,SERIAL,MODEL,SIZE,TYPE,PARTLABEL,MOUNTPOINT"])
    if rc != 0:
        raise RuntimeError("lsblk failed: %s" % err.strip())
    disks = []
    for dev in json.loads(out).get("blockdevices", []):
        if dev.get("type") != "disk" or not NAMESPACE_RE.match(dev.get("name", "")):
            continue
        serial = (dev.get("serial") or "").strip()
        model = (dev.get("model") or "").strip()
        if not serial:
            try:
                with open("/sys/block/%s/device/serial" % dev["name"]) as f:
                    serial = f.read().strip()
            except (IOError, OSError):
                serial = ""
        children = [c for c in dev.get("children", []) or [] if c.get("type") == "part"]
        # Device-mapper, RAID or other holders stacked directly on the namespace count as data too.
        holders = [{"device": c.get("path"), "type": "in use by %s" % c.get("type"), "label": None, "uuid": None,
                    "offset": None} for c in dev.get("children", []) or [] if c.get("type") != "part"]
        disks.append({
            "name": dev["name"], "path": dev["path"], "serial": serial, "model": model, "size": int(dev["size"]),
            "signatures": _wipefs(dev["path"]) + holders,
            "partitions": [{"path": c["path"], "type": c.get("type"), "partlabel": c.get("partlabel"),
                            "mountpoint": c.get("mountpoint"), "signatures": _wipefs(c["path"])}
                           for c in children],
        })
    return disks


def _name(lookup, ident):
    try:
        return lookup(ident)[0]
    except KeyError:
        return str(ident)


def settled(entry, mount_options, fstab_lines):
    """Is the entry already in place: file system mounted on its path, the /etc/fstab line as the mount task
    writes it, and the mounted root's owner, group and mode? Lets a rerun skip those tasks."""
    result = {"mounted": False, "fstab": False, "ownership": False}
    try:
        path_st = os.stat(entry["path"])
        part_st = os.stat(entry["partition"])
    except OSError:
        return result
    result["mounted"] = stat.S_ISBLK(part_st.st_mode) and path_st.st_dev == part_st.st_rdev
    want = ["UUID=" + entry["uuid"], entry["path"], entry["fstype"], ",".join(mount_options)]
    result["fstab"] = any(line.split()[:4] == want for line in fstab_lines)
    result["ownership"] = (result["mounted"]
                           and _name(pwd.getpwuid, path_st.st_uid) == str(entry["owner"])
                           and _name(grp.getgrgid, path_st.st_gid) == str(entry["group"])
                           and stat.S_IMODE(path_st.st_mode) == int(str(entry["mode"]), 8))
    return result


def main(argv):
    params = json.loads(base64.b64decode(argv[1]).decode("utf-8"))
    result = {"plan": [], "namespaces": [], "error": None}
    try:
        result["namespaces"] = discover()
        result["plan"] = plan(result["namespaces"], params.get("devices") or [], params.get("rules") or [],
                              params["purposes"], params.get("fstype", "xfs"),
                              params.get("partlabel_prefix", "onprem-"))
        with open("/etc/fstab") as f:
            fstab_lines = [line for line in f if line.strip() and not line.lstrip().startswith("#")]
        for entry in result["plan"]:
            if entry["action"] in ("keep",):
                entry["settled"] = settled(entry, params.get("mount_options") or ["defaults"], fstab_lines)
            else:
                entry["settled"] = {"mounted": False, "fstab": False, "ownership": False}
    except (PlanError, RuntimeError) as exc:
        result["error"] = str(exc)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
