"""Mutation testing of the canary engine against tests/unit (`make mutation`; README.md, "Mutation testing").

Cosmic Ray (requirements/mutation.txt) makes the mutants: its parser, its operators and its mutation visitor.
This script runs them, faster than `cosmic-ray exec` would on 2 cores: one parent process imports pytest,
Ansible and the kubernetes client once, and every mutant's test run is a fork of it that runs `pytest -x`
in-process, on the test files of tests/unit that import the mutated file (the others cannot fail on it), in a
scratch copy of the collection (.build/mutation/<file>/) where the mutant is written. The work tree is never
mutated, so it can be edited during a run.

A mutant is killed when the unit tests fail (or time out) with it, survived when they pass. Mutants
listed in tools/mutation/equivalents.yml (no test can tell them from the original; each with the reason)
are left out of the score: score = killed / (mutants - equivalent).

    python tools/mutation/run.py                       # the four engine files, one after the other
    python tools/mutation/run.py rollout.py            # one file
    python tools/mutation/run.py --survivors-only      # retest only the last run's survivors (quick loop)
    python tools/mutation/run.py --jobs 2 --resume     # two at once; go on after an interruption
"""

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import sys
import time

import yaml

import cosmic_ray.operators.binary_operator_replacement as binary_ops
import cosmic_ray.operators.comparison_operator_replacement as comparison_ops
import cosmic_ray.operators.unary_operator_replacement as unary_ops
from cosmic_ray.ast import ast_nodes, get_ast
from cosmic_ray.mutating import MutationVisitor
from cosmic_ray.operators import boolean_replacer, break_continue, exception_replacer, number_replacer
from cosmic_ray.operators import remove_decorator, zero_iteration_for_loop
from cosmic_ray.operators.operator import Example, Operator
from parso.python.tree import Keyword

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
ENGINE = ("rollout.py", "traffic.py", "canary_checks.py", "k8s_client.py")
ENGINE_DIR = os.path.join("plugins", "module_utils")
WORK = os.path.join(ROOT, ".build", "mutation")
EQUIVALENTS = os.path.join(HERE, "equivalents.yml")
# What the scratch copy needs to run tests/unit (the Bookinfo samples come from tools/controlplane's cache).
TREE = ("plugins", "roles", "tests/unit", "tests/conftest.py", "tests/__init__.py", "pytest.ini", "galaxy.yml", "meta", "tools/controlplane")
PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider"]
UNIT = os.path.join("tests", "unit")


class DeleteRaise(Operator):
    """Replaces a raise statement with pass: the error it reports goes unnoticed."""

    def mutation_positions(self, node):
        if node.type == "raise_stmt" or (node.type == "keyword" and node.value == "raise" and node.parent.type != "raise_stmt"):
            yield (node.start_pos, node.end_pos)

    def mutate(self, node, index):
        return Keyword("pass", node.start_pos, prefix=node.get_first_leaf().prefix)

    @classmethod
    def examples(cls):
        return (Example("if x:\n    raise ValueError(x)\n", "if x:\n    pass\n"),)


def _pick(module, names):
    found = dict((op.__name__, op) for op in module.operators())
    return [found[name] for name in names]


# Thirty classic operators and the deletion of a raise: each comparison to its boundary and its negation (is and is not
# + and - swapped, * and / swapped, numbers, booleans, and/or, not, break/continue, except clauses, loops, decorators.
OPERATORS = dict(
    [("core/" + op.__name__, op) for op in _pick(binary_ops, [
        "ReplaceBinaryOperator_Add_Sub", "ReplaceBinaryOperator_Sub_Add", "ReplaceBinaryOperator_Mul_Div", "ReplaceBinaryOperator_Div_Mul"])]
    + [("core/" + op.__name__, op) for op in _pick(comparison_ops, [
        "ReplaceComparisonOperator_%s" % pair for pair in (
            "Eq_NotEq", "NotEq_Eq", "Lt_LtE", "Lt_GtE", "LtE_Lt", "LtE_Gt", "Gt_GtE", "Gt_LtE", "GtE_Gt", "GtE_Lt",
            "Is_IsNot", "IsNot_Is")])]
    + [("core/" + op.__name__, op) for op in _pick(unary_ops, [
        "ReplaceUnaryOperator_Delete_Not", "ReplaceUnaryOperator_USub_UAdd", "ReplaceUnaryOperator_Delete_USub"])]
    + [("core/" + op.__name__, op) for op in (
        boolean_replacer.AddNot, boolean_replacer.ReplaceTrueWithFalse, boolean_replacer.ReplaceFalseWithTrue,
        boolean_replacer.ReplaceAndWithOr, boolean_replacer.ReplaceOrWithAnd, break_continue.ReplaceBreakWithContinue,
        break_continue.ReplaceContinueWithBreak, exception_replacer.ExceptionReplacer, number_replacer.NumberReplacer,
        remove_decorator.RemoveDecorator, zero_iteration_for_loop.ZeroIterationForLoop)]
    + [("mesh/DeleteRaise", DeleteRaise)]
)


