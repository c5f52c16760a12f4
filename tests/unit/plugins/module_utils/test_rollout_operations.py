# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Operator commands (abort, pause, resume, promote), cancel and the death of the job, through the engine's public
functions, on the fake API server and a fake clock (a 5-step rollout runs in milliseconds)."""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json

import pytest

from ansible_collections.onprem.mesh.plugins.module_utils import rollout as ro
from ansible_collections.onprem.mesh.plugins.module_utils.traffic import WeightChange, current_weights
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.fake_istio import FakeIstio
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.test_rollout import Clock, Gate, Probe, annotations, objects, state

START = 1_700_000_000.0


class Timed(Clock):
    """A clock that runs ``events`` (time offset from the start -> function) once the time passes their offset."""

    def __init__(self, events=None):
        super(Timed, self).__init__()
        self.events = sorted((events or {}).items())

    def sleep(self, seconds):
        super(Timed, self).sleep(seconds)
        while self.events and self.t - START >= self.events[0][0]:
            self.events.pop(0)[1]()


def make(events=None, steps=(5, 10, 25, 50), verdicts=None, **kwargs):
    store = FakeIstio(objects())
    clock = Timed(events)
    gate = Gate(store, verdicts)
    change = WeightChange(store, "shop", "payment", route_name="primary", sleep=lambda s: None)
    plan = ro.plan_steps(list(steps), interval=kwargs.pop("interval", "30s"))
    kwargs.setdefault("command_every", 5)
    rollout = ro.Rollout(change, gate, "v1", "v2", plan, now=clock.now, sleep=clock.sleep, holder="run-1", **kwargs)
    return store, gate, clock, rollout


def weights(store):
    return current_weights(store.route("payment", "shop", 1))


# -- abort, promote -------------------------------------------------------------------------------------------------

def test_abort_during_a_step_puts_all_traffic_on_stable_and_releases_the_lease():
    store = None
    box = {}

    def abort():
        box["posted"] = ro.operator_command(WeightChange(store, "shop", "payment", route_name="primary"), "abort", by="alice",
                                            reason="support desk", wait=False, now=clock.now, command_id="c-1")

    store, gate, clock, rollout = make({40: abort})   # step 2 (weight 10) runs from 30 s to 60 s
    result = rollout.run()
    assert box["posted"]["posted"] is True and box["posted"]["holder"] == "run-1" and box["posted"]["acknowledged"] is False
    assert result["result"] == "aborted" and result["weights_after"] == {"v1": 100, "v2": 0}
    assert result["reason"] == "aborted (abort by alice: support desk)"
    assert weights(store) == {"v1": 100, "v2": 0}
    assert ro.LEASE_ANNOTATION not in annotations(store) and ro.COMMAND_ANNOTATION not in annotations(store)
    recorded = state(store)
    assert recorded["phase"] == "aborted" and recorded["step"] == 1 and recorded["command"]["id"] == "c-1"
    assert recorded["command"]["by"] == "alice"
    assert gate.seen == [5]   # step 2 was never analysed
    assert [e["action"] for e in result["timeline"]] == ["advance", "abort", "aborted"]
    assert clock.t - START == 40   # acted at the first look after the command (every 5 s)


def test_abort_acts_within_one_command_interval():
    store = None

    def abort():
        ro.operator_command(WeightChange(store, "shop", "payment", route_name="primary"), "abort", wait=False, now=clock.now)

    store, _gate, clock, rollout = make({33: abort}, command_every=4)
    rollout.run()
    assert clock.t - START == 34   # looks at 34, 38, ... after the step began at 30


def test_promote_during_a_step_gives_the_canary_everything_as_a_manual_promotion():
    store = None

    def promote():
        ro.operator_command(WeightChange(store, "shop", "payment", route_name="primary"), "promote", by="bob", reason="verified",
                            wait=False, now=clock.now, command_id="p-9")

    store, gate, clock, rollout = make({10: promote})
    result = rollout.run()
    assert result["result"] == "promoted" and weights(store) == {"v1": 0, "v2": 100}
    assert result["promoted_by"] == {"id": "p-9", "by": "bob", "reason": "verified", "at": "2023-11-14T22:13:30.000Z"}
    assert result["reason"] == "promoted by hand (promote by bob: verified)"
    assert result["timeline"][-1]["manual"] is True and result["timeline"][-1]["action"] == "promoted"
    assert state(store)["phase"] == "promoted" and state(store)["command"]["id"] == "p-9"
    assert ro.LEASE_ANNOTATION not in annotations(store) and ro.COMMAND_ANNOTATION not in annotations(store)
    assert gate.seen == []


def test_without_command_every_no_look_is_made():
    store = None

    def abort():
        ro.operator_command(WeightChange(store, "shop", "payment", route_name="primary"), "abort", wait=False, now=clock.now)

    store, _gate, clock, rollout = make({10: abort}, command_every=None)
    result = rollout.run()
    assert result["result"] == "promoted" and store.calls["read"] == 1 + 5 + 1 + 1   # run, 5 writes, the DestinationRules, abort's read
    assert json.loads(annotations(store)[ro.COMMAND_ANNOTATION])["command"] == "abort"   # posted, never looked for


# -- pause, resume -------------------------------------------------------------------------------------------------

def test_pause_holds_the_step_and_resume_starts_it_again():
    store = None
    change = {}

    def command(what, cid):
        def go():
            ro.operator_command(WeightChange(store, "shop", "payment", route_name="primary"), what, by="carol", wait=False, now=clock.now,
                                command_id=cid)
            change[what] = (clock.t - START, dict(state(store)), weights(store))
        return go

    store, gate, clock, rollout = make({12: command("pause", "p-1"), 200: command("resume", "r-1")}, pause_timeout=600)
    result = rollout.run()
    assert result["result"] == "promoted"
    # while paused (from 15 s, the first look after 12 s, to 200 s): phase paused, weights of step 1, a lease for the pause
    when, during, held = change["resume"]
    assert during["phase"] == "paused" and during["command"]["id"] == "p-1" and held == {"v1": 95, "v2": 5}
    assert "paused (pause by carol)" == during["reason"]
    actions = [e["action"] for e in result["timeline"]]
    assert actions == ["pause", "resume", "advance", "advance", "advance", "promote", "promoted"]
    # the step started again after the resume (at the first look after 200 s), with a fresh window of 30 s
    assert gate.windows == 5 and gate.seen == [5, 10, 25, 50]
    assert result["timeline"][2]["started"] == ro.iso(START + 200)
    assert clock.t - START == 200 + 4 * 30


def test_the_lease_of_a_paused_rollout_lasts_the_pause_timeout():
    store = None
    seen = {}

    def look():
        seen["lease"] = json.loads(annotations(store)[ro.LEASE_ANNOTATION])

    def pause():
        ro.operator_command(WeightChange(store, "shop", "payment", route_name="primary"), "pause", wait=False, now=clock.now)

    store, _gate, clock, rollout = make({3: pause, 6: look}, pause_timeout=900, failure_limit=0)
    rollout.run()
    assert seen["lease"] == {"holder": "run-1", "expires": START + 5 + 900 + 120}


def test_a_pause_without_resume_ends_held_after_pause_timeout():
    store = None

    def pause():
        ro.operator_command(WeightChange(store, "shop", "payment", route_name="primary"), "pause", wait=False, now=clock.now)

    store, gate, clock, rollout = make({31: pause}, pause_timeout=100)
    result = rollout.run()
    assert result["result"] == "held" and weights(store) == {"v1": 90, "v2": 10}
    assert result["reason"] == ("paused for longer than pause_timeout (100s) at step 2 (weight 10), without resume, abort or promote")
    assert state(store)["phase"] == "held" and ro.LEASE_ANNOTATION not in annotations(store)
    assert clock.t - START == 35 + 100
    assert gate.seen == [5]


def test_abort_while_paused():
    store = None

    def command(what):
        return lambda: ro.operator_command(WeightChange(store, "shop", "payment", route_name="primary"), what, wait=False, now=clock.now)

    store, _gate, clock, rollout = make({2: command("pause"), 50: command("abort")})
    result = rollout.run()
    assert result["result"] == "aborted" and weights(store) == {"v1": 100, "v2": 0}
    assert [e["action"] for e in result["timeline"]] == ["pause", "abort", "aborted"]
    assert clock.t - START == 50


# -- operator_command with no rollout running, and its refusals ----------------------------------------------------

def finished(phase="held", stable=60, canary=40, lease=None):
    store = FakeIstio(objects(stable, canary))
    vs = store.objects[("virtualservices", "shop", "payment")]
    vs["metadata"]["annotations"] = {ro.STATE_ANNOTATION: json.dumps(dict(canary="v2", stable="v1", phase=phase, step=2, holder="run-0", plan=[5, 10, 40]))}
    if lease:
        vs["metadata"]["annotations"][ro.LEASE_ANNOTATION] = json.dumps(lease)
    return store, WeightChange(store, "shop", "payment", route_name="primary")


def record(store, **recorded):
    """Replace the rollout's recorded state on the VirtualService."""
    store.objects[("virtualservices", "shop", "payment")]["metadata"]["annotations"][ro.STATE_ANNOTATION] = json.dumps(recorded)


