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
    """Human text for a list of signatures: 'ext4 (label data) on /dev/nvme1n1'. A signature found twice on one
    device (GPT keeps a primary and a backup header) is named once."""
    parts = []
    seen = set()
    for sig in signatures:
        key = (sig.get("type"), sig.get("label"), sig.get("device"))
        if key in seen:
            continue
        seen.add(key)
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


def carried_purpose(disk, purposes, partlabel_prefix):
    """The purpose of this role a namespace already carries (its partition's GPT name is <prefix><purpose>),
    or None."""
    for part in disk.get("partitions", []):
        label = part.get("partlabel") or ""
        if label.startswith(partlabel_prefix) and label[len(partlabel_prefix):] in purposes:
            return label[len(partlabel_prefix):]
    return None


def mountpoints(disk):
    """Where the namespace or any of its partitions is mounted now."""
    return [m for m in [disk.get("mountpoint")] + [p.get("mountpoint") for p in disk.get("partitions", [])] if m]


def _matches(rule, disk):
    if rule.get("model") and not re.search(rule["model"], disk.get("model") or ""):
        return False
    if rule.get("min_size_gib") is not None and disk["size"] < float(rule["min_size_gib"]) * GIB:
        return False
    if rule.get("max_size_gib") is not None and disk["size"] > float(rule["max_size_gib"]) * GIB:
        return False
    return True


def _size_text(rule):
    low, high = rule.get("min_size_gib"), rule.get("max_size_gib")
    if low is None and high is None:
        return "any size"
    if high is None:
        return "at least %s GiB" % low
    if low is None:
        return "at most %s GiB" % high
    return "%s-%s GiB" % (low, high)


def assign(disks, devices, rules, purposes, partlabel_prefix="onprem-"):
    """Map purposes to namespaces. Returns a list of (purpose, disk, entry, source). Raises PlanError.

    By serial first (explicit). Then the rules, in two passes: a namespace that already carries a rule's
    purpose (this role's partition name) keeps it; the others get the unclaimed namespaces that carry no
    purpose of this role, in serial order (device names change across boots, serials do not). A namespace
    carrying one purpose is never offered to another purpose by a rule."""
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
    pending = []
    for i, rule in enumerate(rules):
        where = "nvme_storage_rules[%d]" % i
        _check_purpose(rule.get("purpose"), purposes, where + ".purpose")
        if rule.get("purpose") not in used:   # a mapping by serial (or an earlier rule) wins
            used[rule.get("purpose")] = where
            pending.append((where, rule))
    candidates = sorted((d for d in disks if d.get("serial")), key=lambda d: d["serial"])
    chosen = {}
    for carried_pass in (True, False):
        for where, rule in pending:
            purpose = rule["purpose"]
            if where in chosen:
                continue
            for disk in candidates:
                carried = carried_purpose(disk, purposes, partlabel_prefix)
                if disk["serial"] in taken or not _matches(rule, disk):
                    continue
                if (carried == purpose) if carried_pass else carried is None:
                    taken[disk["serial"]] = (purpose, where)
                    chosen[where] = disk
                    break
    for where, rule in pending:
        if where not in chosen:
            raise PlanError("%s: no unclaimed NVMe namespace matches (%s, %s); a namespace that carries "
                            "another purpose of this role is never offered; present: %s. Change %s (model, "
                            "min_size_gib, max_size_gib) or map a namespace by serial in nvme_storage_devices"
                            % (where, "model %r" % rule["model"] if rule.get("model") else "any model", _size_text(rule),
                               ", ".join("%s (%s, %s, %d GiB%s)" % (
                                   d["name"], d.get("serial") or "no serial", d.get("model"), d["size"] // GIB,
                                   ", carries " + carried_purpose(d, purposes, partlabel_prefix)
                                   if carried_purpose(d, purposes, partlabel_prefix) else "")
                                   for d in disks) or "none", where))
        result.append((rule["purpose"], chosen[where], {"wipe": False}, where))
    return result


WARN_HINT = " (nvme_storage_on_refuse: warn goes on without it)"


def _refusal(disk, purpose_name, where, sigs, carried, mounted, wipe_flag):
    """Why a namespace that holds something is left alone, and every variable that gets past it. Never proposes
    wiping a mounted namespace or one that carries a file system of this role."""
    head = "%s (serial %s, for %s) left alone: it holds %s" % (disk["path"], disk.get("serial"), purpose_name,
                                                               describe(sigs))
    if where.startswith("nvme_storage_devices"):
        other = "To use another namespace, change %s.serial" % where
        erase = "to erase this one, set %s.wipe: true" % where
    else:
        other = ("To use another namespace, change %s (model, min_size_gib, max_size_gib) or map %s by serial in "
                 "nvme_storage_devices" % (where, purpose_name))
        erase = "to erase this one, map it by serial in nvme_storage_devices with wipe: true"
    if mounted:
        text = "%s, mounted on %s. %s%s" % (head, ", ".join(mounted), other,
                                            "; wipe never erases a mounted namespace" if wipe_flag else "")
    elif carried:
        text = ("%s: the %s file system of this role, which is never given to another purpose. %s, or map this "
                "namespace to %s" % (head, carried, other, carried))
    else:
        text = "%s. %s; %s" % (head, other, erase)
    return text + WARN_HINT


