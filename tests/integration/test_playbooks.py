"""Playbooks, inventories and AWX material, checked without a cluster.

- every playbook in playbooks/ passes `ansible-playbook --syntax-check` and `--list-tasks` against both
  inventories (inventories/lab, inventories/example), every play's host pattern matches hosts there, and the
  node stages stop the whole run on one host's failure (any_errors_fatal);
- the AWX job templates and surveys (awx/) have AWX's shape, point at playbooks that exist, and every survey
  question maps to an option of the argument specs of a role its playbook runs, with a type AWX can deliver and
  the role accepts, and the role's own default;
- awx/execution-environment.yml builds a context with `ansible-builder create` (offline);
- collections/requirements.yml installs this collection from the project folder, as an AWX project sync does;
- every role can be used on its own: argument specs, defaults that match them, a README with an example.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.dirname(sys.executable)
PLAYBOOKS = sorted(f for f in os.listdir(os.path.join(ROOT, "playbooks")) if f.endswith(".yml"))
INVENTORIES = ["lab", "example"]
ROLES = sorted(os.listdir(os.path.join(ROOT, "roles")))
STAGES = ["prepare_hosts.yml", "container_runtime.yml", "kubernetes.yml", "istio.yml", "mesh_namespaces.yml"]
NODE_STAGES = ["prepare_hosts.yml", "container_runtime.yml", "kubernetes.yml"]
SURVEY_TYPES = {"text", "textarea", "password", "integer", "float", "multiplechoice", "multiselect"}


def env():
    return dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
                PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""))


def ansible_playbook(*args):
    return subprocess.run([os.path.join(VENV_BIN, "ansible-playbook")] + list(args), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300, check=False)


def load_yaml(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_json(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return json.load(f)


def role_options(role):
    return load_yaml("roles", role, "meta", "argument_specs.yml")["argument_specs"]["main"]["options"]


def playbook_roles(playbook):
    """Roles a playbook runs, following import_playbook."""
    roles = []
    for play in load_yaml("playbooks", playbook):
        if "ansible.builtin.import_playbook" in play:
            roles += playbook_roles(play["ansible.builtin.import_playbook"])
        for entry in play.get("roles", []):
            roles.append((entry["role"] if isinstance(entry, dict) else entry).split(".")[-1])
    return roles


# --- playbooks against both inventories -----------------------------------------------------------------------

@pytest.mark.parametrize("inventory", INVENTORIES)
@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_syntax_check(playbook, inventory):
    run = ansible_playbook("-i", os.path.join("inventories", inventory), "--syntax-check", os.path.join("playbooks", playbook))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Could not match supplied host pattern" not in run.stderr, run.stderr


@pytest.mark.parametrize("inventory", INVENTORIES)
@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_list_tasks(playbook, inventory):
    run = ansible_playbook("-i", os.path.join("inventories", inventory), "--list-tasks", os.path.join("playbooks", playbook))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Could not match supplied host pattern" not in run.stderr, run.stderr
    for role in playbook_roles(playbook):
        # every role starts with its argument spec validation, so a wrong input stops it first
        assert re.search(r"onprem\.mesh\.%s : Validating arguments against arg spec 'main'" % role, run.stdout), run.stdout


def test_site_runs_the_stages_in_order_with_a_summary_at_the_end():
    site = load_yaml("playbooks", "site.yml")
    assert [p.get("ansible.builtin.import_playbook") for p in site[:len(STAGES)]] == STAGES
    assert playbook_roles("site.yml") == ["kvm_host", "nvme_storage", "container_runtime", "kubernetes", "istio", "mesh_namespace"]
    summary = site[-1]
    assert summary["hosts"] == "localhost" and all("always" in t["tags"] for t in summary["tasks"])
    assert any("ansible.builtin.set_stats" in t for t in summary["tasks"])
    run = ansible_playbook("-i", "inventories/example", "--list-tasks", "--tags", "istio", "playbooks/site.yml")
    assert run.returncode == 0 and "Summary of the control plane" in run.stdout and "Site summary" in run.stdout
    assert "Initialise the first control plane" not in run.stdout


@pytest.mark.parametrize("playbook", NODE_STAGES)
def test_node_stages_stop_everywhere_on_one_failure(playbook):
    for play in load_yaml("playbooks", playbook):
        assert play["any_errors_fatal"] is True and play["become"] is True, playbook
        assert all(r.get("tags") for r in play["roles"]), "every role tagged"


def test_canary_playbook_keeps_its_interface():
    play = load_yaml("playbooks", "canary.yml")[0]
    assert play["hosts"] == "{{ canary_target_hosts | default('localhost') }}" and play["connection"] == "local"
    assert play["roles"] == [{"role": "onprem.mesh.canary", "tags": ["canary"]}]


def test_example_inventory_maps_nvme_disks_and_documents_every_line():
    run = subprocess.run([os.path.join(VENV_BIN, "ansible-inventory"), "-i", "inventories/example", "--list"], cwd=ROOT,
                         env=env(), capture_output=True, text=True, timeout=120, check=True)
    inv = json.loads(run.stdout)
    assert len(inv["kube_control_plane"]["hosts"]) == 3 and len(inv["kube_node"]["hosts"]) >= 1
    purposes = set(role_options("nvme_storage")["nvme_storage_purposes"]["default"])
    for host in inv["kube_control_plane"]["hosts"] + inv["kube_node"]["hosts"]:
        devices = inv["_meta"]["hostvars"][host]["nvme_storage_devices"]
        assert devices and all(d["purpose"] in purposes and d["serial"] for d in devices), host
    for host in inv["kube_control_plane"]["hosts"]:
        assert "etcd" in [d["purpose"] for d in inv["_meta"]["hostvars"][host]["nvme_storage_devices"]]
    # every variable in group_vars has its comment line right above it (or is in a commented block)
    gv = os.path.join(ROOT, "inventories", "example", "group_vars")
    for name in os.listdir(gv):
        with open(os.path.join(gv, name), encoding="utf-8") as f:
            lines = f.read().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"^[a-z_]+:", line):
                assert lines[i - 1].startswith("#") or re.match(r"^[a-z_]+:", lines[i - 1]), "%s: %s" % (name, line)


def test_lab_inventory_points_the_canary_at_the_mesh_lab():
    run = subprocess.run([os.path.join(VENV_BIN, "ansible-inventory"), "-i", "inventories/lab", "--host", "localhost"],
                         cwd=ROOT, env=dict(env(), ONPREM_MESH_PROMETHEUS_URL="http://127.0.0.1:1"), capture_output=True,
                         text=True, timeout=120, check=True)
    host = json.loads(run.stdout)
    assert host["canary_namespace"] == "lab" and host["canary_service"] == "payment" and host["canary_route_name"] == "primary"
    assert host["ansible_connection"] == "local"


# --- AWX ------------------------------------------------------------------------------------------------------

def awx_assets():
    return load_json("awx", "assets.json")


def compatible(question, option):
    """A survey answer's type (as AWX sends it) that the argument spec accepts (as validate_argument_spec converts)."""
    kind, qtype = option.get("type", "str"), question["type"]
    if qtype in ("text", "textarea", "password"):
        return kind in ("str", "path", "raw")
    if qtype == "integer":
        return kind in ("int", "float", "raw")
    if qtype == "float":
        return kind in ("float", "raw")
    if qtype == "multiplechoice":
        choices = question["choices"]
        if kind == "bool":
            return set(choices) <= {"true", "false"}
        return kind in ("str", "raw") and ("choices" not in option or set(choices) <= set(option["choices"]))
    if qtype == "multiselect":
        if kind != "list":
            return False
        if option.get("elements") == "int":
            return all(re.match(r"^[0-9]+$", c) for c in question["choices"])
        return option.get("elements", "str") == "str"
    return False