def guardian_over(change, **options):
    """A rollout (make's, with ``options``) whose run is over ``change``: what the guardian of a killed module holds."""
    _s, _g, _c, guardian = make(**options)
    guardian.change = change
    return guardian


def test_abort_of_a_held_rollout_whose_job_ended_sets_the_weights_itself():
    store, change = finished(lease={"holder": "run-0", "expires": START - 1})
    out = ro.operator_command(change, "abort", by="dave", now=lambda: START, command_id="a-1")
    assert out["direct"] is True and out["changed"] is True and out["phase"] == "aborted"
    assert out["weights_before"] == {"v1": 60, "v2": 40} and out["weights_after"] == {"v1": 100, "v2": 0}
    assert weights(store) == {"v1": 100, "v2": 0}
    recorded = state(store)
    assert recorded["phase"] == "aborted" and recorded["command"] == {"id": "a-1", "command": "abort", "by": "dave", "at": ro.iso(START)}
    assert recorded["reason"] == "aborted by dave (no rollout was running)" and recorded["plan"] == [5, 10, 40]
    assert ro.LEASE_ANNOTATION not in annotations(store)
    again = ro.operator_command(change, "abort", now=lambda: START)
    assert again["changed"] is False and store.calls["write"] == 1


def test_promote_of_a_held_rollout_in_check_mode_writes_nothing():
    store, change = finished()
    out = ro.operator_command(change, "promote", check_mode=True, now=lambda: START)
    assert out["weights_after"] == {"v1": 0, "v2": 100} and out["changed"] is True and out["acknowledged"] is False
    assert store.calls["write"] == 0 and weights(store) == {"v1": 60, "v2": 40}


def test_check_mode_for_a_running_rollout_posts_nothing():
    store, change = finished("progressing", lease={"holder": "run-0", "expires": START + 100})
    out = ro.operator_command(change, "abort", check_mode=True, now=lambda: START)
    assert out["posted"] is True and out["acknowledged"] is False and out["msg"] == (
        "would post abort to the rollout run-0 running on VirtualService shop/payment")
    assert store.calls["write"] == 0 and ro.COMMAND_ANNOTATION not in annotations(store)


@pytest.mark.parametrize("command, phase, message", [
    ("pause", "held", r"command: no rollout is running on VirtualService shop/payment \(the last rollout \(canary v2, stable v1\) is held at"
                      r" step 3, its lease \(run-0\) expired 1 s ago\); pause acts on a running rollout"),
    ("resume", "paused", r"no rollout is running .* is paused at step 3.*; resume acts on a running rollout\. A held or paused rollout whose job"
                         r" ended goes on when its job is run again"),
])
def test_pause_and_resume_need_a_running_rollout(command, phase, message):
    store, change = finished(phase, lease={"holder": "run-0", "expires": START - 1})
    with pytest.raises(ro.RolloutError, match=message):
        ro.operator_command(change, command, now=lambda: START)
    assert store.calls["write"] == 0


