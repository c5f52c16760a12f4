# -*- coding: utf-8 -*-
# Copyright (c) onprem.mesh contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The staged canary rollout: plan, state machine, lease, resume, rollback and hold.

Plain Python. Talks to the cluster through a ``WeightChange`` (traffic.py) and to health checks
through a *gate*: an object with ``start_window()`` (returns a token, e.g. a restart baseline)
and ``evaluate(token)`` (returns a dict with ``verdict`` pass/fail/inconclusive and ``checks``).
Time comes from injected ``now``/``sleep`` so unit tests run a 5-step rollout in milliseconds.

What the rollout records on the VirtualService (annotations, so a rerun can pick it up):

``mesh.onprem.io/canary-rollout``
    JSON: canary and stable subsets, the planned weights, the step being analysed, the phase
    (``progressing``, ``held``, ``promoted``, ``rolled_back``), failures so far, a reason.
``mesh.onprem.io/canary-lease``
    JSON: holder and expiry. Another run refuses to start while an unexpired lease is held by
    someone else, unless forced. Renewed with every step's write, dropped at the end.
``mesh.onprem.io/canary-command``
    JSON: an operator's command to the running rollout (``abort``, ``pause``, ``resume``, ``promote``, with an
    ``id``, ``by``, ``at`` and ``reason``), posted by ``operator_command`` (the canary_command module). The
    running rollout looks for it every ``command_every`` seconds, acts on it, removes it and records its ``id``
    in the state (``command``), which is how the poster knows it was done.

Cancel and kill: ``Cancelled`` (raised by the module's SIGTERM/SIGINT/SIGHUP handler, or by the ``alive``
check when the job that started the module has died) ends the rollout by ``on_cancel``: ``rollback`` (all
traffic to stable) or ``hold`` (the weights as they are); either way the lease is released and the state
records why. ``abandoned`` does the same from another process for a module that was killed outright.

Every step costs one write (weights, state and lease in one JSON patch) and one read before it,
plus the reads of waiting for the mesh when that is asked for.

Other writers: every write begins with ``test`` operations on the target route and on the rollout's two
annotations as just read, so the API server refuses it if any of them changed in between (HTTP 422, or 409).
The rollout then reads again and rebuilds the write (at most ``conflict_retries`` times more): another
client's change to anything else (another route, a timeout, other annotations) is kept and costs at most a
retry. Before each write the rollout also checks that the target route's weights and its annotations are
still what it last wrote (or read, before its first write); if another client changed them, the rollout
stops, says which field changed, what it found and what it expected, and follows ``on_failure``.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import time
import uuid
from datetime import datetime, timezone

from ansible_collections.onprem.mesh.plugins.module_utils.canary_checks import duration_seconds
from ansible_collections.onprem.mesh.plugins.module_utils.traffic import (
    StepRoutes, TrafficError, and_match, annotation_ops, annotation_tests, current_weights, has_canary_mirror, mirror_fields, route_label,
    validate_match, validate_mirror)

STATE_ANNOTATION = "mesh.onprem.io/canary-rollout"
LEASE_ANNOTATION = "mesh.onprem.io/canary-lease"
COMMAND_ANNOTATION = "mesh.onprem.io/canary-command"
ACTIVE_PHASES = ("progressing", "held", "paused")
COMMANDS = ("abort", "pause", "resume", "promote")


class RolloutError(TrafficError):
    """The rollout cannot start or go on; the message says why and what to set."""


class LeaseHeld(RolloutError):
    """Another run holds the lease (``obj``: the VirtualService as read, when known)."""

    def __init__(self, message, obj=None):
        super(LeaseHeld, self).__init__(message)
        self.obj = obj


class ConcurrentChange(RolloutError):
    """Another client changed what the rollout owns: the target route's weights or the rollout's annotations.

    ``changes`` lists ``(field, found, expected)``; ``obj`` is the VirtualService as read."""

    def __init__(self, message, changes=(), obj=None):
        super(ConcurrentChange, self).__init__(message)
        self.changes = list(changes)
        self.obj = obj


class Cancelled(BaseException):
    """The job was cancelled (a signal) or died: end the rollout by ``on_cancel``. A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` on the way takes it for an error of the step."""

    def __init__(self, reason):
        super(Cancelled, self).__init__(reason)
        self.reason = reason


def format_weights(weights):
    """``v1=90, v2=10`` (by subset name)."""
    return ", ".join("%s=%s" % kv for kv in sorted((weights or {}).items())) or "none"


def _cut(text, limit=300):
    return text if not text or len(text) <= limit else text[:limit] + "..."


def _nonzero(weights):
    return dict((k, v) for k, v in (weights or {}).items() if v)


def not_started(exc, base, canary):
    """An error before a run's first write: the exception keeps its type, and gets ``result`` (``not_started``,
    the weights as read) and, in its message, where the traffic stays."""
    if getattr(exc, "result", None) is not None or base.get("weights_before") is None:
        return
    weights = base["weights_before"]
    try:
        exc.result = dict(base, changed=False, result="not_started", weights_after=weights)
    except AttributeError:  # an exception type that takes no attributes
        return
    if exc.args and isinstance(exc.args[0], str):
        exc.args = ("%s; this run wrote nothing: traffic stays %s (canary %s gets %s %% of it)"
                    % (exc.args[0], format_weights(weights), canary, weights.get(canary, 0)),) + exc.args[1:]


def check_stable_and_canary(change, vs, stable, canary):
    """``stable`` and ``canary`` are subsets the DestinationRule defines for the route's host; a refusal names the
    option (``canary: subset v9 is not defined ...``) and carries ``result`` ``not_started``."""
    try:
        weights = current_weights(change.locate(vs)[2])
    except TrafficError:
        weights = None
    try:
        if stable == canary:
            raise RolloutError("stable and canary name the same subset %r; the canary must be another subset" % stable)
        change.validate({stable: 100, canary: 0}, vs, fields={stable: "stable", canary: "canary"})
    except TrafficError as exc:
        not_started(exc, dict(canary=canary, stable=stable, weights_before=weights, timeline=[]), canary)
        raise


def outcome_message(result, canary):
    """The task's message for a rollout that ended rolled back or held: why, and where the traffic is now."""
    return "canary %s %s: %s; traffic now %s" % (canary, result["result"].replace("_", " "), result.get("reason"),
                                                 format_weights(result.get("weights_after")))


def parse_duration(value, field):
    """Seconds from 30, '30', or a duration as analysis_window takes it: '30s', '2m', '1m30s'."""
    if isinstance(value, bool):
        raise RolloutError("%s: expected a duration such as 30s, 2m or 1h, got %r" % (field, value))
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif str(value).strip().isdigit():
        seconds = float(str(value).strip())
    else:
        seconds = duration_seconds(value)
        if seconds is None:
            raise RolloutError("%s: expected a duration such as 30s, 2m or 1h, got %r" % (field, value))
    if seconds < 0:
        raise RolloutError("%s: a duration cannot be negative, got %r" % (field, value))
    return seconds


STEP_KINDS = ("weight", "match", "mirror")


def step_kind(step):
    """``weight``, ``match`` or ``mirror``: what a planned step does (see ``plan_steps``)."""
    return "match" if "match" in step else "mirror" if "mirror" in step else "weight"


