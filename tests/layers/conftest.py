"""Fixtures for the outer layers: a copy of the tree where ansible-test accepts it."""
import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # layer_tools (pytest runs with --import-mode=importlib)

from layer_tools import BUILD, DEPENDENCIES, ROOT, tracked_files  # pylint: disable=import-error


@pytest.fixture(scope="session")
def collection_tree():
    """The tracked files copied to .build/ansible_collections/onprem/mesh (ansible-test rejects a link),
    with the dependency collections beside it."""
    target = os.path.join(BUILD, "onprem", "mesh")
    shutil.rmtree(target, ignore_errors=True)
    for rel in tracked_files():
        dest = os.path.join(target, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), dest)
    # ansible-test wants a git repository or none; a copy without .git is treated as plain files.
    for dep in DEPENDENCIES:
        link = os.path.join(BUILD, dep)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if not os.path.lexists(link):
            os.symlink(os.path.join(ROOT, "collections", "ansible_collections", dep), link)
    yield target
    shutil.rmtree(os.path.dirname(BUILD), ignore_errors=True)