def test_abort_without_a_recorded_rollout_points_to_traffic_split():
    store = FakeIstio(objects(80, 20))
    with pytest.raises(ro.RolloutError, match="no rollout is recorded on it, so its canary and stable subsets are unknown; set the weights with"
                                              " onprem.mesh.traffic_split"):
        ro.operator_command(WeightChange(store, "shop", "payment", route_name="primary"), "abort", now=lambda: START)
    assert store.calls["write"] == 0


def test_an_unknown_command_is_refused():
    store, change = finished()
    with pytest.raises(ro.RolloutError, match="command: one of abort, pause, resume, promote, got 'stop'"):
        ro.operator_command(change, "stop", now=lambda: START)


def test_a_command_waits_for_the_rollout_to_act_and_times_out_saying_what_stays():
    store, change = finished("progressing", lease={"holder": "run-0", "expires": START + 500})
    clock = Clock()
    with pytest.raises(ro.RolloutError, match=r"the rollout run-0 running on VirtualService shop/payment did not act on pause within 3s"
                                              r" \(wait_timeout\); the command stays posted") as caught:
        ro.operator_command(change, "pause", timeout=3, now=clock.now, sleep=clock.sleep)
    assert caught.value.result["acknowledged"] is False
    assert json.loads(annotations(store)[ro.COMMAND_ANNOTATION])["command"] == "pause"
    assert clock.slept == [1.0, 1.0, 1.0]


def test_a_command_returns_once_the_rollout_recorded_its_id():
    store, change = finished("progressing", lease={"holder": "run-0", "expires": START + 500})
    clock = Clock()

    def rollout_acts(seconds):
        clock.sleep(seconds)
        vs = store.objects[("virtualservices", "shop", "payment")]
        posted = json.loads(vs["metadata"]["annotations"][ro.COMMAND_ANNOTATION])
        current = json.loads(vs["metadata"]["annotations"][ro.STATE_ANNOTATION])
        vs["metadata"]["annotations"][ro.STATE_ANNOTATION] = json.dumps(dict(current, phase="paused", command={"id": posted["id"]}))

    out = ro.operator_command(change, "pause", now=clock.now, sleep=rollout_acts, command_id="x")
    assert out["acknowledged"] is True and out["phase"] == "paused" and out["id"] == "x" and clock.slept == [1.0]


def test_a_newer_command_replaces_one_not_acted_on_and_is_reported():
    store, change = finished("progressing", lease={"holder": "run-0", "expires": START + 500})
    ro.operator_command(change, "pause", wait=False, now=lambda: START, command_id="first")
    out = ro.operator_command(change, "abort", wait=False, now=lambda: START, command_id="second")
    assert out["replaced"]["id"] == "first"
    assert json.loads(annotations(store)[ro.COMMAND_ANNOTATION])["id"] == "second"


# -- cancel, the death of the job, a killed module ------------------------------------------------------------------

def cancel_at(offset, reason="SIGTERM"):
    def cancel():
        raise ro.Cancelled(reason)
    return {offset: cancel}


def test_a_cancel_rolls_back_releases_the_lease_and_says_so():
    store, gate, clock, rollout = make(cancel_at(45))
    with pytest.raises(ro.RolloutError, match=r"^cancelled \(SIGTERM\) at step 2 \(weight 10\); rolled back: traffic now v1=100, v2=0"
                                              r" \(canary v2 gets 0 % of the traffic\)$") as caught:
        rollout.run()
    result = caught.value.result
    assert result["result"] == "cancelled" and result["on_cancel"] == "rollback" and result["weights_after"] == {"v1": 100, "v2": 0}
    assert weights(store) == {"v1": 100, "v2": 0} and ro.LEASE_ANNOTATION not in annotations(store)
    assert state(store)["phase"] == "rolled_back" and state(store)["reason"] == "cancelled (SIGTERM) at step 2 (weight 10)"
    assert store.calls["write"] == 3 and gate.seen == [5]


def test_a_cancel_with_on_cancel_hold_keeps_the_weights_and_a_rerun_resumes():
    store, _gate, _clock, rollout = make(cancel_at(45), on_cancel="hold")
    with pytest.raises(ro.RolloutError, match=r"cancelled \(SIGTERM\) at step 2 \(weight 10\); held: traffic now v1=90, v2=10") as caught:
        rollout.run()
    assert caught.value.result["on_cancel"] == "hold" and weights(store) == {"v1": 90, "v2": 10}
    assert state(store)["phase"] == "held" and ro.LEASE_ANNOTATION not in annotations(store)
    clock = Clock()
    gate = Gate(store)
    again = ro.Rollout(WeightChange(store, "shop", "payment", route_name="primary"), gate, "v1", "v2",
                       ro.plan_steps([5, 10, 25, 50], interval="30s"), now=clock.now, sleep=clock.sleep, holder="run-2")
    result = again.run()
    assert result["note"] == "resuming held at step 2 (weight 10), as recorded" and result["result"] == "promoted"


def test_a_cancel_before_the_first_write_writes_nothing():
    store, _gate, _clock, rollout = make()
    rollout.alive = lambda: "the process that ran this job ended: ansible-playbook (pid 7)"
    with pytest.raises(ro.RolloutError, match=r"^cancelled \(the process that ran this job ended: ansible-playbook \(pid 7\)\) at step 1"
                                              r" \(weight 5\); this run wrote nothing: traffic stays v1=100, v2=0") as caught:
        rollout.run()
    assert caught.value.result["result"] == "cancelled" and caught.value.result["changed"] is False
    assert store.calls["write"] == 0


def test_the_death_of_the_job_is_noticed_within_one_tick_and_rolls_back():
    store, _gate, clock, rollout = make(tick=1.0)
    rollout.alive = lambda: "the process that ran this job ended: ansible-playbook (pid 7)" if clock.t - START >= 42.5 else None
    with pytest.raises(ro.RolloutError, match=r"^cancelled \(the process that ran this job ended: ansible-playbook \(pid 7\)\) at step 2"):
        rollout.run()
    assert clock.t - START == 43 and weights(store) == {"v1": 100, "v2": 0}