def as_answer(question, value):
    """A role default written the way the survey question holds its default."""
    if question["type"] == "multiselect":
        return "\n".join(str(v) for v in value)
    if question["type"] == "multiplechoice" and isinstance(value, bool):
        return "true" if value else "false"
    return value


def test_awx_assets_have_the_export_shape_and_resolve():
    assets = awx_assets()
    assert set(assets) == {"projects", "execution_environments", "inventory", "job_templates"}
    names = dict((kind, set(o["name"] for o in objs)) for kind, objs in assets.items())
    for kind in assets:
        for obj in assets[kind]:
            assert obj["natural_key"]["name"] == obj["name"], obj["name"]
    for jt in assets["job_templates"]:
        assert jt["natural_key"]["type"] == "job_template" and jt["job_type"] in ("run", "check")
        assert jt["project"]["name"] in names["projects"] and jt["inventory"]["name"] in names["inventory"]
        assert jt["execution_environment"]["name"] in names["execution_environments"]
        assert os.path.isfile(os.path.join(ROOT, jt["playbook"])), jt["playbook"]
        assert jt["survey_enabled"] is True and jt["related"]["survey_spec"]["spec"]
        assert isinstance(yaml.safe_load(jt["extra_vars"]) or {}, dict)
    for source in assets["inventory"][0]["related"]["inventory_sources"]:
        assert os.path.isfile(os.path.join(ROOT, source["source_path"])) and source["source_project"]["name"] in names["projects"]