def step_key(step):
    """The step as the recorded plan names it: the weight, or ``{"match": ...}`` / ``{"mirror": percentage}``."""
    kind = step_kind(step)
    return step["weight"] if kind == "weight" else {kind: step[kind]}


def step_fields(step):
    """The keys a step adds to its schedule row and timeline entry besides the weight: ``match`` or ``mirror``."""
    kind = step_kind(step)
    return {} if kind == "weight" else {kind: step[kind]}


def describe_step(step):
    """``weight 5``, ``mirror 10 %``, ``match headers x-canary exact true``: for messages."""
    kind = step_kind(step)
    if kind == "mirror":
        return "mirror %s %%" % step["mirror"]
    if kind == "match":
        return "match headers %s" % ", ".join("%s %s %s" % (name, kind, text)
                                              for name, cond in sorted(step["match"]["headers"].items()) for kind, text in cond.items())
    return "weight %d" % step["weight"]


def plan_steps(steps=None, step_weight=None, max_weight=None, interval=None):
    """The analysed steps as a list of ``{"weight": w, "interval": seconds}``, before promotion to 100.

    ``steps``: weights (``[5, 10, 25, 50]``) or dicts (``{weight: 5, interval: 2m}``); a final 100
    is the promotion itself. Or ``step_weight``/``max_weight`` like Flagger: 10, 20, ... up to max.
    Before the weights, steps that send the canary no share of the route yet (their ``weight`` is 0):
    ``{match: {headers: ...}}`` or ``{match: {cookie: NAME=VALUE}}`` (``"match"``: the HTTPMatchRequest from
    ``traffic.validate_match``; its requests go to the canary, in a match route in front of the target route, until
    the rollout ends) and ``{mirror: percentage}`` (``"mirror"``: that share of the route's requests copied to the canary
    during this step only; users get stable's answers).
    """
    default_interval = parse_duration(interval if interval is not None else "1m", "interval")
    if steps and (step_weight or max_weight):
        raise RolloutError("steps and step_weight/max_weight are mutually exclusive; set one way of describing the schedule")
    if not steps:
        if not step_weight:
            raise RolloutError("steps: give the weights, e.g. steps: [5, 10, 25, 50], or step_weight (and max_weight)")
        max_weight = 50 if max_weight is None else max_weight
        for field, value in (("step_weight", step_weight), ("max_weight", max_weight)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
                raise RolloutError("%s: a whole number from 1 to 100, got %r" % (field, value))
        if step_weight > max_weight:
            raise RolloutError("step_weight (%d) is larger than max_weight (%d); lower step_weight or raise max_weight" % (step_weight, max_weight))
        steps = list(range(step_weight, max_weight + 1, step_weight))
    planned = []
    for i, item in enumerate(steps):
        field = "steps[%d]" % i
        if isinstance(item, dict):
            unknown = set(item) - set(STEP_KINDS + ("interval",))
            if unknown:
                raise RolloutError("%s: unknown key %s; a step has one of weight, match or mirror, and an interval"
                                   % (field, ", ".join(sorted(str(k) for k in unknown))))
            kinds = [k for k in STEP_KINDS if k in item]
            if len(kinds) > 1:
                raise RolloutError("%s: %s in one step; a step is a weight, a match or a mirror: give each its own step" % (field, " and ".join(kinds)))
            weight, step_interval = item.get("weight"), item.get("interval")
            if step_kind(item) != "weight":
                planned.append(_early_step(item, step_kind(item), field, planned, default_interval))
                continue
        else:
            weight, step_interval = item, None
        if isinstance(weight, str) and weight.strip().isdigit():
            weight = int(weight)
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise RolloutError("%s: weight must be a whole number from 1 to 100, got %r" % (field, weight))
        if not 1 <= weight <= 100:
            raise RolloutError("%s: weight must be from 1 to 100, got %d" % (field, weight))
        if planned and weight <= planned[-1]["weight"]:
            raise RolloutError("%s: weights must increase step by step; %d follows %d" % (field, weight, planned[-1]["weight"]))
        if weight == 100:
            if i != len(steps) - 1:
                raise RolloutError("%s: 100 is the promotion and can only be the last step" % field)
            break
        planned.append({"weight": weight,
                        "interval": parse_duration(step_interval, field + ".interval") if step_interval is not None else default_interval})
    if not planned:
        raise RolloutError("steps: the schedule needs at least one weight below 100 to analyse before promotion")
    return planned


def _early_step(item, kind, field, planned, default_interval):
    """A match or mirror step of ``plan_steps``: it must come before every weight step (once users reach the canary by weight,
    a copy or a tester's request adds nothing the analysis needs)."""
    weighted = [s for s in planned if step_kind(s) == "weight"]
    if weighted:
        raise RolloutError("%s: a %s step comes before the weight steps (it is analysed while the canary gets no share of the route);"
                           " here it follows weight %d: move it to the front" % (field, kind, weighted[-1]["weight"]))
    try:
        value = validate_match(item[kind], field + ".match") if kind == "match" else validate_mirror(item[kind], field + ".mirror")
    except TrafficError as exc:
        raise RolloutError(str(exc))
    step_interval = item.get("interval")
    return {"weight": 0, "interval": parse_duration(step_interval, field + ".interval") if step_interval is not None else default_interval,
            kind: value}


SOURCE_BLIND = ("success_rate", "latency", "promql")


def check_plan(plan, checks=None, change=None, vs=None, canary=None):
    """What ``plan_steps`` cannot judge alone, checked before anything is written (a refusal carries ``result``
    ``not_started`` and says where traffic stays, when ``vs`` is given).

    A mirror step is judged on the copies the canary receives, which Istio reports only on the canary's inbound side
    (``reporter="destination"``, the built-in queries' default): the source proxy's telemetry counts the request it
    answers, not its mirror. So a Prometheus check with ``reporter: source`` would see no canary traffic in a mirror
    step; it is refused. A match step's headers are ANDed with the target route's own match (``change.locate(vs)``);
    a header both name with different conditions is refused (no request could meet both)."""
    route = change.locate(vs)[2] if change is not None else None
    try:
        mirrors = [i for i, s in enumerate(plan) if step_kind(s) == "mirror"]
        for check in checks or []:
            if mirrors and check.get("type") in SOURCE_BLIND and check.get("reporter") == "source":
                raise RolloutError("steps[%d].mirror: check %s reads reporter: source, which never counts mirrored requests (Istio reports"
                                   " a mirrored request on the canary's inbound side only, reporter: destination); drop reporter: source"
                                   " from the check, or the mirror step" % (mirrors[0], check.get("name")))
        for i, step in enumerate(plan):
            if route is not None and step_kind(step) == "match":
                try:
                    and_match(route.get("match"), step["match"], "steps[%d].match" % i)
                except TrafficError as exc:
                    raise RolloutError(str(exc))
    except RolloutError as exc:
        if route is not None:
            not_started(exc, dict(canary=canary, weights_before=current_weights(route), timeline=[]), canary)
        raise


PROBE_TYPES = ("success_rate", "latency", "promql")
POLICY_KEYS = ("on_no_data", "on_nan", "on_error", "on_low_traffic")


def probe_checks(check_params):
    """The parameters for the probes inside a step: only the Prometheus checks, evaluated once, where
    anything but a measured breach is inconclusive (so a probe can fail a step early, never pass it)."""
    params = dict(check_params)
    params["checks"] = [dict((k, v) for k, v in c.items() if k not in POLICY_KEYS)
                        for c in check_params.get("checks") or [] if c.get("type") in PROBE_TYPES]
    params.update(dict((k, "inconclusive") for k in POLICY_KEYS))
    params.update(on_still_inconclusive="inconclusive", retry_inconclusive_for=0)
    return params


def next_beat(scheduled, every, now):
    """The first time after ``scheduled`` on its grid of ``every`` seconds that is later than ``now``. A look or a
    probe that took longer than ``every`` (a slow or retried API request, a slow Prometheus) skips the beats it
    overran instead of making them up back to back."""
    scheduled += every
    while scheduled <= now:  # every > 0: command_interval and probe_interval are checked before a rollout starts
        scheduled += every
    return scheduled


def _fmt(number):
    return "%d" % number if float(number).is_integer() else "%s" % number


def iso(timestamp):
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def parse_annotation(obj, key):
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(key)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        raise RolloutError("annotation %s on VirtualService %s is not valid JSON; remove it (kubectl annotate virtualservice %s %s-) and rerun"
                           % (key, obj["metadata"]["name"], obj["metadata"]["name"], key))
    return value if isinstance(value, dict) else None


class Rollout:
    """A staged rollout of ``canary`` next to ``stable`` on one route of one VirtualService."""

    def __init__(self, change, gate, stable, canary, steps, on_failure="rollback", failure_limit=0,
                 wait_for_mesh=False, mesh_timeout=60.0, lease_seconds=None, force=False, restart=False,
                 holder=None, now=time.time, sleep=time.sleep, poll_interval=0.5, log=None, probe=None, probe_every=0,
                 on_cancel="rollback", alive=None, tick=None, command_every=None, pause_timeout=3600.0):
        if stable == canary:
            raise RolloutError("stable and canary name the same subset %r; the canary must be another subset" % stable)
        if on_failure not in ("rollback", "hold"):
            raise RolloutError("on_failure: rollback or hold, got %r" % on_failure)
        if on_cancel not in ("rollback", "hold"):
            raise RolloutError("on_cancel: rollback or hold, got %r" % on_cancel)
        if isinstance(failure_limit, bool) or not isinstance(failure_limit, int) or failure_limit < 0:
            raise RolloutError("failure_limit: a whole number of failed analyses to tolerate (0 or more), got %r" % failure_limit)
        self.change = change
        self.gate = gate
        self.stable = stable
        self.canary = canary
        self.steps = steps
        self.on_failure = on_failure
        self.failure_limit = failure_limit
        self.wait_for_mesh = wait_for_mesh
        self.mesh_timeout = mesh_timeout
        self.lease_seconds = lease_seconds
        self.force = force
        self.restart = restart
        self.holder = holder or "onprem.mesh-%s" % uuid.uuid4().hex[:12]
        self.now = now
        self.sleep = sleep
        self.poll_interval = poll_interval
        self.log = log or (lambda message: None)
        self.probe = probe
        self.probe_every = probe_every
        self.on_cancel = on_cancel
        self.alive = alive                  # None, or a function: None while the job lives, else why it is gone
        self.tick = tick                    # seconds between two calls of alive() while waiting (None: only between steps)
        self.command_every = command_every  # seconds between two looks for an operator's command (None: never look)
        self.pause_timeout = pause_timeout
        self.timeline = []
        self._ack = None        # the operator command this run acts on, recorded in the state with the next write
        self._started = False   # this run has written
        self._expected = None   # what the rollout expects of its own fields at the next write (see _remember)
        self._step_index = 0
        self._failing = None    # the reason of the rollback or hold being written
        self._original = None   # the target route's own mirror fields, before any mirror step (see _user_mirror)

    # -- plan ---------------------------------------------------------------------------------
    def weights(self, canary_weight):
        return {self.stable: 100 - canary_weight, self.canary: canary_weight}

    @property
    def plan_key(self):
        """The plan as recorded: weights, and ``{"match": ...}`` / ``{"mirror": ...}`` for those steps, so that a rerun with
        another plan is refused instead of resuming a step of a different kind."""
        return [step_key(s) for s in self.steps]

    def schedule(self, start_index=0):
        """The planned steps from ``start_index`` with their weights and intervals, then the promotion."""
        rows = [dict(step=i + 1, weight=s["weight"], weights=self.weights(s["weight"]), interval=s["interval"], **step_fields(s))
                for i, s in enumerate(self.steps) if i >= start_index]
        rows.append(dict(step=len(self.steps) + 1, weight=100, weights=self.weights(100), interval=0, promotion=True))
        return rows

    # -- state on the object ---------------------------------------------------------------------
    def _lease_ttl(self, interval):
        if self.lease_seconds:
            return self.lease_seconds
        return interval * (1 + self.failure_limit) + (self.mesh_timeout if self.wait_for_mesh else 0) + 120

    def _check_lease(self, vs):
        lease = parse_annotation(vs, LEASE_ANNOTATION)
        if not lease or lease.get("holder") == self.holder or self.force:
            return
        expires = float(lease.get("expires", 0))
        if expires > self.now():
            raise LeaseHeld("VirtualService %s/%s is held by another rollout (%s) until %s, %d s from now; wait for it to finish,"
                            " or if that run is dead, wait for the lease to expire or set force: true"
                            % (self.change.namespace, self.change.name, lease.get("holder"), iso(expires), expires - self.now()), obj=vs)

    def _record(self, vs, phase, index, failures, reason=None, interval=60, release=False):
        """Patch operations for the rollout's record: ``test`` of its two annotations as read, then their new values."""
        state = dict(canary=self.canary, stable=self.stable, plan=self.plan_key, step=index, phase=phase,
                     failures=failures, updated=iso(self.now()), holder=self.holder)
        if any(step_kind(s) == "mirror" for s in self.steps):  # what the user had, to be put back after a kill too
            state["mirror_saved"] = self._user_mirror(vs)
        if reason:
            state["reason"] = reason
        changes = {}
        tested = (STATE_ANNOTATION, LEASE_ANNOTATION)
        if self._ack is not None:  # the operator's command is done: record its id; remove it unless a newer one replaced it
            state["command"] = dict((k, self._ack.get(k)) for k in ("id", "command", "by", "at") if self._ack.get(k) is not None)
            posted = parse_annotation(vs, COMMAND_ANNOTATION)
            if posted is not None and posted.get("id") == self._ack.get("id"):
                changes[COMMAND_ANNOTATION] = None
                tested += (COMMAND_ANNOTATION,)
        lease = None if release else json.dumps(dict(holder=self.holder, expires=round(self.now() + self._lease_ttl(interval), 3)), sort_keys=True)
        changes.update({STATE_ANNOTATION: json.dumps(state, sort_keys=True), LEASE_ANNOTATION: lease})
        return annotation_tests(vs, tested) + annotation_ops(vs, changes)

    # -- what the rollout owns, and other writers --------------------------------------------------
    def _remember(self, obj):
        """What the rollout expects at its next write: the target route's weights and its annotations as in ``obj``
        (the object as read at the start, then as each write of this run left it)."""
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        self._expected = dict(weights=current_weights(self.change.locate(obj)[2]),
                              annotations=dict((k, annotations.get(k)) for k in (STATE_ANNOTATION, LEASE_ANNOTATION)))

    def _changed_by_others(self, vs):
        """``(field, found, expected)`` for each of the rollout's own fields that differs in ``vs`` from what it expects."""
        if self._expected is None:
            return []
        _host, index, route = self.change.locate(vs)
        changes = []
        live, expected = current_weights(route), self._expected["weights"]
        if _nonzero(live) != _nonzero(expected):
            changes.append(("the weights of the target route %s (spec.http[%d].route[].weight)" % (route_label(route, index), index),
                            format_weights(live), format_weights(expected)))
        annotations = (vs.get("metadata") or {}).get("annotations") or {}
        for key in (STATE_ANNOTATION, LEASE_ANNOTATION):
            if annotations.get(key) != self._expected["annotations"].get(key):
                changes.append(("the annotation %s (metadata.annotations)" % key, _cut(annotations.get(key)) or "no annotation",
                                _cut(self._expected["annotations"].get(key)) or "no annotation"))
        return changes

    def _check_taken_over(self, vs):
        """After this run's first write, a lease of another holder means another run took over (force): stop, theirs now."""
        lease = parse_annotation(vs, LEASE_ANNOTATION)
        if lease and lease.get("holder") != self.holder:
            raise LeaseHeld("VirtualService %s/%s is now held by another rollout (%s), which took it over (force) while this run held it;"
                            " this run stops and leaves the VirtualService to it" % (self.change.namespace, self.change.name, lease.get("holder")),
                            obj=vs)

    def _guard(self, vs):
        """Checked on every read for a write: the lease, and that nobody else changed the rollout's own fields."""
        if self._started:
            self._check_taken_over(vs)
        else:
            self._check_lease(vs)
        changes = self._changed_by_others(vs)
        if changes:
            if self._started:
                when, details = "while the rollout ran", ["%s: found %s, the rollout had written %s" % c for c in changes]
            else:
                when, details = "as this run began", ["%s: found %s, read %s when this run started" % c for c in changes]
            raise ConcurrentChange("another client changed VirtualService %s/%s %s: %s"
                                   % (self.change.namespace, self.change.name, when, "; ".join(details)), changes=changes, obj=vs)

    def _final_guard(self, vs):
        """For the rollback or hold that ends the rollout: only a takeover stops it (the VirtualService is theirs then)."""
        if self._started:
            self._check_taken_over(vs)
        else:
            self._check_lease(vs)

    def _write(self, canary_weight, phase, index, failures, reason=None, interval=60, release=False, final=False, vs=None):
        """One guarded write of the weights (None: as they are) and the record; retried on conflicts with a fresh read."""
        weights = None if canary_weight is None else self.weights(canary_weight)
        written = self.change.apply(weights, validate=False, vs=vs, guard=self._final_guard if final else self._guard,
                                    routes=self._routes(canary_weight, phase, index),
                                    extra_ops=lambda obj: self._record(obj, phase, index, failures, reason, interval, release))
        self._started = True
        self._remember(written["object"])
        return written

    def _routes(self, canary_weight, phase, index):
        """``routes`` for ``WeightChange.apply``: while progressing, the match route of the last match step up to ``index`` and the
        mirror of step ``index``; with any other weights written (promotion, rollback), neither - the match route removed, the
        user's own mirror fields put back; None (all as it is) when the weights stay as they are (hold)."""
        if canary_weight is None:
            return None
        match = mirror = None
        field = "match"
        for i, step in enumerate(self.steps[:index + 1] if phase == "progressing" else []):
            if step_kind(step) == "match":
                match, field = step["match"], "steps[%d].match" % i
            if i == index:
                mirror = step.get("mirror")

        def ops(vs, route_index, route):
            return StepRoutes(self.canary, match, mirror, self._user_mirror(vs), field=field).ops(vs, route_index, route)
        return ops

    def _user_mirror(self, vs):
        """The target route's own mirror fields, as the user had them before any mirror step: taken once, at this run's first
        write - from the route as read, or, when the route mirrors to the canary already (a killed or held mirror step), from
        the record of an earlier run (``mirror_saved``)."""
        if self._original is None:
            route = self.change.locate(vs)[2]
            saved = (parse_annotation(vs, STATE_ANNOTATION) or {}).get("mirror_saved")
            self._original = saved if isinstance(saved, dict) and has_canary_mirror(route, self.canary) else mirror_fields(route)
        return self._original

    def _wait_for_mesh(self, obj):
        """Poll until the mesh reports the object's generation (status.observedGeneration), bounded by mesh_timeout."""
        generation = (obj.get("metadata") or {}).get("generation")
        deadline = self.now() + self.mesh_timeout
        while True:
            observed = (obj.get("status") or {}).get("observedGeneration")
            try:
                if generation is not None and observed is not None and int(observed) >= int(generation):
                    return True
            except (TypeError, ValueError):
                pass
            if self.now() >= deadline:
                return False
            self.sleep(self.poll_interval)
            obj = self.change.read()

    # -- where to start --------------------------------------------------------------------------
    def starting_point(self, vs):
        """``(index, failures, note)`` to start from, or ``(None, 0, note)`` when there is nothing to do."""
        self._check_lease(vs)
        state = parse_annotation(vs, STATE_ANNOTATION)
        _host, _index, route = self.change.locate(vs)
        live = current_weights(route)
        same = state and state.get("canary") == self.canary and state.get("stable") == self.stable
        if same and not self.restart and state.get("phase") == "promoted" and live.get(self.canary) == 100:
            return None, 0, "already promoted: %s carries 100%% of the traffic" % self.canary
        if state and state.get("phase") in ACTIVE_PHASES and not self.restart:
            if not same or state.get("plan") != self.plan_key:
                raise RolloutError("VirtualService %s/%s records an unfinished rollout (canary %s, stable %s, steps %s, %s at step %s);"
                                   " rerun with the same canary, stable and steps to resume it, or set restart: true to start over"
                                   % (self.change.namespace, self.change.name, state.get("canary"), state.get("stable"), state.get("plan"),
                                      state.get("phase"), int(state.get("step", 0)) + 1))
            index = int(state.get("step", 0))
            if not 0 <= index < len(self.steps):
                raise RolloutError("the recorded step %r is outside the plan; set restart: true to start over" % state.get("step"))
            return index, int(state.get("failures", 0)), "resuming %s at step %d (%s), as recorded" % (
                state.get("phase"), index + 1, describe_step(self.steps[index]))
        return 0, 0, "starting"

    # -- run -------------------------------------------------------------------------------------
    def run(self, check_mode=False, preflight=None):
        """Run (or plan) the rollout. Returns the result dict when it ends promoted, rolled back or held.
        ``preflight``: see _preflight; asked before the first write, in check mode too.

        Raises when it stops otherwise; the exception then carries ``result`` (a dict like the returned one:
        ``result`` ``not_started`` before this run wrote anything, ``stopped`` after, with the timeline and the
        weights in force) whenever the VirtualService could be read, and its message says where traffic is.
        """
        vs = self.change.read()
        base = dict(canary=self.canary, stable=self.stable, holder=self.holder)
        try:
            before = current_weights(self.change.locate(vs)[2])
            base["weights_before"] = before
            check_stable_and_canary(self.change, vs, self.stable, self.canary)
            index, failures, note = self.starting_point(vs)
            if index is not None:
                self._preflight(base, before, preflight)
        except Exception as exc:
            self._not_started(exc, dict(base, timeline=[]))
            raise
        base["note"] = note
        if index is None:
            return dict(base, changed=False, result="promoted", weights_after=before, timeline=[], schedule=[])
        schedule = self.schedule(index)
        if check_mode:
            total = sum(row["interval"] for row in schedule)
            return dict(base, changed=True, result="planned", weights_after=self.weights(100), timeline=[], schedule=schedule,
                        planned_seconds=total)
        self.log(note)
        self._remember(vs)
        base["schedule"] = schedule
        try:
            return self._steps(base, schedule, index, failures)
        except Cancelled as exc:  # SIGTERM, Ctrl-C, AWX's cancel, or the job that ran the module died
            return self._cancelled(base, exc, failures)
        except Exception as exc:  # an API error or a crashed check in the middle: do not leave the canary half-shifted
            if not self._started:
                self._not_started(exc, dict(base, timeline=self.timeline, failures=failures))
                raise
            if isinstance(exc, LeaseHeld):  # another run took over (force); the VirtualService is theirs now
                raise self._stopped(base, failures, str(exc), obj=exc.obj)
            return self._after_error(base, exc, failures)

    def _not_started(self, exc, base):
        not_started(exc, base, self.canary)

    def _in_force(self, obj=None):
        """``(weights, how)``: the weights on the VirtualService now (read again unless ``obj`` is given), or, when it
        cannot be read, the ones this run last wrote."""
        try:
            obj = obj or self.change.read()
            return current_weights(self.change.locate(obj)[2]), "in force"
        except Exception:  # pylint: disable=broad-except  # no answer: say what this run last wrote, and that it is that
            return dict(self._expected["weights"]) if self._expected else {}, "as this run last wrote them (the VirtualService could not be read)"

    def _share(self, weights):
        return "canary %s gets %s %% of the traffic" % (self.canary, weights.get(self.canary, 0))

    def _stopped(self, base, failures, reason, obj=None):
        """The error for a run that another run took over: result ``stopped``, the canary where it is, the weights in force.
        A LeaseHeld, like the refusal of a run that finds the lease held when it starts."""
        weights, how = self._in_force(obj)
        self.timeline.append(dict(step=self._step_index + 1, weights=weights, started=iso(self.now()), ended=iso(self.now()), action="stopped",
                                  reason=reason))
        message = "the rollout stopped: %s; traffic %s: %s (%s)" % (reason, how, format_weights(weights), self._share(weights))
        error = LeaseHeld(message, obj=obj)
        error.result = dict(base, changed=True, result="stopped", reason=reason, weights_after=weights, timeline=self.timeline, failures=failures)
        return error

    def _after_error(self, base, exc, failures):
        """An error after this run's first write: follow on_failure, and say where the traffic is either way."""
        index = min(self._step_index, len(self.steps) - 1)
        if self._failing is not None:  # the rollback or hold itself could not be written
            raise self._not_written(base, self._failing, exc, failures, index)
        reason = "the rollout stopped on an error at step %d (weight %d): %s" % (
            self._step_index + 1, self.steps[self._step_index]["weight"] if self._step_index < len(self.steps) else 100, exc)
        try:
            outcome = self._fail(base, index, failures, reason, 60)
        except Exception as second:  # pylint: disable=broad-except
            raise self._not_written(base, reason, second, failures, index, first=exc)
        after = outcome["weights_after"]
        error = RolloutError("%s; %s: traffic now %s (%s)" % (reason, outcome["result"].replace("_", " "), format_weights(after), self._share(after)))
        error.result = outcome
        raise error

    def _not_written(self, base, reason, exc, failures, index, first=None, policy=None):
        """The RolloutError for an on_failure write that failed: the canary keeps its share; say which and why."""
        if isinstance(exc, LeaseHeld):
            return self._stopped(base, failures, "%s; then %s" % (reason, exc), obj=exc.obj)
        weights, how = self._in_force()
        same = (first is not None and getattr(exc, "status", None) is not None and getattr(exc, "status", None) == getattr(first, "status", None)
                and getattr(exc, "verb", None) == getattr(first, "verb", None))
        detail = "it was refused the same way (HTTP %s)" % exc.status if same else str(exc)
        advice = ("Fix the cause and rerun with the same options: it resumes at the recorded step (this run's lease, %s, stands until it expires"
                  " unless the rerun sets force: true); or set the weights with onprem.mesh.traffic_split" % self.holder)
        policy = policy or self.on_failure
        self.timeline.append(dict(step=index + 1, weights=weights, started=iso(self.now()), ended=iso(self.now()), action="stopped",
                                  reason="%s; the %s was not written: %s" % (reason, policy, detail)))
        error = RolloutError("canary %s still gets %s %% of the traffic (weights %s: %s): %s; the %s that should have followed was not written: %s. %s"
                             % (self.canary, weights.get(self.canary, 0), how, format_weights(weights), reason, policy, detail, advice))
        error.result = dict(base, changed=True, result="stopped", reason=reason, weights_after=weights, timeline=self.timeline, failures=failures)
        return error

    def _preflight(self, base, before, preflight):
        """Before the canary's first traffic, ``preflight()`` (a dict with ``verdict``, ``checks``, ``reason``, as
        CanaryGate.preflight returns it) says whether the gate could judge the canary at all; ``base["preflight"]`` gets
        the report. A verdict other than pass raises a RolloutError before any write: the run ends not_started and
        the canary gets nothing. Not asked when the canary already has a share of the route as read (a resumed run):
        its step's analysis judges it, and on_failure applies. No ``preflight``: nothing checked, nothing reported."""
        if preflight is None:
            return
        share = before.get(self.canary, 0)
        if share:
            base["preflight"] = dict(verdict="skipped", checks=[], reason="canary %s already gets %s %% of the traffic: the analysis of"
                                     " its step judges it" % (self.canary, share))
            return
        report = base["preflight"] = preflight()
        if report.get("verdict") != "pass":
            raise RolloutError("preflight failed, so canary %s gets no traffic: %s" % (self.canary, report.get("reason")))

    def _start_window(self):
        """A step's analysis window starts now, after its write (and wait_for_mesh): the gate's token; the probe's window
        starts with it, so neither looks back at the previous weight's traffic."""
        token = self.gate.start_window()
        if self.probe is not None:
            self.probe.start_window()
        return token

    def _steps(self, base, schedule, index, failures):
        self._step_index = index
        while index < len(self.steps):
            self._step_index = index
            step = self.steps[index]
            entry = dict(step=index + 1, weight=step["weight"], weights=self.weights(step["weight"]), started=iso(self.now()))
            self._check_alive()  # no traffic shift without a living job
            started = self.now()
            reads_before = dict(getattr(self.change.store, "calls", {}))
            entry.update(step_fields(step))  # match or mirror
            try:
                written = self._write(step["weight"], "progressing", index, failures, interval=step["interval"])
            except ConcurrentChange as exc:
                if not self._started:
                    raise
                return self._concurrent_change(base, entry, exc, index, failures, step["interval"])
            if written["attempts"] > 1:
                entry["conflicts"] = written["attempts"] - 1
            if self.wait_for_mesh:
                if not self._wait_for_mesh(written["object"]):
                    entry.update(ended=iso(self.now()), verdict="fail", checks=[],
                                 reason="the mesh did not report generation %s within %ss (status.observedGeneration)"
                                 % ((written["object"].get("metadata") or {}).get("generation"), self.mesh_timeout))
                    self.timeline.append(entry)
                    return self._fail(base, index, failures + 1, entry["reason"], step["interval"])
                entry["mesh_ready"] = iso(self.now())
            token = self._start_window()
            gate = self._watch(started + step["interval"])
            if gate is not None and gate.get("command"):
                outcome = self._on_command(base, gate, index, failures, entry)
                if outcome is not None:
                    return outcome
                continue  # resumed: the step starts again, with a fresh window
            if gate is None:
                gate = self.gate.evaluate(token)
            else:
                entry["failed_early"] = True
            verdict = gate.get("verdict")
            entry.update(ended=iso(self.now()), seconds=round(self.now() - started, 3), verdict=verdict, checks=gate.get("checks", []))
            calls = getattr(self.change.store, "calls", None)
            if calls is not None:
                entry["api_calls"] = dict((k, calls[k] - reads_before.get(k, 0)) for k in calls)
            self.timeline.append(entry)
            if verdict == "pass":
                entry["action"] = "advance" if index + 1 < len(self.steps) else "promote"
                index += 1
                continue
            failures += 1
            reason = "step %d (%s): %s" % (index + 1, describe_step(step), gate.get("reason") or self._describe(gate))
            if failures > self.failure_limit:
                entry["action"] = self.on_failure
                return self._fail(base, index, failures, reason, step["interval"])
            entry["action"] = "retry"
            self.log("failed analysis %d of %d tolerated: %s" % (failures, self.failure_limit, reason))
        self._check_alive()
        return self._promote(base, failures)

    def _concurrent_change(self, base, entry, exc, index, failures, interval):
        """Another client changed the rollout's own fields: record it in the timeline, then on_failure."""
        entry.update(ended=iso(self.now()), action=self.on_failure, reason=str(exc),
                     concurrent_change=[dict(field=f, found=found, expected=expected) for f, found, expected in exc.changes])
        self.timeline.append(entry)
        self.log(str(exc))
        return self._fail(base, min(index, len(self.steps) - 1), failures, str(exc), interval, vs=exc.obj)

    def _watch(self, deadline):
        """Wait until ``deadline`` (the step's start plus its interval, so a rollout takes the sum of its intervals).
        On the way: every ``tick`` seconds, that the job still lives (``alive``; raises Cancelled when not); every
        ``command_every`` seconds, a look at the VirtualService for an operator's command or a takeover; with a
        probe, every ``probe_every`` seconds the probe, whose first *failing* result is returned at once (a probe's
        pass or inconclusive decides nothing, the full analysis at the deadline does). Returns None when the
        deadline came with nothing to act on, the failing probe result, or the command (a dict with ``command``)."""
        start = self.now()
        next_probe = start + self.probe_every if self.probe and self.probe_every else None
        next_look = start + self.command_every if self.command_every else None
        while True:
            now = self.now()
            if now >= deadline:
                return None
            wake = [deadline] + [t for t in (next_probe, next_look) if t is not None and t < deadline]
            if self.tick:
                wake.append(now + self.tick)
            self.sleep(max(0.0, min(wake) - now))  # a beat can be overdue: the look or probe before it took longer
            self._check_alive()
            now = self.now()
            if now >= deadline:
                return None
            if next_look is not None and now >= next_look:
                command = self._look()
                next_look = next_beat(next_look, self.command_every, self.now())
                if command is not None:
                    return command
            if next_probe is not None and now >= next_probe:
                early = self.probe.evaluate(None)
                next_probe = next_beat(next_probe, self.probe_every, self.now())
                if early.get("verdict") == "fail":
                    return early

    def _check_alive(self):
        if self.alive is not None:
            gone = self.alive()
            if gone:
                raise Cancelled(gone)

    def _look(self):
        """One read of the VirtualService while waiting: another run's takeover stops this one (LeaseHeld); an operator's
        command this run has not acted on yet is returned (a dict with ``command``)."""
        vs = self.change.read()
        self._check_taken_over(vs)
        posted = parse_annotation(vs, COMMAND_ANNOTATION)
        if posted and posted.get("command") in COMMANDS and posted.get("id") != (self._ack or {}).get("id"):
            return dict(posted, vs=vs)
        return None

    # -- operator commands -------------------------------------------------------------------------
    def _by(self, command):
        return "%s by %s%s" % (command["command"], command.get("by") or "an operator",
                               ": %s" % command["reason"] if command.get("reason") else "")

    def _on_command(self, base, command, index, failures, entry):
        """Act on an operator's command during step ``index``. Returns the rollout's result for abort and promote, or
        None when the step is to start again (after pause and resume, or a resume that found nothing paused)."""
        self._ack = command
        vs = command.pop("vs", None)
        what = command["command"]
        entry.update(ended=iso(self.now()), action=what, command=dict((k, command.get(k)) for k in ("id", "by", "reason", "at") if command.get(k)))
        self.timeline.append(entry)
        self.log("operator command: %s" % self._by(command))
        if what == "abort":
            return self._abort(base, index, failures, "aborted (%s)" % self._by(command), vs)
        if what == "promote":
            return self._promote(base, failures, manual=command, vs=vs)
        if what == "pause":
            return self._pause(base, index, failures, command, vs)
        self._write(None, "progressing", index, failures, interval=self.steps[index]["interval"], vs=vs)  # a resume with nothing paused
        return None

    def _abort(self, base, index, failures, reason, vs=None):
        """All traffic to stable, the lease released, phase ``aborted`` - whatever on_failure says."""
        self._failing = reason
        written = self._write(0, "aborted", index, failures, reason=reason, release=True, final=True, vs=vs)
        weights = current_weights(self.change.locate(written["object"])[2])
        self.timeline.append(dict(step=index + 1, weight=0, weights=weights, started=iso(self.now()), ended=iso(self.now()),
                                  action="aborted", reason=reason))
        return dict(base, changed=True, result="aborted", reason=reason, weights_after=weights, timeline=self.timeline, failures=failures)

    def _pause(self, base, index, failures, command, vs):
        """Stay at step ``index`` with its weights until resume (the step starts again), abort, promote, or
        ``pause_timeout`` (then a hold: the weights stay, the lease is released, a rerun resumes the step)."""
        interval = self.steps[index]["interval"]
        self._write(None, "paused", index, failures, reason="paused (%s)" % self._by(command), interval=self.pause_timeout, vs=vs)
        deadline = self.now() + self.pause_timeout
        every = self.command_every or self.poll_interval
        next_look = self.now() + every
        while True:
            now = self.now()
            if now >= deadline:
                reason = "paused for longer than pause_timeout (%ss) at step %d (%s), without resume, abort or promote" % (
                    _fmt(self.pause_timeout), index + 1, describe_step(self.steps[index]))
                return self._fail(base, index, failures, reason, interval, policy="hold")
            self.sleep(max(0.0, min([next_look, deadline] + ([now + self.tick] if self.tick else [])) - now))
            self._check_alive()
            if self.now() < next_look:
                continue
            command = self._look()
            next_look = next_beat(next_look, every, self.now())
            if command is None:
                continue
            entry = dict(step=index + 1, weight=self.steps[index]["weight"], weights=self.weights(self.steps[index]["weight"]), started=iso(now))
            if command["command"] == "pause":  # paused already: just say so
                self._ack = command
                self._write(None, "paused", index, failures, reason="paused (%s)" % self._by(command), interval=self.pause_timeout,
                            vs=command.pop("vs"))
                continue
            if command["command"] == "resume":
                self._ack = command
                self.timeline.append(dict(entry, ended=iso(self.now()), action="resume", command=dict(
                    (k, command.get(k)) for k in ("id", "by", "reason", "at") if command.get(k))))
                self._write(None, "progressing", index, failures, interval=interval, vs=command.pop("vs"))
                return None
            return self._on_command(base, command, index, failures, entry)

    def _promote(self, base, failures, manual=None, vs=None):
        """100 % to the canary, the lease released, phase ``promoted`` (``manual``: the operator's promote command)."""
        self._step_index = len(self.steps)
        entry = dict(step=len(self.steps) + 1, weight=100, weights=self.weights(100), started=iso(self.now()))
        reason = "promoted by hand (%s)" % self._by(manual) if manual else None
        try:
            written = self._write(100, "promoted", len(self.steps), failures, reason=reason, release=True, vs=vs)
        except ConcurrentChange as exc:
            return self._concurrent_change(base, entry, exc, len(self.steps), failures, 60)
        entry.update(ended=iso(self.now()), action="promoted")
        if manual:
            entry["manual"] = True
        if written["attempts"] > 1:
            entry["conflicts"] = written["attempts"] - 1
        self.timeline.append(entry)
        result = dict(base, changed=True, result="promoted", weights_after=self.weights(100), timeline=self.timeline, failures=failures)
        if manual:
            result["promoted_by"] = dict((k, manual.get(k)) for k in ("id", "by", "reason", "at") if manual.get(k))
            result["reason"] = reason
        return result

    # -- cancel and kill -----------------------------------------------------------------------------
    def _cancelled(self, base, exc, failures):
        """The job was cancelled or died: on_cancel (rollback or hold), the lease released; raises a RolloutError with
        ``result`` ``cancelled`` (``on_cancel`` says which was done)."""
        index = min(self._step_index, len(self.steps) - 1)
        what = describe_step(self.steps[self._step_index]) if self._step_index < len(self.steps) else "weight 100"
        reason = "cancelled (%s) at step %d (%s)" % (exc.reason, self._step_index + 1, what)
        if not self._started:
            weights = base.get("weights_before") or {}
            error = RolloutError("%s; this run wrote nothing: traffic stays %s (%s)" % (reason, format_weights(weights), self._share(weights)))
            error.result = dict(base, changed=False, result="cancelled", on_cancel=self.on_cancel, reason=reason, weights_after=weights,
                                timeline=self.timeline, failures=failures)
            raise error
        try:
            vs = self.change.read()
            state = parse_annotation(vs, STATE_ANNOTATION) or {}
            if state.get("holder") == self.holder and state.get("phase") in ("promoted", "rolled_back", "aborted"):
                # the write the signal interrupted had landed and ended the rollout: nothing left to undo
                weights = current_weights(self.change.locate(vs)[2])
                error = RolloutError("%s, after the rollout had ended %s: traffic now %s (%s)" % (
                    reason, state["phase"].replace("_", " "), format_weights(weights), self._share(weights)))
                error.result = dict(base, changed=True, result=state["phase"], reason=reason, weights_after=weights, timeline=self.timeline,
                                    failures=failures)
                raise error
            outcome = self._fail(base, index, failures, reason, 60, vs=vs, policy=self.on_cancel)
        except RolloutError:
            raise
        except Exception as second:  # pylint: disable=broad-except
            raise self._not_written(base, reason, second, failures, index, policy=self.on_cancel)
        outcome.update(result="cancelled", on_cancel=self.on_cancel)
        after = outcome["weights_after"]
        error = RolloutError("%s; %s: traffic now %s (%s)" % (
            reason, "rolled back" if self.on_cancel == "rollback" else "held", format_weights(after), self._share(after)))
        error.result = outcome
        raise error

    def abandoned(self, reason):
        """For a run whose process was killed outright (SIGKILL, the OOM killer), called from the process that outlived
        it (``job_watch.Guardian``): when the VirtualService still records this run as active and its lease as this
        run's, apply on_cancel and release the lease. Returns the phase written, or None when there was nothing of this run's to end."""
        vs = self.change.read()
        lease = parse_annotation(vs, LEASE_ANNOTATION) or {}
        state = parse_annotation(vs, STATE_ANNOTATION) or {}
        if lease.get("holder") != self.holder or state.get("holder") != self.holder or state.get("phase") not in ACTIVE_PHASES:
            return None
        self._started, self._expected, self._ack = True, None, None
        index = min(max(int(state.get("step", 0)), 0), len(self.steps) - 1)
        reason = "cancelled (%s) at step %d (%s)" % (reason, index + 1, describe_step(self.steps[index]))
        if self.on_cancel == "rollback":
            self._write(0, "rolled_back", index, int(state.get("failures", 0)), reason=reason, release=True, final=True, vs=vs)
            return "rolled_back"
        self._write(None, "held", index, int(state.get("failures", 0)), reason=reason, release=True, final=True, vs=vs)
        return "held"

    @staticmethod
    def _describe(gate):
        failed = [c for c in gate.get("checks", []) if c.get("verdict") != "pass"]
        return "; ".join("%s %s (value %s, threshold %s)" % (c.get("name"), c.get("verdict"), c.get("value"), c.get("threshold"))
                         for c in failed) or "verdict %s" % gate.get("verdict")

    def _fail(self, base, index, failures, reason, interval, vs=None, policy=None):
        """on_failure: rollback (all traffic to stable) or hold (the weights as they are). Each is one guarded write,
        retried on conflicts; only another run's takeover of the lease stops it. A change another client made to the
        rollout's own fields since its last write is named in the reason (it is undone by a rollback, kept by a hold)."""
        self._failing = reason
        vs = vs or self.change.read()
        changes = self._changed_by_others(vs)
        if changes and "another client changed" not in reason:
            reason = "%s; meanwhile another client had changed %s" % (
                reason, "; ".join("%s: found %s, the rollout had written %s" % c for c in changes))
            self._failing = reason
        if (policy or self.on_failure) == "rollback":
            written = self._write(0, "rolled_back", index, failures, reason=reason, release=True, final=True, vs=vs)
            weights = current_weights(self.change.locate(written["object"])[2])
            self.timeline.append(dict(step=index + 1, weight=0, weights=weights, started=iso(self.now()), ended=iso(self.now()),
                                      action="rolled_back", reason=reason))
            return dict(base, changed=True, result="rolled_back", reason=reason, weights_after=weights, timeline=self.timeline, failures=failures)
        written = self._write(None, "held", index, failures, reason=reason, interval=interval, release=True, final=True, vs=vs)
        live = current_weights(self.change.locate(written["object"])[2])
        self.timeline.append(dict(step=index + 1, weight=live.get(self.canary, 0), weights=live, started=iso(self.now()), ended=iso(self.now()),
                                  action="held", reason=reason))
        return dict(base, changed=True, result="held", reason=reason, weights_after=live, timeline=self.timeline, failures=failures)


# -- operator commands from outside the running rollout (the canary_command module) --------------------------------

def command_status(vs, now):
    """What the VirtualService records: ``(state, lease, live)``; ``live`` when a rollout holds an unexpired lease and
    is progressing or paused - a running job that looks for commands."""
    state = parse_annotation(vs, STATE_ANNOTATION)
    lease = parse_annotation(vs, LEASE_ANNOTATION)
    live = bool(state and lease and lease.get("holder") == state.get("holder") and float(lease.get("expires", 0)) > now
                and state.get("phase") in ("progressing", "paused"))
    return state, lease, live


def _describe_state(state, lease, now):
    if not state:
        return "no rollout is recorded on it"
    text = "the last rollout (canary %s, stable %s) is %s at step %s" % (
        state.get("canary"), state.get("stable"), state.get("phase"), int(state.get("step", 0)) + 1)
    if lease:
        left = float(lease.get("expires", 0)) - now
        text += ", its lease (%s) %s" % (lease.get("holder"), "expired %d s ago" % -left if left <= 0 else "runs %d s more" % left)
    return text


def operator_command(change, command, by=None, reason=None, check_mode=False, wait=True, timeout=60.0, now=time.time, sleep=time.sleep,
                     poll_interval=1.0, command_id=None):
    """Post ``command`` (abort, pause, resume, promote) to the rollout running on the VirtualService, or, with no rollout
    running, do abort or promote directly (a run that died or was held: its canary and stable come from the state).

    Returns a dict: changed, command, id, posted (to a running rollout) or direct, acknowledged, phase, weights_before,
    weights_after, state. Raises RolloutError when the command makes no sense here, naming why and what to do."""
    if command not in COMMANDS:
        raise RolloutError("command: one of %s, got %r" % (", ".join(COMMANDS), command))
    vs = change.read()
    state, lease, live = command_status(vs, now())
    where = "VirtualService %s/%s" % (change.namespace, change.name)
    before = current_weights(change.locate(vs)[2])
    base = dict(command=command, weights_before=before, state=state)
    if state and state.get("phase") == "paused" and command == "pause" or state and state.get("phase") == "progressing" and command == "resume":
        return dict(base, changed=False, acknowledged=True, phase=state.get("phase"), weights_after=before,
                    msg="%s is already %s: nothing to do" % (where, state.get("phase")))
    if not live:
        if command in ("pause", "resume"):
            raise RolloutError("command: no rollout is running on %s (%s); %s acts on a running rollout. A held or paused rollout whose job"
                               " ended goes on when its job is run again with the same options (it resumes at the recorded step);"
                               " abort or promote end it from here" % (where, _describe_state(state, lease, now()), command))
        if not state or not state.get("canary") or not state.get("stable"):
            raise RolloutError("command: %s: %s, so its canary and stable subsets are unknown; set the weights with"
                               " onprem.mesh.traffic_split instead" % (where, _describe_state(state, lease, now())))
        return _direct(change, vs, state, command, by, reason, check_mode, now, base, command_id)
    posted = dict(command=command, id=command_id or uuid.uuid4().hex[:12], at=iso(now()))
    if by:
        posted["by"] = by
    if reason:
        posted["reason"] = reason
    result = dict(base, changed=True, id=posted["id"], posted=True, holder=lease.get("holder"), weights_after=before)
    if check_mode:
        return dict(result, acknowledged=False, phase=state.get("phase"),
                    msg="would post %s to the rollout %s running on %s" % (command, lease.get("holder"), where))
    pending = parse_annotation(vs, COMMAND_ANNOTATION)

    def guard(obj):
        _s, _l, still = command_status(obj, now())
        if not still:
            raise RolloutError("command: the rollout on %s ended while the command was being posted (%s); nothing was posted"
                               % (where, _describe_state(_s, _l, now())))

    change.apply(None, validate=False, vs=vs, guard=guard,
                 extra_ops=lambda obj: annotation_tests(obj, (COMMAND_ANNOTATION,)) + annotation_ops(
                     obj, {COMMAND_ANNOTATION: json.dumps(posted, sort_keys=True)}))
    if pending and pending.get("id") != posted["id"]:
        result["replaced"] = pending
    if not wait:
        return dict(result, acknowledged=False, phase=state.get("phase"),
                    msg="posted %s to the rollout %s running on %s; it acts on it within its watch interval" % (command, lease.get("holder"), where))
    deadline = now() + timeout
    while True:
        sleep(poll_interval)
        vs = change.read()
        state = parse_annotation(vs, STATE_ANNOTATION) or {}
        if (state.get("command") or {}).get("id") == posted["id"]:
            weights = current_weights(change.locate(vs)[2])
            return dict(result, acknowledged=True, phase=state.get("phase"), state=state, weights_after=weights,
                        msg="the rollout %s acted on %s: phase %s, traffic now %s" % (
                            lease.get("holder"), command, state.get("phase"), format_weights(weights)))
        if now() >= deadline:
            error = RolloutError("command: the rollout %s running on %s did not act on %s within %ss (wait_timeout); the command stays"
                                 " posted and the rollout acts on it at its next look, unless its job is gone (then its lease expires at %s"
                                 " and abort or promote act directly)" % (lease.get("holder"), where, command, _fmt(timeout),
                                                                          iso(float(lease.get("expires", 0)))))
            error.result = dict(result, acknowledged=False, phase=state.get("phase"), weights_after=current_weights(change.locate(vs)[2]))
            raise error


def _direct(change, vs, state, command, by, reason, check_mode, now, base, command_id):
    """abort or promote with no rollout running: the weights (0 or 100 to the recorded canary), the state, no lease."""
    canary, stable = state["canary"], state["stable"]
    weight = 0 if command == "abort" else 100
    weights = {stable: 100 - weight, canary: weight}
    phase = "aborted" if command == "abort" else "promoted"
    done = dict((k, v) for k, v in (("id", command_id or uuid.uuid4().hex[:12]), ("command", command), ("by", by), ("at", iso(now())))
                if v is not None)
    new_state = dict(state, phase=phase, updated=iso(now()), command=done,
                     reason="%s by %s%s (no rollout was running)" % ("aborted" if command == "abort" else "promoted by hand",
                                                                     by or "an operator", ": %s" % reason if reason else ""))

    def guard(obj):
        _s, lease, live = command_status(obj, now())
        if live or lease and float(lease.get("expires", 0)) > now() and lease.get("holder") != state.get("holder"):
            raise RolloutError("command: a rollout (%s) started on %s/%s meanwhile; rerun the command to send it there"
                               % ((lease or {}).get("holder"), change.namespace, change.name))

    def record(obj):
        return annotation_tests(obj, (STATE_ANNOTATION, LEASE_ANNOTATION)) + annotation_ops(
            obj, {STATE_ANNOTATION: json.dumps(new_state, sort_keys=True), LEASE_ANNOTATION: None, COMMAND_ANNOTATION: None})

    if state.get("phase") == phase and current_weights(change.locate(vs)[2]) == weights:
        return dict(base, changed=False, direct=True, acknowledged=True, phase=phase, weights_after=base["weights_before"],
                    msg="already %s: traffic %s" % (phase, format_weights(base["weights_before"])))
    written = change.apply(weights, check_mode=check_mode, vs=vs, guard=guard, extra_ops=record)
    verb = "would set" if check_mode else "set"
    return dict(base, changed=True, direct=True, acknowledged=not check_mode, phase=phase, state=new_state, weights_after=written["after"],
                id=done["id"], msg="no rollout was running on %s/%s: %s traffic %s, phase %s" % (
                    change.namespace, change.name, verb, format_weights(written["after"]), phase))