def test_without_ticks_the_job_is_checked_before_every_step_and_no_shift_follows_its_death():
    store, gate, clock, rollout = make()
    rollout.alive = lambda: "gone" if gate.seen else None   # dies once step 1 was analysed
    with pytest.raises(ro.RolloutError, match=r"^cancelled \(gone\) at step 2 \(weight 10\); rolled back"):
        rollout.run()
    assert [p for p in store.patches if any(op.get("path", "").endswith("/weight") and op.get("value") == 10 for op in p)] == []
    assert gate.seen == [5] and clock.t - START == 30


def test_a_cancel_after_the_promotion_landed_undoes_nothing():
    store, _gate, clock, rollout = make(steps=(50,))
    promote = rollout._promote

    def promote_then_signal(base, failures, manual=None, vs=None):
        promote(base, failures, manual=manual, vs=vs)
        raise ro.Cancelled("SIGINT")

    rollout._promote = promote_then_signal
    with pytest.raises(ro.RolloutError, match=r"cancelled \(SIGINT\) at step 2 \(weight 100\), after the rollout had ended promoted: traffic now"
                                              r" v1=0, v2=100") as caught:
        rollout.run()
    assert caught.value.result["result"] == "promoted" and weights(store) == {"v1": 0, "v2": 100}
    assert store.calls["write"] == 2
    del clock


class Killed(BaseException):
    """SIGKILL: nothing runs in the process any more."""


def test_abandoned_applies_on_cancel_for_a_killed_run():
    def die():
        raise Killed()

    store, _gate, _clock, rollout = make({40: die}, on_cancel="rollback")
    with pytest.raises(Killed):
        rollout.run()
    assert weights(store) == {"v1": 90, "v2": 10} and json.loads(annotations(store)[ro.LEASE_ANNOTATION])["holder"] == "run-1"
    # the guardian: the same run's settings, a client of its own
    _store, _g, _c, guardian = make()
    guardian.change = WeightChange(store, "shop", "payment", route_name="primary")
    assert guardian.abandoned("the module process was killed") == "rolled_back"
    assert weights(store) == {"v1": 100, "v2": 0} and ro.LEASE_ANNOTATION not in annotations(store)
    assert state(store)["reason"] == "cancelled (the module process was killed) at step 2 (weight 10)" and state(store)["phase"] == "rolled_back"
    writes = store.calls["write"]
    assert guardian.abandoned("again") is None and store.calls["write"] == writes


def test_abandoned_with_hold_keeps_the_weights_and_releases_the_lease():
    def die():
        raise Killed()

    store, _gate, _clock, rollout = make({40: die}, on_cancel="hold")
    with pytest.raises(Killed):
        rollout.run()
    _s, _g, _c, guardian = make(on_cancel="hold")
    guardian.change = WeightChange(store, "shop", "payment", route_name="primary")
    assert guardian.abandoned("killed") == "held"
    assert weights(store) == {"v1": 90, "v2": 10} and state(store)["phase"] == "held" and ro.LEASE_ANNOTATION not in annotations(store)


def test_abandoned_leaves_alone_what_another_run_holds():
    store, change = finished("progressing", lease={"holder": "run-0", "expires": START + 500})
    guardian = guardian_over(change)
    assert guardian.abandoned("killed") is None and store.calls["write"] == 0


def test_on_cancel_is_validated():
    with pytest.raises(ro.RolloutError, match="on_cancel: rollback or hold, got 'stay'"):
        make(on_cancel="stay")


def test_a_cancel_in_a_mirror_step_names_it_and_removes_the_mirror():
    store = FakeIstio(objects())
    clock = Timed(cancel_at(10))
    change = WeightChange(store, "shop", "payment", route_name="primary", sleep=lambda s: None)
    plan = ro.plan_steps([{"mirror": 20}, 10, 50], interval="30s")
    rollout = ro.Rollout(change, Gate(store), "v1", "v2", plan, now=clock.now, sleep=clock.sleep, holder="run-1")
    with pytest.raises(ro.RolloutError, match=r"^cancelled \(SIGTERM\) at step 1 \(mirror 20 %\); rolled back: traffic now v1=100, v2=0"):
        rollout.run()
    route = store.route("payment", "shop", 1)
    assert "mirror" not in route and "mirrorPercentage" not in route and weights(store) == {"v1": 100, "v2": 0}
    assert state(store)["reason"] == "cancelled (SIGTERM) at step 1 (mirror 20 %)"


# -- when the rollout looks, and which step the timeline names -------------------------------------------------------

def test_a_step_looks_for_commands_every_command_every_seconds_from_its_start_never_earlier():
    store, _gate, clock, rollout = make(command_every=5)
    result = rollout.run()
    assert result["result"] == "promoted"
    # run's read, 5 writes' reads, the DestinationRules, and 5 looks in each 30 s step (at 5, 10, ... 25 s; at 30 s the step ends)
    assert store.calls["read"] == 1 + 5 + 1 + 4 * 5
    assert min(clock.slept) > 0 and clock.t - START == 4 * 30


def test_a_paused_rollout_looks_every_command_every_seconds_from_the_pause():
    store = None
    looks = []

    def pause():
        ro.operator_command(WeightChange(store, "shop", "payment", route_name="primary"), "pause", wait=False, now=clock.now)

    store, _gate, clock, rollout = make({12: pause}, command_every=5, pause_timeout=22)
    read = rollout.change.read

    def read_and_note():
        looks.append(clock.t - START)
        return read()

    rollout.change.read = read_and_note
    result = rollout.run()
    assert result["result"] == "held" and min(clock.slept) > 0
    # paused at 15 (the first look after 12 s): then a look every 5 s until pause_timeout ends it at 37 s
    paused_looks = [t for t in looks if 15 < t < 37]
    assert paused_looks == [20, 25, 30, 35]