def mutants(source):
    """Every mutation of ``source``: dicts with operator, occurrence, line, col and the original line (stripped)."""
    lines = source.splitlines()
    tree = get_ast(source)
    out = []
    for name, operator_class in OPERATORS.items():
        operator = operator_class()
        positions = [start for node in ast_nodes(tree) for start, _end in operator.mutation_positions(node)]
        for occurrence, (line, col) in enumerate(positions):
            text = lines[line - 1]
            out.append(dict(operator=name, occurrence=occurrence, line=line, col=col - (len(text) - len(text.lstrip())), code=text.strip()))
    return out


def mutate(source, mutant):
    """The mutated source, or None when the operator makes no change there."""
    code = MutationVisitor.mutate_code(source, OPERATORS[mutant["operator"]](), mutant["occurrence"])
    return None if code is None or code == source else code


def _changed_line(lines, mutated_lines, line):
    for i, (a, b) in enumerate(zip(lines, mutated_lines)):
        if a != b:
            return b.strip()
    return (mutated_lines[line - 1] if line - 1 < len(mutated_lines) else "").strip() + "  (line removed)"


def load_equivalents(path=EQUIVALENTS):
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    for name, entries in doc.items():
        for entry in entries or []:
            missing = set(("operator", "line", "code", "col", "mutated", "reason")) - set(entry)
            if missing or not str(entry.get("reason") or "").strip():
                raise SystemExit("%s: the entry for %s line %s needs operator, line, code, col, mutated and a reason (missing: %s)"
                                 % (path, name, entry.get("line"), ", ".join(sorted(missing)) or "reason"))
    return doc


def _key(m):
    """What names a mutant across runs: operator, the original line, the column in it, the mutated line, and which of
    the mutants that share these four it is (``nth``: 0, 1, ... in file order; a bare ``raise`` or ``if value is None:``
    recurs in a file, and each of its mutants has an outcome of its own)."""
    return (m["operator"], m["code"], m["col"], m["mutated"], m.get("nth", 0))


def number_alike(all_mutants):
    """Set ``nth`` on each mutant (see _key); returns how many mutants share each (operator, code, col, mutated)."""
    count = {}
    for m in all_mutants:
        alike = _key(m)[:4]
        m["nth"] = count.get(alike, 0)
        count[alike] = m["nth"] + 1
    return count


def make_tree(dest):
    """A scratch copy of what tests/unit needs, with the collection link that the tests import through."""
    shutil.rmtree(dest, ignore_errors=True)
    for rel in TREE:
        src = os.path.join(ROOT, rel)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, rel), ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".cache"))
        elif os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
    link = os.path.join(dest, "collections", "ansible_collections", "onprem", "mesh")
    os.makedirs(os.path.dirname(link))
    os.symlink(os.path.join("..", "..", ".."), link)


def preload():
    """Import once, in the parent, what every test run imports: each fork then starts warm."""
    sys.dont_write_bytecode = True
    import pytest  # noqa: F401 pylint: disable=unused-import,import-outside-toplevel
    import _pytest.python  # noqa: F401 pylint: disable=unused-import,import-outside-toplevel
    import jsonpatch  # noqa: F401 pylint: disable=unused-import,import-outside-toplevel
    import ansible.module_utils.basic  # noqa: F401 pylint: disable=unused-import,import-outside-toplevel
    import ansible.module_utils.urls  # noqa: F401 pylint: disable=unused-import,import-outside-toplevel
    try:
        import kubernetes.client  # pylint: disable=import-outside-toplevel
    except ImportError:
        return
    for lazy in ("ApiClient", "AppsV1Api", "CoreV1Api", "CustomObjectsApi"):   # the client imports these on first use (1 s)
        getattr(kubernetes.client, lazy)
    # and the models it reads a Deployment and a pod list into (another second in every test run otherwise)
    client = kubernetes.client.ApiClient()
    deployment = {"metadata": {"name": "d"}, "status": {"replicas": 1},
                  "spec": {"selector": {"matchLabels": {"a": "b"}},
                           "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c"}]}}}}
    container = {"name": "c", "restartCount": 0, "image": "i", "imageID": "", "ready": True,
                 "lastState": {"terminated": {"exitCode": 1, "finishedAt": "2025-01-01T00:00:00Z"}}}
    pods = {"items": [{"metadata": {"name": "p"}, "status": {"containerStatuses": [container]}}]}
    for kind, doc in (("V1Deployment", deployment), ("V1PodList", pods)):
        client.sanitize_for_serialization(client._ApiClient__deserialize(doc, kind))  # pylint: disable=protected-access