@pytest.mark.parametrize("name,playbook,count", [("canary", "playbooks/canary.yml", 1), ("site", "playbooks/site.yml", 1),
                                                 ("canary_command", "playbooks/canary_command.yml", 4)])
def test_survey_questions_fit_the_roles_argument_specs(name, playbook, count):
    survey = load_json("awx", "surveys", name + ".json")
    templates = [jt for jt in awx_assets()["job_templates"] if jt["playbook"] == playbook]
    assert len(templates) == count and all(t["related"]["survey_spec"] == survey for t in templates), "awx/assets.json holds the same survey"
    options = {}
    for role in playbook_roles(os.path.basename(playbook)):
        options.update(role_options(role))
    assert set(survey) == {"name", "description", "spec"} and survey["spec"]
    variables = [q["variable"] for q in survey["spec"]]
    assert len(variables) == len(set(variables))
    for q in survey["spec"]:
        var = q["variable"]
        assert {"question_name", "question_description", "required", "type", "variable", "default"} <= set(q), var
        assert q["type"] in SURVEY_TYPES, var
        assert var in options, "%s is not an option of the roles %s runs" % (var, playbook)
        option = options[var]
        assert compatible(q, option), "%s: survey type %s for an argument spec of type %s" % (var, q["type"], option.get("type"))
        if "default" in option:
            assert q["default"] == as_answer(q, option["default"]), "%s: survey default differs from the role's" % var
        if q["type"] in ("integer", "float"):
            assert q["min"] <= q["default"] <= q["max"], var
        if q["type"] in ("text", "textarea", "password"):
            assert isinstance(q["min"], int) and isinstance(q["max"], int), var
            assert not q["required"] or q["min"] <= len(q["default"]) <= q["max"] or q["default"] == "", var
        if q["type"] == "multiplechoice":
            assert q["default"] in q["choices"], var
        if q["type"] == "multiselect":
            assert set(q["default"].split("\n")) <= set(q["choices"]), var


def awx_answers(survey, **answers):
    """Extra vars as AWX builds them from a survey's defaults and answers (multiselect: a list of strings)."""
    out = {}
    for q in survey["spec"]:
        value = answers.pop(q["variable"], q["default"])
        if q["type"] == "multiselect" and isinstance(value, str):
            value = [v for v in value.split("\n") if v]
        if value != "" or q["required"]:
            out[q["variable"]] = value
    assert not answers
    return out


@pytest.mark.parametrize("name,playbook,answers,error", [
    ("canary", "canary.yml", {"canary_service": "payment"}, None),
    ("canary", "canary.yml", {"canary_service": "payment", "canary_steps": ["10", "50", "100"], "canary_wait_for_mesh": "true",
                              "canary_on_failure": "hold", "canary_min_success_rate": 99.5}, None),
    ("canary", "canary.yml", {"canary_service": "payment", "canary_max_latency_ms": "fast"}, "canary_max_latency_ms"),
    ("site", "site.yml", {}, None),
    ("site", "site.yml", {"istio_move_tags": "false", "kubernetes_kube_proxy_mode": "ipvs", "mesh_namespace_mtls_mode": "STRICT"}, None),
    ("site", "site.yml", {"istio_move_tags": "maybe"}, "istio_move_tags"),
    ("site", "site.yml", {"kvm_host_expected_pods": "many"}, "kvm_host_expected_pods"),
], ids=["canary-defaults", "canary-answers", "canary-wrong-type", "site-defaults", "site-answers", "site-not-bool", "site-not-int"])
def test_survey_answers_pass_the_roles_own_validation(tmp_path, name, playbook, answers, error):
    """What AWX would send, through the same validate_argument_spec the roles start with."""
    extravars = awx_answers(load_json("awx", "surveys", name + ".json"), **answers)
    extravars.update(survey_roles=sorted(set(playbook_roles(playbook))), roles_dir=os.path.join(ROOT, "roles"))
    answers_file = tmp_path / "answers.json"
    answers_file.write_text(json.dumps(extravars))
    run = ansible_playbook(os.path.join("tests", "integration", "targets", "awx_survey", "validate.yml"), "-e", "@%s" % answers_file)
    if error is None:
        assert run.returncode == 0, run.stdout + run.stderr
    else:
        assert run.returncode != 0 and error in run.stdout, run.stdout + run.stderr