def test_the_timeline_names_the_step_of_an_abort_and_of_a_resume():
    store = None

    def command(what):
        return lambda: ro.operator_command(WeightChange(store, "shop", "payment", route_name="primary"), what, wait=False, now=clock.now)

    store, _gate, clock, rollout = make({32: command("pause"), 50: command("resume"), 70: command("abort")})
    result = rollout.run()
    assert result["result"] == "aborted"
    assert [(e["action"], e["step"]) for e in result["timeline"]] == [("advance", 1), ("pause", 2), ("resume", 2), ("abort", 2), ("aborted", 2)]
    assert result["timeline"][-1]["weight"] == 0 and result["timeline"][-1]["weights"] == {"v1": 100, "v2": 0}


def test_a_cancel_during_the_promotion_write_holds_at_the_last_step_and_a_rerun_resumes_it():
    store, gate, _clock, rollout = make(on_cancel="hold")
    evaluate = gate.evaluate

    def signal_during_the_next_write(token):
        verdict = evaluate(token)
        if len(gate.seen) == 4:   # the last step passed: the promotion's write is next, and the signal comes before it lands
            store.refuse = [ro.Cancelled("SIGTERM")]
        return verdict

    gate.evaluate = signal_during_the_next_write
    with pytest.raises(ro.RolloutError, match=r"^cancelled \(SIGTERM\) at step 5 \(weight 100\); held: traffic now v1=50, v2=50"):
        rollout.run()
    assert state(store)["phase"] == "held" and state(store)["step"] == 3   # the last step of the plan, not one past it
    clock = Clock()
    again = ro.Rollout(WeightChange(store, "shop", "payment", route_name="primary"), Gate(store), "v1", "v2",
                       ro.plan_steps([5, 10, 25, 50], interval="30s"), now=clock.now, sleep=clock.sleep, holder="run-2")
    result = again.run()
    assert result["note"] == "resuming held at step 4 (weight 50), as recorded" and result["result"] == "promoted"


def test_the_death_of_the_job_while_paused_is_noticed_within_one_tick():
    store = None

    def pause():
        ro.operator_command(WeightChange(store, "shop", "payment", route_name="primary"), "pause", wait=False, now=clock.now)

    store, _gate, clock, rollout = make({12: pause}, tick=1.0, pause_timeout=600)
    rollout.alive = lambda: "gone" if clock.t - START >= 42.5 else None
    with pytest.raises(ro.RolloutError, match=r"^cancelled \(gone\) at step 1 \(weight 5\); rolled back"):
        rollout.run()
    assert clock.t - START == 43 and min(clock.slept) > 0 and weights(store) == {"v1": 100, "v2": 0}


@pytest.mark.parametrize("recorded, named", [(7, "4 (weight 50)"), (-2, "1 (weight 5)")])
def test_abandoned_names_a_step_of_the_plan_even_when_the_record_says_one_outside_it(recorded, named):
    store, change = finished("progressing", lease={"holder": "run-1", "expires": START + 500})
    record(store, canary="v2", stable="v1", phase="progressing", step=recorded, holder="run-1", plan=[5, 10, 25, 50])
    guardian = guardian_over(change)
    assert guardian.abandoned("killed") == "rolled_back"
    assert state(store)["reason"] == "cancelled (killed) at step %s" % named and weights(store) == {"v1": 100, "v2": 0}
    assert state(store)["failures"] == 0   # none recorded: none counted


def test_a_direct_abort_is_not_stopped_by_the_recorded_runs_own_lease_but_by_another_holders():
    store, change = finished("held", lease={"holder": "run-0", "expires": START + 100})   # the held run's own lease, not yet expired
    out = ro.operator_command(change, "abort", now=lambda: START)
    assert out["direct"] is True and out["phase"] == "aborted" and weights(store) == {"v1": 100, "v2": 0}
    store, change = finished("held", lease={"holder": "run-9", "expires": START + 100})   # someone else's
    with pytest.raises(ro.RolloutError, match=r"command: a rollout \(run-9\) started on shop/payment meanwhile; rerun the command"):
        ro.operator_command(change, "abort", now=lambda: START)
    assert store.calls["write"] == 0 and weights(store) == {"v1": 60, "v2": 40}


def test_a_lease_that_expires_this_second_is_expired():
    store, change = finished("progressing", lease={"holder": "run-0", "expires": START})
    with pytest.raises(ro.RolloutError, match=r"no rollout is running on VirtualService shop/payment \(the last rollout \(canary v2, stable v1\) is"
                                              r" progressing at step 3, its lease \(run-0\) expired 0 s ago\); pause acts on a running rollout"):
        ro.operator_command(change, "pause", wait=False, now=lambda: START)
    out = ro.operator_command(change, "abort", now=lambda: START)   # no rollout running: abort acts directly
    assert out["direct"] is True and weights(store) == {"v1": 100, "v2": 0}
    store, change = finished("held", lease={"holder": "run-9", "expires": START})   # another holder's lease, expiring now, stops nothing
    assert ro.operator_command(change, "promote", now=lambda: START)["phase"] == "promoted" and weights(store) == {"v1": 0, "v2": 100}


def test_an_abort_puts_all_traffic_on_stable_even_when_another_client_changed_the_weights_meanwhile():
    store = None

    def change_by_hand_and_abort():
        route = store.route("payment", "shop", 1)
        route["route"][0]["weight"], route["route"][1]["weight"] = 70, 30
        ro.operator_command(WeightChange(store, "shop", "payment", route_name="primary"), "abort", wait=False, now=clock.now)

    store, _gate, clock, rollout = make({40: change_by_hand_and_abort})
    result = rollout.run()
    assert result["result"] == "aborted" and weights(store) == {"v1": 100, "v2": 0} and state(store)["phase"] == "aborted"


