"""Outer layers: tools that check the whole collection. Each is one test, so one pytest session runs all."""
import os
import tarfile
import tempfile

import pytest

from layer_tools import ROOT, run  # pylint: disable=import-error

PYTHON = "3.11"


@pytest.mark.layer("sanity")
def test_ansible_test_sanity(collection_tree):
    run(["ansible-test", "sanity", "--venv", "--python", PYTHON, "--color", "no"], cwd=collection_tree, timeout=2400)


@pytest.mark.layer("units")
def test_ansible_test_units(collection_tree):
    run(["ansible-test", "units", "--venv", "--python", PYTHON, "--color", "no",
         "--requirements"], cwd=collection_tree, timeout=1200)


@pytest.mark.layer("lint")
def test_ansible_lint():
    run(["ansible-lint", "--offline", "--profile", "production", "--nocolor"], env={"ANSIBLE_CONFIG": os.path.join(ROOT, "ansible.cfg")})


@pytest.mark.layer("changelog")
def test_changelog_fragments_lint():
    run(["antsibull-changelog", "lint"])


@pytest.mark.layer("build")
def test_build_install_and_document(tmp_path):
    """The built tarball installs into a fresh collections path and ansible-doc lists every module and role."""
    out = run(["ansible-galaxy", "collection", "build", "--force", "--output-path", str(tmp_path)])
    tarballs = list(tmp_path.glob("onprem-mesh-*.tar.gz"))
    assert len(tarballs) == 1, out
    with tarfile.open(tarballs[0]) as tar:
        names = tar.getnames()
    for ignored in ("inventories/", "extensions/", "tests/output/", "tests/support/", ".venv/", "collections/ansible_collections/", "lab/"):
        assert not any(n.startswith(ignored) for n in names), f"{ignored} must not be shipped"
    dest = tmp_path / "installed"
    config = tmp_path / "ansible.cfg"
    config.write_text("[defaults]\n")
    # A fresh collections path: this collection from the tarball, its dependencies from the offline copy.
    deps = os.path.join(ROOT, "collections", "ansible_collections")
    for dep in ("kubernetes/core", "ansible/posix", "community/general"):
        os.makedirs(dest / "ansible_collections" / dep.split("/", maxsplit=1)[0], exist_ok=True)
        os.symlink(os.path.join(deps, dep), dest / "ansible_collections" / dep)
    env = {"ANSIBLE_COLLECTIONS_PATH": str(dest), "ANSIBLE_CONFIG": str(config)}
    run(["ansible-galaxy", "collection", "install", "--no-deps", "--force", "-p", str(dest), str(tarballs[0])], env=env)
    assert (dest / "ansible_collections" / "onprem" / "mesh" / "MANIFEST.json").is_file()
    with tempfile.TemporaryDirectory() as cwd:
        listing = run(["ansible-doc", "-l", "onprem.mesh"], cwd=cwd, env=env)
        modules = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "plugins", "modules"))
                         if f.endswith(".py") and not f.startswith("_"))
        for module in modules:
            assert f"onprem.mesh.{module}" in listing, f"{module} missing from ansible-doc -l"
            run(["ansible-doc", f"onprem.mesh.{module}"], cwd=cwd, env=env)
        roles = sorted(os.listdir(os.path.join(ROOT, "roles")))
        role_listing = run(["ansible-doc", "-t", "role", "-l", "onprem.mesh"], cwd=cwd, env=env)
        for role in roles:
            assert f"onprem.mesh.{role}" in role_listing, f"role {role} has no argument spec in ansible-doc"
