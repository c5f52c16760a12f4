"""TEST DOUBLE (onprem.mesh k8s_double): bearer-token authentication and RBAC-like authorization.

Token configuration (YAML or JSON file, or the same structure passed to start(tokens=...)), either a list::

    users:
      - token: canary-token
        user: canary-bot
        rules:                      # like RBAC PolicyRules, plus an optional `namespaces` list
          - apiGroups: ["networking.istio.io"]
            resources: ["virtualservices", "destinationrules"]
            verbs: ["get", "list", "watch", "patch"]
            namespaces: ["default"]   # absent: every namespace and the cluster scope
            resourceNames: ["reviews"]  # optional
      - token: root
        user: root
        admin: true                 # every verb on everything

or a mapping ``{token: {user: ..., rules: [...], admin: ...}}``. The admin token (ADMIN_TOKEN unless given) is always
accepted; it is the one written to the kubeconfig.
"""
import json
import os
import threading

import yaml

ADMIN_TOKEN = "k8s-double-admin-token"
ADMIN_USER = "k8s-double-admin"


class User:  # pylint: disable=too-few-public-methods
    def __init__(self, name, rules=None, admin=False, groups=None):
        self.name = name
        self.rules = list(rules or [])
        self.admin = admin
        self.groups = list(groups or [])


def _entries(config):
    if config is None:
        return []
    if isinstance(config, str) and os.path.exists(config):
        with open(config, encoding="utf-8") as handle:
            text = handle.read()
        config = json.loads(text) if config.endswith(".json") else yaml.safe_load(text)
    if isinstance(config, dict) and isinstance(config.get("users"), list):
        return config["users"]
    if isinstance(config, dict):
        return [dict(v or {}, token=k) for k, v in config.items()]
    if isinstance(config, list):
        return config
    raise ValueError("tokens: expected a file, a {token: {...}} mapping or {users: [...]}")


class Authenticator:
    def __init__(self, tokens=None, admin_token=ADMIN_TOKEN):
        self.lock = threading.Lock()
        self.admin_token = admin_token
        self.tokens = {admin_token: User(ADMIN_USER, admin=True, groups=["system:masters"])}
        for entry in _entries(tokens):
            self.add(entry["token"], entry.get("user") or entry.get("name") or entry["token"], entry.get("rules"),
                     bool(entry.get("admin")), entry.get("groups"))

    def add(self, token, user, rules=None, admin=False, groups=None):  # pylint: disable=too-many-arguments,too-many-positional-arguments
        with self.lock:
            self.tokens[token] = User(user, rules, admin, groups)

    def authenticate(self, header):
        if not header or not header.lower().startswith("bearer "):
            return None, None
        token = header.split(" ", 1)[1].strip()
        with self.lock:
            return self.tokens.get(token), token


def _has(values, wanted):
    return "*" in values or wanted in values


def allowed(user, verb, group, resource, subresource, namespace, name):  # pylint: disable=too-many-arguments,too-many-positional-arguments
    """RBAC PolicyRule matching (apiGroups, resources incl. `res/sub`, verbs, resourceNames) plus `namespaces`."""
    if user.admin:
        return True
    full = f"{resource}/{subresource}" if subresource else resource
    for rule in user.rules:
        if not _has(rule.get("apiGroups") or [], group):
            continue
        resources = rule.get("resources") or []
        if not (_has(resources, full) or (subresource and f"{resource}/*" in resources)):
            continue
        if not _has(rule.get("verbs") or [], verb):
            continue
        spaces = rule.get("namespaces")
        if spaces is not None and not (namespace and _has(spaces, namespace)):
            continue
        names = rule.get("resourceNames")
        if names and not (name and name in names):
            continue
        return True
    return False