def test_what_operator_command_reports_changed():
    store, change = finished("progressing", lease={"holder": "run-0", "expires": START + 500})
    posted = ro.operator_command(change, "pause", by="erin", wait=False, now=lambda: START, command_id="k-1")
    assert posted["changed"] is True and posted["posted"] is True
    # the command as posted: its keys in a fixed order, so the same command reads the same in kubectl
    assert annotations(store)[ro.COMMAND_ANNOTATION] == '{"at": "%s", "by": "erin", "command": "pause", "id": "k-1"}' % ro.iso(START)
    store, change = finished("paused", lease={"holder": "run-0", "expires": START + 500})
    clock = Clock()   # were it posted, its wait would run on this clock, not the real one
    same = ro.operator_command(change, "pause", now=clock.now, sleep=clock.sleep)
    assert same["changed"] is False and same["acknowledged"] is True and same["msg"] == "VirtualService shop/payment is already paused: nothing to do"
    store, change = finished("aborted", stable=100, canary=0)
    again = ro.operator_command(change, "abort", now=lambda: START)
    assert again["changed"] is False and again["direct"] is True and again["msg"] == "already aborted: traffic v1=100, v2=0"


def test_a_cancel_after_the_promotion_landed_reports_the_change_it_made():
    store, _gate, _clock, rollout = make(steps=(50,))
    promote = rollout._promote

    def promote_then_signal(base, failures, manual=None, vs=None):
        promote(base, failures, manual=manual, vs=vs)
        raise ro.Cancelled("SIGINT")

    rollout._promote = promote_then_signal
    with pytest.raises(ro.RolloutError) as caught:
        rollout.run()
    assert caught.value.result["changed"] is True and caught.value.result["result"] == "promoted"


def test_a_rollback_that_fails_with_another_error_than_the_first_names_that_error():
    store, gate, _clock, rollout = make()

    def crash_then_lose_the_connection(token):
        store.refuse = [ConnectionError("connection reset by peer")]
        raise RuntimeError("prometheus client crashed")

    gate.evaluate = crash_then_lose_the_connection
    with pytest.raises(ro.RolloutError, match=r"prometheus client crashed; the rollback that should have followed was not written: connection reset"
                                              r" by peer\. Fix the cause"):
        rollout.run()
    assert weights(store) == {"v1": 95, "v2": 5}


def test_durations_in_messages_drop_a_zero_fraction_and_keep_any_other():
    store, change = finished("progressing", lease={"holder": "run-0", "expires": START + 500})
    clock = Clock()
    with pytest.raises(ro.RolloutError, match=r"did not act on pause within 2\.5s \(wait_timeout\)"):
        ro.operator_command(change, "pause", timeout=2.5, now=clock.now, sleep=clock.sleep)
    store = None

    def pause():
        ro.operator_command(WeightChange(store, "shop", "payment", route_name="primary"), "pause", wait=False, now=clock.now)

    store, _gate, clock, rollout = make({31: pause}, pause_timeout=100.0)
    assert rollout.run()["reason"].startswith("paused for longer than pause_timeout (100s) at step 2")


def test_a_direct_command_writes_when_the_phase_is_recorded_but_the_weights_were_changed_since():
    store, change = finished("aborted", stable=60, canary=40)   # aborted, then someone gave the canary 40 %
    out = ro.operator_command(change, "abort", now=lambda: START)
    assert out["changed"] is True and weights(store) == {"v1": 100, "v2": 0}


def test_a_direct_command_says_what_it_set_or_would_set():
    _store, change = finished()
    assert ro.operator_command(change, "promote", check_mode=True, now=lambda: START)["msg"] == (
        "no rollout was running on shop/payment: would set traffic v1=0, v2=100, phase promoted")
    store, change = finished()
    out = ro.operator_command(change, "promote", now=lambda: START)
    assert out["msg"] == "no rollout was running on shop/payment: set traffic v1=0, v2=100, phase promoted" and out["acknowledged"] is True
    raw = annotations(store)[ro.STATE_ANNOTATION]
    assert raw == json.dumps(json.loads(raw), sort_keys=True)   # the state's keys in a fixed order
    again = ro.operator_command(change, "promote", now=lambda: START)
    assert again["changed"] is False and again["acknowledged"] is True and again["direct"] is True


def test_a_direct_command_needs_both_subsets_recorded():
    store, change = finished()
    record(store, canary="v2", phase="held", step=1, holder="run-0")
    with pytest.raises(ro.RolloutError, match="so its canary and stable subsets are unknown"):
        ro.operator_command(change, "abort", now=lambda: START)
    assert store.calls["write"] == 0


def test_a_direct_command_stops_when_a_rollout_starts_between_its_read_and_its_write():
    store, change = finished()

    def a_rollout_starts(obj):
        notes = obj["metadata"]["annotations"]
        notes[ro.STATE_ANNOTATION] = json.dumps(dict(canary="v2", stable="v1", phase="progressing", step=0, holder="run-5", plan=[5, 10, 40]))
        notes[ro.LEASE_ANNOTATION] = json.dumps(dict(holder="run-5", expires=START + 300))

    store.interfere.append(a_rollout_starts)
    with pytest.raises(ro.RolloutError, match=r"command: a rollout \(run-5\) started on shop/payment meanwhile"):
        ro.operator_command(change, "abort", now=lambda: START)
    assert weights(store) == {"v1": 60, "v2": 40} and state(store)["holder"] == "run-5"


def test_an_abort_reports_a_change():
    store = None

    def abort():
        ro.operator_command(WeightChange(store, "shop", "payment", route_name="primary"), "abort", wait=False, now=clock.now)

    store, _gate, clock, rollout = make({40: abort})
    assert rollout.run()["changed"] is True


def test_abandoned_leaves_alone_a_rollout_that_has_ended_even_with_its_lease_still_on():
    store, change = finished("rolled_back", lease={"holder": "run-1", "expires": START + 500})
    record(store, canary="v2", stable="v1", phase="rolled_back", step=1, holder="run-1", plan=[5, 10, 25, 50])
    guardian = guardian_over(change)
    assert guardian.abandoned("killed") is None and store.calls["write"] == 0


def test_abandoned_stops_when_another_run_takes_over_between_its_read_and_its_write_even_with_force():
    store, change = finished("progressing", lease={"holder": "run-1", "expires": START + 500})

    def another_run_takes_over(obj):
        obj["metadata"]["annotations"][ro.LEASE_ANNOTATION] = json.dumps(dict(holder="run-7", expires=START + 900))

    store.interfere.append(another_run_takes_over)
    guardian = guardian_over(change, force=True)
    record(store, canary="v2", stable="v1", phase="progressing", step=1, holder="run-1", plan=[5, 10, 25, 50])
    with pytest.raises(ro.LeaseHeld, match=r"now held by another rollout \(run-7\)"):
        guardian.abandoned("killed")
    assert weights(store) == {"v1": 60, "v2": 40}


