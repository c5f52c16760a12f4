# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.onprem.mesh.tests.unit.plugins.modules.module_exits import exits  # noqa: F401 pylint: disable=unused-import