class _OwnTestsFirst:
    """A pytest plugin: the mutated file's own unit tests run first, so that with -x a killed mutant stops early."""

    def __init__(self, name):
        self.module = "test_" + name

    def pytest_collection_modifyitems(self, items):
        items.sort(key=lambda item: os.path.basename(str(item.fspath)) != self.module)


def test_files(tree, name):
    """The test files of tests/unit that import the engine file ``name`` (directly or through a module): only
    they can kill its mutants. Found by importing each one in a fork and looking at what it loaded."""
    module = "ansible_collections.onprem.mesh.%s.%s" % (ENGINE_DIR.replace(os.sep, "."), os.path.splitext(name)[0])
    found = []
    for folder, _dirs, files in sorted(os.walk(os.path.join(tree, UNIT))):
        for test in sorted(f for f in files if f.startswith("test_") and f.endswith(".py")):
            rel = os.path.relpath(os.path.join(folder, test), tree)
            dotted = "ansible_collections.onprem.mesh." + os.path.splitext(rel)[0].replace(os.sep, ".")
            pid = os.fork()
            if pid == 0:
                code = 2
                try:
                    os.chdir(tree)
                    sys.path.insert(0, os.path.join(tree, "collections"))
                    null = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(null, 1)
                    os.dup2(null, 2)
                    __import__(dotted)
                    code = 0 if module in sys.modules else 1
                finally:
                    os._exit(code)  # pylint: disable=protected-access
            _pid, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            if code == 2:
                raise SystemExit("cannot import %s to see what it tests" % rel)
            if code == 0:
                found.append(rel)
    return found


