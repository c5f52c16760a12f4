"""TEST DOUBLE (onprem.mesh k8s_double): decode the Kubernetes protobuf request bodies kubectl sends for a few kinds.

kubectl 1.32 encodes built-in objects it builds itself (`kubectl create namespace|configmap|secret|serviceaccount`)
as `application/vnd.kubernetes.protobuf`. This decodes those four kinds (field numbers from k8s.io/api
generated.proto); any other protobuf body answers 415 (the double cannot decode it), which the real server would
accept.
"""
import base64

MAGIC = b"k8s\x00"


def _varint(data, pos):
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def fields(data):
    """[(number, wire type, value)] of one protobuf message (values: int or bytes)."""
    out, pos = [], 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((number, wire, value))
    return out


def _text(value):
    return value.decode("utf-8")


def _map(entries, value_fn=_text):
    result = {}
    for entry in entries:
        parts = {n: v for n, _wire, v in fields(entry)}
        result[_text(parts.get(1, b""))] = value_fn(parts.get(2, b""))
    return result


def _b64(value):
    return base64.b64encode(value).decode()


def _object_meta(data):
    meta, labels, annotations, finalizers = {}, [], [], []
    names = {1: "name", 2: "generateName", 3: "namespace", 5: "uid", 6: "resourceVersion"}
    for number, _wire, value in fields(data):
        if number in names:
            meta[names[number]] = _text(value)
        elif number == 11:
            labels.append(value)
        elif number == 12:
            annotations.append(value)
        elif number == 14:
            finalizers.append(_text(value))
    if labels:
        meta["labels"] = _map(labels)
    if annotations:
        meta["annotations"] = _map(annotations)
    if finalizers:
        meta["finalizers"] = finalizers
    return meta


def _namespace(parts):
    obj = {}
    for number, _wire, value in parts:
        if number == 2:
            finalizers = [_text(v) for n, _wire, v in fields(value) if n == 1]
            obj["spec"] = {"finalizers": finalizers} if finalizers else {}
    return obj


def _configmap(parts):
    obj, data, binary = {}, [], []
    for number, _wire, value in parts:
        if number == 2:
            data.append(value)
        elif number == 3:
            binary.append(value)
        elif number == 4:
            obj["immutable"] = bool(value)
    if data:
        obj["data"] = _map(data)
    if binary:
        obj["binaryData"] = _map(binary, _b64)
    return obj


def _secret(parts):
    obj, data, string_data = {}, [], []
    for number, _wire, value in parts:
        if number == 2:
            data.append(value)
        elif number == 3:
            obj["type"] = _text(value)
        elif number == 4:
            string_data.append(value)
        elif number == 5:
            obj["immutable"] = bool(value)
    if data:
        obj["data"] = _map(data, _b64)
    if string_data:
        obj["stringData"] = _map(string_data)
    return obj


def _serviceaccount(parts):
    obj = {}
    for number, _wire, value in parts:
        if number == 3:
            obj.setdefault("imagePullSecrets", []).append({"name": _text(dict((n, v) for n, _wire, v in fields(value)).get(1, b""))})
        elif number == 4:
            obj["automountServiceAccountToken"] = bool(value)
    return obj


DECODERS = {("v1", "Namespace"): _namespace, ("v1", "ConfigMap"): _configmap, ("v1", "Secret"): _secret,
            ("v1", "ServiceAccount"): _serviceaccount}


def decode(body):
    """The JSON-shaped object of a protobuf request body, or None when the kind is not one the double decodes."""
    if not body.startswith(MAGIC):
        return None
    envelope = {n: v for n, _wire, v in fields(body[len(MAGIC):])}
    type_meta = {n: _text(v) for n, _wire, v in fields(envelope.get(1, b""))}
    api_version, kind = type_meta.get(1, ""), type_meta.get(2, "")
    decoder = DECODERS.get((api_version, kind))
    if decoder is None:
        return None
    parts = fields(envelope.get(2, b""))
    obj = {"apiVersion": api_version, "kind": kind, "metadata": {}}
    for number, _wire, value in parts:
        if number == 1:
            obj["metadata"] = _object_meta(value)
    obj.update(decoder(parts))
    return obj