def plan(disks, devices, rules, purposes, fstype="xfs", partlabel_prefix="onprem-"):
    """Decide per mapped namespace: create (empty), keep (already ours), wipe (flagged) or refuse."""
    entries = []
    for purpose_name, disk, entry, where in assign(disks, devices, rules, purposes, partlabel_prefix):
        purpose = dict(purposes[purpose_name])
        purpose.setdefault("label", purpose_name[:12])
        partlabel = partlabel_prefix + purpose_name
        state, sigs = classify(disk, purpose, fstype, partlabel)
        part = partition_path(disk["path"])
        existing = [p for p in disk.get("partitions", []) if p["path"] == part]
        carried = carried_purpose(disk, purposes, partlabel_prefix)
        mounted = mountpoints(disk)
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
        elif entry.get("wipe") and not mounted:
            action, reason = "wipe", "%s (serial %s) holds %s: erased because %s.wipe is true" % (
                disk["path"], disk.get("serial"), describe(sigs), where)
        else:
            action = "refuse"
            reason = _refusal(disk, purpose_name, where, sigs, carried if carried != purpose_name else None,
                              mounted, entry.get("wipe"))
        entries.append({
            "purpose": purpose_name, "source": where, "action": action, "reason": reason,
            "device": disk["path"], "serial": disk.get("serial"), "model": disk.get("model"), "size": disk["size"],
            "signatures": sigs, "partition": part, "partlabel": partlabel, "label": purpose["label"],
            "fstype": fstype, "uuid": fs_uuid, "fs_present": fs_present, "carries": carried, "mounted": mounted,
            "wipe_targets": [p["path"] for p in disk.get("partitions", [])] + [disk["path"]],
            "path": purpose["path"], "owner": purpose.get("owner", "root"), "group": purpose.get("group", "root"),
            "mode": purpose.get("mode", "0755"), "services": list(purpose.get("services") or []),
            "migrate": False,
        })
    return entries


def _size(num):
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if num < 1024 or unit == "GiB":
            return ("%d %s" % (num, unit)) if unit == "bytes" else ("%.1f %s" % (num, unit))
        num /= 1024.0
    return str(num)


def decide_mount_point(entry, found, existing_data="refuse"):
    """Refuse (or plan the migration of) an entry whose mount point is not free. `found` is what inspect_path
    saw at entry["path"]: state absent, empty, data (entries, bytes) or mountpoint (source). Changes entry."""
    if entry["action"] not in ("create", "wipe", "keep"):
        return entry
    path, purpose = entry["path"], entry["purpose"]
    services = entry.get("services") or []
    users = ", ".join(services) if services else "whatever writes there"
    if found["state"] == "mountpoint":
        entry["action"] = "refuse"
        entry["reason"] = ("%s (serial %s, for %s) not mounted: %s is already a mount point of %s, and mounting over "
                           "it would hide that file system. Unmount it, or change nvme_storage_purposes.%s.path%s"
                           % (entry["device"], entry["serial"], purpose, path, found.get("source") or "another device",
                              purpose, WARN_HINT))
    elif found["state"] == "data":
        held = "%d entries, %s" % (found["entries"], _size(found["bytes"]))
        if existing_data == "migrate":
            entry["migrate"] = True
            entry["reason"] += ("; %s holds data (%s): %s, the data copied onto the new file system and checked, "
                                "then removed from under the mount point" % (
                                    path, held, "stop %s" % ", ".join(services) if services else "no service stopped"))
        else:
            entry["action"] = "refuse"
            entry["reason"] = (
                "%s (serial %s, for %s) not formatted or mounted: %s already holds data (%s) used by %s, which a "
                "mount would hide. Set nvme_storage_existing_data: migrate to stop %s, copy the data onto the new "
                "file system, check the copy and mount it (the services are listed in nvme_storage_purposes.%s."
                "services); or empty %s; or change nvme_storage_purposes.%s.path%s"
                % (entry["device"], entry["serial"], purpose, path, held, users,
                   ", ".join(services) if services else "nothing (no services listed)", purpose, path, purpose,
                   WARN_HINT))
    return entry


def inspect_path(path):
    """What is at a mount point now: absent, empty, data (with entry count and bytes, this file system only)
    or mountpoint (and its source)."""
    if not os.path.lexists(path):
        return {"state": "absent"}
    if os.path.ismount(path):
        source = None
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4] == path and " - " in line:
                    source = line.split(" - ", 1)[1].split()[1]
        return {"state": "mountpoint", "source": source}
    if not os.path.isdir(path):
        return {"state": "data", "entries": 1, "bytes": os.lstat(path).st_size}
    entries, size = 0, 0
    root_dev = os.lstat(path).st_dev
    for top, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if os.lstat(os.path.join(top, d)).st_dev == root_dev]
        entries += len(dirs) + len(files)
        for name in files:
            try:
                size += os.lstat(os.path.join(top, name)).st_size
            except OSError:
                pass
    return {"state": "data", "entries": entries, "bytes": size} if entries else {"state": "empty"}


SUMMARY_WORDS = {"create": "new", "keep": "kept", "wipe": "wiped", "refuse": "REFUSED"}


def summarize(entry):
    """One line for the report: what happens to the namespace (REFUSED stands out) and why."""
    entry["summary"] = "%s: %s" % (SUMMARY_WORDS[entry["action"]], entry["reason"])
    return entry


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
            "mountpoint": dev.get("mountpoint"),
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
            if not entry["settled"]["mounted"]:
                decide_mount_point(entry, inspect_path(entry["path"]), params.get("existing_data", "refuse"))
            summarize(entry)
    except (PlanError, RuntimeError) as exc:
        result["error"] = str(exc)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