def _cpu_seconds(pid):
    """CPU time a running process has used (all its threads), from /proc."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))
    except (OSError, IndexError, ValueError):
        return 0.0


IDLE_LIMIT = 300.0   # seconds on the clock a test run may go without using any CPU (a mutant that sleeps)


def _tree_cpu_seconds(pid):
    """CPU time of a process and of every process under it (a test's subprocesses work while it waits)."""
    total, todo, seen = 0.0, [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        total += _cpu_seconds(current)
        try:
            for task in os.listdir("/proc/%d/task" % current):
                with open("/proc/%d/task/%s/children" % (current, task)) as f:
                    todo.extend(int(child) for child in f.read().split())
        except (OSError, ValueError):
            pass
    return total


def run_tests(tree, cpu_limit, log_path=None, first=None, files=(UNIT,)):
    """Run ``files`` (tests/unit) in a fork of this process inside ``tree`` (``first``: the engine file whose tests
    go first). Returns ("passed" | "failed" | "timeout", CPU seconds). The limit is on CPU time, not on the clock:
    at the lowest priority beside a busy machine a run can wait minutes for a core without being slow itself."""
    pid = os.fork()
    if pid == 0:  # the child: pytest in-process, its output to the log or nowhere
        code = 3
        try:
            os.chdir(tree)
            fd = os.open(log_path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.path.insert(0, os.path.join(tree, "collections"))
            import pytest  # pylint: disable=import-outside-toplevel
            code = int(pytest.main(list(PYTEST_ARGS) + list(files), plugins=[_OwnTestsFirst(first)] if first else []))
        finally:
            os._exit(code)  # pylint: disable=protected-access
    deadline = time.monotonic() + max(1800.0, 60 * cpu_limit)   # and a backstop on the clock
    # A mutant that makes a test sleep on the real clock (a wait turned around) uses no CPU at all: after IDLE_LIMIT
    # seconds without any, in the run and its subprocesses, it is ended like one that runs too long. A run that only
    # waits for a core at the lowest priority still gets some CPU within that time.
    last_cpu, last_change = 0.0, time.monotonic()
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return ("passed" if os.waitstatus_to_exitcode(status) == 0 else "failed"), usage.ru_utime + usage.ru_stime
        now, used = time.monotonic(), _tree_cpu_seconds(pid)
        if used > last_cpu:
            last_cpu, last_change = used, now
        if _cpu_seconds(pid) > cpu_limit or now > deadline or now - last_change > IDLE_LIMIT:
            os.kill(pid, signal.SIGKILL)
            _pid, _status, usage = os.wait4(pid, 0)
            return "timeout", usage.ru_utime + usage.ru_stime   # killed, as in Cosmic Ray; reported apart
        time.sleep(0.05)


def _read_progress(path, digest):
    """Outcomes recorded so far for this version of the file: {key: outcome}."""
    found = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut short by an interrupted run
                if row.get("sha256") == digest:
                    found[tuple(row["key"])] = row["outcome"]
    return found


def _worker(name, source, digest, tree, todo, files, timeout, progress_path, listed, label):
    """Test ``todo`` (mutants with their code) in ``tree``; append each outcome to the progress file."""
    target = os.path.join(tree, ENGINE_DIR, name)
    with open(progress_path, "a") as progress:
        for i, m in enumerate(todo, 1):
            with open(target, "w") as f:
                f.write(m["source"])
            result, _cpu = run_tests(tree, timeout, first=name, files=files)
            outcome = dict(passed="survived", failed="killed", timeout="timeout")[result]
            with open(target, "w") as f:
                f.write(source)
            progress.write(json.dumps(dict(sha256=digest, key=list(_key(m)), outcome=outcome)) + "\n")
            progress.flush()
            if outcome == "survived" and _key(m) not in listed:
                print("  survived: %s:%d %s: %s  ->  %s" % (name, m["line"], m["operator"], m["code"], m["mutated"]), flush=True)
            if i % 50 == 0:
                print("  %s%s: %d/%d mutants tested" % (name, label, i, len(todo)), flush=True)


def run_file(name, equivalents, survivors_only=False, timeout=None, jobs=1, resume=False):
    source_path = os.path.join(ROOT, ENGINE_DIR, name)
    with open(source_path) as f:
        source = f.read()
    stem = os.path.splitext(name)[0]
    results_path = os.path.join(WORK, stem + ".json")
    progress_path = os.path.join(WORK, stem + ".progress.jsonl")
    digest = hashlib.sha256(source.encode()).hexdigest()
    started = time.monotonic()
    trees = [os.path.join(WORK, stem if j == 0 else "%s-%d" % (stem, j)) for j in range(jobs)]
    for tree in trees:
        make_tree(tree)
    result, cpu = run_tests(trees[0], 600, log_path=os.path.join(WORK, stem + ".baseline.log"))
    if result != "passed":
        raise SystemExit("tests/unit fail without any mutant; see %s" % os.path.join(WORK, stem + ".baseline.log"))
    timeout = timeout or max(20.0, 10 * cpu)
    files = test_files(trees[0], name)
    print("%s: mutants run against %s (the files of %s that import it)" % (name, ", ".join(files), UNIT), flush=True)
    previous = {}
    if survivors_only and os.path.exists(results_path):
        with open(results_path) as f:
            old = json.load(f)
        if old.get("sha256") == digest:   # killed stays killed; survivors are tested again
            previous = dict((tuple(r["key"]), r["outcome"]) for r in old["mutants"] if r["outcome"] in ("killed", "timeout"))
    if resume:
        previous.update(_read_progress(progress_path, digest))
    else:
        open(progress_path, "w").close()
    listed = dict((_key(e), e) for e in equivalents.get(name) or [])
    all_mutants = []
    for m in mutants(source):
        code = mutate(source, m)
        if code is not None:
            m["source"] = code
            m["mutated"] = _changed_line(source.splitlines(), code.splitlines(), m["line"])
            all_mutants.append(m)
    alike = number_alike(all_mutants)
    todo = [m for m in all_mutants if previous.get(_key(m)) is None]
    print("%s: %d mutants, %d to test%s" % (name, len(all_mutants), len(todo), " in %d workers" % jobs if jobs > 1 else ""), flush=True)
    pids = []
    for j, tree in enumerate(trees):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _worker(name, source, digest, tree, todo[j::jobs], files, timeout, progress_path, listed,
                        " (worker %d of %d)" % (j + 1, jobs) if jobs > 1 else "")
                code = 0
            finally:
                os._exit(code)  # pylint: disable=protected-access
        pids.append(pid)
    failed = [pid for pid in pids if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0]
    if failed:
        raise SystemExit("%s: %d of %d workers failed; rerun with --resume to go on from where they stopped" % (name, len(failed), jobs))
    outcomes = dict(previous)
    outcomes.update(_read_progress(progress_path, digest))
    records = [dict(key=list(_key(m)), outcome=outcomes[_key(m)], line=m["line"], operator=m["operator"], code=m["code"], mutated=m["mutated"])
               for m in all_mutants]
    os.makedirs(WORK, exist_ok=True)
    with open(results_path, "w") as f:
        json.dump(dict(file=name, sha256=digest, mutants=records), f, indent=1)
    for tree in trees:
        shutil.rmtree(tree, ignore_errors=True)
    seen = set(tuple(r["key"]) for r in records)
    stale = [e for k, e in listed.items() if k not in seen]
    # an entry without nth for a line whose mutation recurs names only the first of them: say which it could mean
    ambiguous = [(e, alike[k[:4]]) for k, e in listed.items() if "nth" not in e and alike.get(k[:4], 0) > 1]
    return report(name, records, listed, stale, time.monotonic() - started, ambiguous)


def report(name, records, listed, stale, seconds, ambiguous=()):
    equivalent = [r for r in records if tuple(r["key"]) in listed]
    killed_equivalent = [r for r in equivalent if r["outcome"] != "survived"]
    counted = [r for r in records if tuple(r["key"]) not in listed]
    killed = [r for r in counted if r["outcome"] != "survived"]
    timeouts = [r for r in killed if r["outcome"] == "timeout"]
    survived = [r for r in counted if r["outcome"] == "survived"]
    score = 100.0 * len(killed) / len(counted) if counted else 100.0
    print("%s: %d mutants, %d equivalent (excluded), %d killed (%d by the CPU time limit), %d survived: score %.1f %% (%.0f s)"
          % (name, len(records), len(equivalent), len(killed), len(timeouts), len(survived), score, seconds))
    for r in sorted(timeouts, key=lambda r: (r["line"], r["operator"])):
        print("  timeout   %s:%d  %s: %s  ->  %s" % (name, r["line"], r["operator"], r["code"], r["mutated"]))
    for r in sorted(survived, key=lambda r: (r["line"], r["operator"])):
        print("  survived  %s:%d  %s\n            %s\n         -> %s" % (name, r["line"], r["operator"], r["code"], r["mutated"]))
    for r in killed_equivalent:
        print("  listed as equivalent but killed (remove it from equivalents.yml): %s:%d %s %s" % (name, r["line"], r["operator"], r["code"]))
    for e in stale:
        print("  equivalents.yml entry matches no mutant (the code changed; review it): %s:%s %s %s" % (name, e["line"], e["operator"], e["code"]))
    for e, count in ambiguous:
        print("  equivalents.yml entry names the first of %d identical mutants (lines %s); add nth: 0 to %d to say which: %s:%s %s %s"
              % (count, ", ".join(str(r["line"]) for r in records if tuple(r["key"][:4]) == _key(e)[:4]), count - 1,
                 name, e["line"], e["operator"], e["code"]))
    return dict(file=name, mutants=len(records), equivalent=len(equivalent), killed=len(killed), survived=len(survived), score=score)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", default=list(ENGINE), help="engine files (default: %s)" % ", ".join(ENGINE))
    parser.add_argument("--survivors-only", action="store_true", help="retest only the mutants that survived the last run of an unchanged file")
    parser.add_argument("--fail-under", type=float, default=90.0, help="exit 1 when a file scores below this percentage (default 90)")
    parser.add_argument("--timeout", type=float, help="CPU seconds one test run may use (default: 10 times the unmutated run, at least 20)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once, each in its own scratch copy (default 1)")
    parser.add_argument("--resume", action="store_true", help="go on from where an interrupted run of an unchanged file stopped")
    args = parser.parse_args(argv)
    unknown = [f for f in args.files if f not in ENGINE]
    if unknown:
        parser.error("not an engine file: %s (choose from %s)" % (", ".join(unknown), ", ".join(ENGINE)))
    equivalents = load_equivalents()
    preload()
    started = time.monotonic()
    if args.jobs < 1:
        parser.error("--jobs: 1 or more")
    summary = [run_file(name, equivalents, args.survivors_only, args.timeout, args.jobs, args.resume) for name in args.files]
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    print("\nmutation score (equivalent mutants excluded), %.0f min (%.0f CPU min):"
          % ((time.monotonic() - started) / 60, (used.ru_utime + used.ru_stime) / 60))
    for s in summary:
        print("  %-18s %5.1f %%  (%d mutants: %d killed, %d survived, %d equivalent)"
              % (s["file"], s["score"], s["mutants"], s["killed"], s["survived"], s["equivalent"]))
    low = [s["file"] for s in summary if s["score"] < args.fail_under]
    if low:
        print("below %s %%: %s" % (args.fail_under, ", ".join(low)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