def test_pause_and_resume_with_ticks():
    store = None

    def command(what):
        return lambda: ro.operator_command(WeightChange(store, "shop", "payment", route_name="primary"), what, wait=False, now=clock.now)

    store, gate, clock, rollout = make({12: command("pause"), 200: command("resume")}, tick=1.0, pause_timeout=600)
    result = rollout.run()
    assert [e["action"] for e in result["timeline"]] == ["pause", "resume", "advance", "advance", "advance", "promote", "promoted"]
    assert result["timeline"][2]["started"] == ro.iso(START + 200) and gate.windows == 5


def test_a_rollback_after_a_cancel_that_the_api_refuses_says_the_canary_keeps_its_share():
    store, _gate, _clock, rollout = make()

    def cancel():
        store.forbidden = True
        raise ro.Cancelled("SIGTERM")

    rollout.sleep = Timed({45: cancel}).sleep
    rollout.now = rollout.sleep.__self__.now
    with pytest.raises(ro.RolloutError, match=r"^canary v2 still gets 10 % of the traffic \(weights in force: v1=90, v2=10\): cancelled \(SIGTERM\)"
                                              r" at step 2 \(weight 10\); the rollback that should have followed was not written: .*HTTP 403") as caught:
        rollout.run()
    assert caught.value.result["result"] == "stopped" and weights(store) == {"v1": 90, "v2": 10}


def test_a_second_pause_while_paused_keeps_the_rollout_paused_until_resume():
    store = None

    def command(what, cid):
        return lambda: ro.operator_command(WeightChange(store, "shop", "payment", route_name="primary"), what, wait=False, now=clock.now,
                                           command_id=cid)

    def late_pause():   # posted by a poster that read the rollout still progressing, just before it paused
        vs = store.objects[("virtualservices", "shop", "payment")]
        vs["metadata"]["annotations"][ro.COMMAND_ANNOTATION] = json.dumps(dict(command="pause", id="p-2", at=ro.iso(clock.now())))

    store, _gate, clock, rollout = make({12: command("pause", "p-1"), 50: late_pause, 200: command("resume", "r-1")}, pause_timeout=600)
    result = rollout.run()
    assert [e["action"] for e in result["timeline"]] == ["pause", "resume", "advance", "advance", "advance", "promote", "promoted"]
    assert result["timeline"][2]["started"] == ro.iso(START + 200)
    assert state(store)["command"]["id"] == "r-1"


def test_a_pause_lasts_an_hour_unless_pause_timeout_says_otherwise():
    store = None
    seen = {}

    def look():
        seen["lease"] = json.loads(annotations(store)[ro.LEASE_ANNOTATION])

    def pause():
        ro.operator_command(WeightChange(store, "shop", "payment", route_name="primary"), "pause", wait=False, now=clock.now)

    store, _gate, clock, rollout = make({3: pause, 6: look})
    result = rollout.run()
    assert seen["lease"] == {"holder": "run-1", "expires": START + 5 + 3600 + 120}
    assert result["result"] == "held" and clock.t - START == 5 + 3600


def test_abandoned_leaves_alone_a_rollout_whose_lease_another_run_took():
    store, change = finished("progressing", lease={"holder": "run-9", "expires": START + 500})
    record(store, canary="v2", stable="v1", phase="progressing", step=1, holder="run-1", plan=[5, 10, 25, 50])
    guardian = guardian_over(change)
    assert guardian.abandoned("killed") is None and store.calls["write"] == 0


def test_abandoned_with_hold_counts_no_failures_when_none_are_recorded():
    store, change = finished("progressing", lease={"holder": "run-1", "expires": START + 500})
    record(store, canary="v2", stable="v1", phase="progressing", step=1, holder="run-1", plan=[5, 10, 25, 50])
    guardian = guardian_over(change, on_cancel="hold")
    assert guardian.abandoned("killed") == "held" and state(store)["failures"] == 0 and weights(store) == {"v1": 60, "v2": 40}


def test_a_record_without_step_or_lease_expiry_reads_as_step_1_and_a_lease_expired_at_the_epoch():
    store, change = finished("held", lease={"holder": "run-0"})
    record(store, canary="v2", stable="v1", phase="held", holder="run-0")
    with pytest.raises(ro.RolloutError, match=r"the last rollout \(canary v2, stable v1\) is held at step 1, its lease \(run-0\) expired %d s ago\)"
                                              % START):
        ro.operator_command(change, "pause", wait=False, now=lambda: START)


def test_a_command_waits_60_seconds_by_default():
    _store, change = finished("progressing", lease={"holder": "run-0", "expires": START + 500})
    clock = Clock()
    with pytest.raises(ro.RolloutError, match=r"did not act on pause within 60s \(wait_timeout\)"):
        ro.operator_command(change, "pause", now=clock.now, sleep=clock.sleep)
    assert clock.t - START == 60


def test_a_command_gets_an_id_of_12_hex_digits_when_none_is_given():
    store, change = finished("progressing", lease={"holder": "run-0", "expires": START + 500})
    posted = ro.operator_command(change, "pause", wait=False, now=lambda: START)
    _store, held = finished()
    direct = ro.operator_command(held, "abort", now=lambda: START)
    for out in (posted, direct):
        assert len(out["id"]) == 12 and int(out["id"], 16) >= 0


def test_abandoned_takes_a_record_without_a_step_for_step_1():
    store, change = finished("progressing", lease={"holder": "run-1", "expires": START + 500})
    record(store, canary="v2", stable="v1", phase="progressing", holder="run-1", plan=[5, 10, 25, 50])
    guardian = guardian_over(change)
    assert guardian.abandoned("killed") == "rolled_back"
    assert state(store)["reason"] == "cancelled (killed) at step 1 (weight 5)" and state(store)["step"] == 0