def test_one_command_template_per_operator_command():
    templates = [jt for jt in awx_assets()["job_templates"] if jt["playbook"] == "playbooks/canary_command.yml"]
    actions = sorted(yaml.safe_load(t["extra_vars"])["canary_command_action"] for t in templates)
    assert actions == ["abort", "pause", "promote", "resume"]
    assert sorted(t["name"] for t in templates) == ["onprem.mesh canary %s" % a for a in actions]


def test_canary_survey_covers_the_release_inputs():
    variables = set(q["variable"] for q in load_json("awx", "surveys", "canary.json")["spec"])
    assert {"canary_service", "canary_namespace", "canary_stable_subset", "canary_canary_subset", "canary_steps",
            "canary_interval", "canary_on_failure", "canary_min_success_rate", "canary_max_latency_ms",
            "canary_failure_limit"} <= variables


def test_execution_environment_builds_a_context_offline(tmp_path):
    ee = load_yaml("awx", "execution-environment.yml")
    assert ee["version"] == 3
    context = tmp_path / "context"
    run = subprocess.run([os.path.join(VENV_BIN, "ansible-builder"), "create", "-f", os.path.join(ROOT, "awx", "execution-environment.yml"),
                          "-c", str(context), "--output-filename", "Containerfile"], cwd=str(tmp_path), env=env(),
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    containerfile = (context / "Containerfile").read_text()
    assert "FROM" in containerfile and "ansible-galaxy" in containerfile
    with open(os.path.join(ROOT, "requirements", "runtime.txt"), encoding="utf-8") as f:
        assert (context / "_build" / "requirements.txt").read_text().split() == f.read().split()
    built = yaml.safe_load((context / "_build" / "requirements.yml").read_text())["collections"]
    project = [c for c in load_yaml("collections", "requirements.yml")["collections"] if c.get("type") != "dir"]
    assert built == project, "the EE's collections are the project's dependencies, same versions"


def test_requirements_install_this_collection_from_the_project_folder(tmp_path):
    """What an AWX project sync runs: ansible-galaxy in the project's root, into a cache path; the dependencies are
    found installed (here: this work tree's dependency collections; in AWX: Galaxy or the EE)."""
    requirements = load_yaml("collections", "requirements.yml")["collections"]
    assert [c["name"] for c in requirements if c.get("type") != "dir"] == list(load_yaml("galaxy.yml")["dependencies"])
    deps = tmp_path / "deps" / "ansible_collections"
    for fqcn in load_yaml("galaxy.yml")["dependencies"]:
        ns, name = fqcn.split(".")
        (deps / ns).mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.join(ROOT, "collections", "ansible_collections", ns, name), str(deps / ns / name))
    out = tmp_path / "requirements_collections"
    run = subprocess.run([os.path.join(VENV_BIN, "ansible-galaxy"), "collection", "install", "-r", "collections/requirements.yml",
                          "--collections-path", str(out), "--offline"], cwd=ROOT,
                         env=dict(env(), ANSIBLE_COLLECTIONS_PATH=str(tmp_path / "deps"), ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp")),
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    installed = out / "ansible_collections" / "onprem" / "mesh"
    manifest = json.loads((installed / "MANIFEST.json").read_text())["collection_info"]
    assert manifest["namespace"] == "onprem" and manifest["name"] == "mesh"
    for path in ("roles/canary/meta/argument_specs.yml", "playbooks/site.yml", "playbooks/canary.yml", "plugins/modules/canary_rollout.py"):
        assert (installed / path).is_file(), path
    for ignored in (".venv", "awx", "inventories", "collections/ansible_collections"):
        assert not (installed / ignored).exists(), ignored
    shutil.rmtree(str(out))


# --- roles usable on their own --------------------------------------------------------------------------------

@pytest.mark.parametrize("role", ROLES)
def test_role_is_usable_on_its_own(role):
    options = role_options(role)
    defaults = load_yaml("roles", role, "defaults", "main.yml") or {}
    assert set(defaults) == set(options), "defaults/main.yml and meta/argument_specs.yml list the same variables"
    for name, option in options.items():
        assert name.startswith(role + "_"), name
        assert option.get("description"), "%s has no description" % name
        if "default" in option and "{{" not in str(defaults[name]):
            assert option["default"] == defaults[name], name
    readme = os.path.join(ROOT, "roles", role, "README.md")
    assert os.path.isfile(readme), "roles/%s/README.md" % role
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    assert re.search(r"```ya?ml\n.*role: onprem\.mesh\.%s\b" % role, text, re.S), "README has a minimal example"
