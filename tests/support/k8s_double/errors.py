"""TEST DOUBLE (onprem.mesh k8s_double): metav1.Status errors shaped like the real kube-apiserver's."""


class ApiError(Exception):
    """An error answered as a metav1.Status object (the real server's shape and field order)."""

    def __init__(self, code, reason, message, details=None, headers=None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = headers or {}

    def status(self):
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message}
        if self.reason:
            body["reason"] = self.reason
        if self.details is not None:
            body["details"] = self.details
        body["code"] = self.code
        return body


def qualified(resource, group):
    """The GroupResource string: `virtualservices.networking.istio.io`, `pods`."""
    return f"{resource}.{group}" if group else resource


def _details(name, group, kind, **extra):
    details = {}
    if name:
        details["name"] = name
    if group:
        details["group"] = group
    if kind:
        details["kind"] = kind
    details.update(extra)
    return details


def not_found(resource, group, name):
    return ApiError(404, "NotFound", f'{qualified(resource, group)} "{name}" not found', _details(name, group, resource))


def already_exists(resource, group, name):
    return ApiError(409, "AlreadyExists", f'{qualified(resource, group)} "{name}" already exists', _details(name, group, resource))


def conflict(resource, group, name, why):
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {qualified(resource, group)} "{name}": {why}',
                    _details(name, group, resource))


MODIFIED = "the object has been modified; please apply your changes to the latest version and try again"


def stale(resource, group, name):
    """The optimistic-concurrency conflict of an update with an old metadata.resourceVersion."""
    return conflict(resource, group, name, MODIFIED)


def bad_request(message):
    return ApiError(400, "BadRequest", message)


def unsupported_media_type(message):
    return ApiError(415, "UnsupportedMediaType", message)


def method_not_supported(resource, group, verb):
    return ApiError(405, "MethodNotAllowed", f"{verb} is not supported on resources of kind \"{qualified(resource, group)}\"",
                    _details("", group, resource))


def unauthorized():
    return ApiError(401, "Unauthorized", "Unauthorized")


# pylint: disable-next=too-many-arguments,too-many-positional-arguments
def forbidden(user, verb, resource, group, name, namespace, subresource=""):
    res = f"{resource}/{subresource}" if subresource else resource
    what = f'{qualified(resource, group)} "{name}"' if name else qualified(resource, group)
    scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    message = f'{what} is forbidden: User "{user}" cannot {verb} resource "{res}" in API group "{group}" {scope}'
    return ApiError(403, "Forbidden", message, _details(name, group, resource))


def generic_invalid():
    """What the real server answers when a JSON patch cannot be applied (failed `test`, missing path)."""
    return ApiError(422, "Invalid", "the server rejected our request due to an error in our request", {})


def path_not_found():
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def internal_error(message="injected fault"):
    return ApiError(500, "InternalError", f"Internal error occurred: {message}",
                    {"causes": [{"message": message}]})


def unavailable(message="the server is currently unable to handle the request"):
    return ApiError(503, "ServiceUnavailable", message, {})


def gone(message):
    return ApiError(410, "Expired", message)


class FieldError:
    """One k8s.io/apimachinery field.Error: Type is the cause type (FieldValueInvalid...)."""

    TYPES = {
        "FieldValueInvalid": "Invalid value",
        "FieldValueTypeInvalid": "Invalid value",
        "FieldValueNotSupported": "Unsupported value",
        "FieldValueRequired": "Required value",
        "FieldValueForbidden": "Forbidden",
        "FieldValueDuplicate": "Duplicate value",
        "FieldValueTooMany": "Too many",
        "FieldValueTooLong": "Too long",
    }
    NO_VALUE = ("FieldValueRequired", "FieldValueForbidden", "FieldValueTooLong")

    def __init__(self, kind, field, value=None, detail=""):
        self.kind = kind
        self.field = field
        self.value = value
        self.detail = detail

    def body(self):
        label = self.TYPES[self.kind]
        if self.kind in self.NO_VALUE:
            text = label
        else:
            text = f"{label}: {format_value(self.value)}"
        if self.detail:
            text += f": {self.detail}"
        return text

    def __str__(self):
        return f"{self.field}: {self.body()}"


class Raw(str):
    """A bad value rendered verbatim (Go's %#v of a non-string, e.g. `0x0`)."""


def format_value(value):  # pylint: disable=too-many-return-statements
    """field.Error's rendering of a bad value (strings quoted like Go's %q)."""
    if isinstance(value, Raw):
        return str(value)
    if value is None:
        return '"null"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return go_quote(value)
    if isinstance(value, dict):
        return '"object"'
    if isinstance(value, list):
        return '"array"'
    return go_quote(str(value))


def go_quote(text):
    out = ['"']
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 32:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def invalid(kind, group, name, field_errors):
    """422 Invalid like apierrors.NewInvalid: message `Kind.group "name" is invalid: <errors>`."""
    group_kind = f"{kind}.{group}" if group else kind
    causes = [{"reason": e.kind, "message": e.body(), "field": e.field} for e in field_errors]
    if not field_errors:
        message = f'{group_kind} "{name}" is invalid'
    elif len(field_errors) == 1:
        message = f'{group_kind} "{name}" is invalid: {field_errors[0]}'
    else:
        message = f'{group_kind} "{name}" is invalid: [' + ", ".join(str(e) for e in field_errors) + "]"
    return ApiError(422, "Invalid", message, _details(name, group, kind, causes=causes))