def test_a_lease_with_less_than_a_second_left_still_runs():
    _store, change = finished("held", lease={"holder": "run-0", "expires": START + 0.5})
    with pytest.raises(ro.RolloutError, match=r"is held at step 3, its lease \(run-0\) runs 0 s more\)"):
        ro.operator_command(change, "pause", wait=False, now=lambda: START)


def test_a_command_for_a_rollout_that_ends_while_it_is_posted_is_not_posted():
    store, change = finished("progressing", lease={"holder": "run-0", "expires": START + 500})
    ro.operator_command(change, "pause", wait=False, now=lambda: START, command_id="first")

    def the_rollout_aborts_on_an_earlier_command(obj):   # and removes it: the post's test of the command annotation fails
        notes = obj["metadata"]["annotations"]
        notes[ro.STATE_ANNOTATION] = json.dumps(dict(json.loads(notes[ro.STATE_ANNOTATION]), phase="aborted"))
        del notes[ro.LEASE_ANNOTATION], notes[ro.COMMAND_ANNOTATION]

    store.interfere.append(the_rollout_aborts_on_an_earlier_command)
    with pytest.raises(ro.RolloutError, match=r"command: the rollout on VirtualService shop/payment ended while the command was being posted"):
        ro.operator_command(change, "promote", wait=False, now=lambda: START)
    assert ro.COMMAND_ANNOTATION not in annotations(store)


# -- looks and probes that take longer than their interval (a slow or retried API request, a slow Prometheus) --------

def slow(clock, func, seconds, seen):
    def call(*args, **kwargs):
        seen.append(clock.t - START)
        clock.t += seconds
        return func(*args, **kwargs)
    return call


def test_a_look_that_outlasts_command_every_skips_the_beats_it_overran():
    looks = []
    store, _gate, clock, rollout = make(steps=(5, 10), command_every=5)
    rollout._look = slow(clock, rollout._look, 7, looks)  # pylint: disable=protected-access
    result = rollout.run()
    assert result["result"] == "promoted" and weights(store) == {"v1": 0, "v2": 100}
    assert min(clock.slept) >= 0
    # step 1 from 0 s to 30 s: looks at 5 (until 12), 15 (until 22), 25 (until 32, past the step's end); never back to back
    assert [t for t in looks if t < 30] == [5, 15, 25]


def test_a_look_that_outlasts_several_beats_waits_for_the_next_one_ahead():
    looks = []
    store, _gate, clock, rollout = make(steps=(5, 10), command_every=5, interval="60s")
    rollout._look = slow(clock, rollout._look, 11, looks)  # pylint: disable=protected-access
    assert rollout.run()["result"] == "promoted" and min(clock.slept) >= 0
    assert [t for t in looks if t < 60] == [5, 20, 35, 50]   # 5 -> 16: beats 10 and 15 overrun, the next is 20


def test_a_look_then_a_slow_probe_past_the_next_look_looks_at_once():
    looks = []
    clock_box = {}
    store, _gate, clock, rollout = make(steps=(5, 10), command_every=10)
    probe = Probe(clock, ["pass"] * 20)
    rollout.probe, rollout.probe_every = probe, 10
    probe.evaluate = slow(clock, probe.evaluate, 12, clock_box.setdefault("probes", []))
    rollout._look = slow(clock, rollout._look, 0, looks)  # pylint: disable=protected-access
    assert rollout.run()["result"] == "promoted" and min(clock.slept) >= 0
    # at 10: the look (instant), then the probe until 22; the look due at 20 is made at once (22), the probe's next
    # beat ahead of 22 is 30, the step's end
    assert [t for t in looks if t < 30] == [10, 22] and [t for t in clock_box["probes"] if t < 30] == [10]
    assert 0 in clock.slept


def test_a_paused_rollout_whose_looks_outlast_command_every_skips_the_beats_it_overran():
    store = None
    looks = []

    def pause():
        ro.operator_command(WeightChange(store, "shop", "payment", route_name="primary"), "pause", wait=False, now=clock.now)

    store, _gate, clock, rollout = make({12: pause}, command_every=5, pause_timeout=40)
    rollout._look = slow(clock, rollout._look, 7, looks)  # pylint: disable=protected-access
    result = rollout.run()
    assert result["result"] == "held" and min(clock.slept) >= 0
    # the look at 15 finds the pause (until 22); paused looks on the grid from 22: 27 (until 34), 37, 47, 57 (until 64 > 62)
    assert [t for t in looks if t > 15] == [27, 37, 47, 57]


def test_a_paused_rollout_whose_acknowledgement_outlasts_command_every_looks_at_once():
    store = None
    looks = []

    def pause():
        ro.operator_command(WeightChange(store, "shop", "payment", route_name="primary"), "pause", wait=False, now=clock.now)

    def pause_again():   # posted straight on the object (canary_command says "already paused" and posts nothing)
        annotations(store)[ro.COMMAND_ANNOTATION] = json.dumps({"command": "pause", "id": "c-2", "by": "bob"})

    store, _gate, clock, rollout = make({12: pause, 21: pause_again}, command_every=5, pause_timeout=40)
    rollout._look = slow(clock, rollout._look, 0, looks)  # pylint: disable=protected-access
    patch = store.json_patch

    def slow_patch(*args, **kwargs):   # the API takes 7 s over each write while paused
        if looks and looks[-1] > 15:
            clock.t += 7
        return patch(*args, **kwargs)

    store.json_patch = slow_patch
    result = rollout.run()
    assert result["result"] == "held" and min(clock.slept) >= 0
    # paused at 15; the look at 25 finds the second pause, whose acknowledgement ends at 32: the look due at 30 is made
    # at once, then the beats ahead
    assert [t for t in looks if 15 < t < 40] == [20, 25, 32, 35]


@pytest.mark.parametrize("scheduled, every, now, beat", [(10, 5, 12, 15), (10, 5, 14.9, 15), (10, 5, 15, 20), (10, 5, 27, 30),
                                                         (10, 5, 30, 35), (10, 5, 3, 15), (0, 2.5, 9, 10)])
def test_next_beat(scheduled, every, now, beat):
    assert ro.next_beat(scheduled, every, now) == beat
