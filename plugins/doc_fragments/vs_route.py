# -*- coding: utf-8 -*-
# Copyright (c) onprem.mesh contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    """Which VirtualService and which of its HTTP routes a module changes (traffic_split, canary_rollout)."""

    DOCUMENTATION = r"""
options:
  name:
    description: Name of the VirtualService.
    type: str
    required: true
  namespace:
    description: Namespace of the VirtualService and of its DestinationRule (and, for a rollout, of the canary Deployment).
    type: str
    default: default
  service_host:
    description:
      - The service whose subsets get the weights, as written in the route's C(destination.host).
        Short and fully qualified names of the same service match.
      - Defaults to the VirtualService's only entry in C(spec.hosts).
    type: str
  route_name:
    description:
      - Choose the HTTP route by its C(name). Mutually exclusive with O(route_index).
      - Without either, the one HTTP route whose destinations are all subsets of O(service_host) is chosen;
        if there are several, the module fails and lists them.
    type: str
  route_index:
    description:
      - Choose the HTTP route by its position in C(spec.http), from 0.
      - Routes whose name begins with C(onprem-mesh-canary-match) are the match routes of M(onprem.mesh.canary_rollout)'s
        match steps. They are never the route to change and are not counted here, nor chosen by O(route_name) or without
        either option.
    type: int
  conflict_retries:
    description:
      - How many times to read again and retry a write that another client's change got in the way of.
      - Every write is a JSON patch that begins with C(test) operations on what it relies on, as just read. When another
        client changed any of that in between, kube-apiserver refuses the whole patch (HTTP 422 without causes, or 409).
        The module then reads the VirtualService again, rebuilds the patch from what it finds, so the other client's
        change is kept, and sends it again, at most O(conflict_retries) more times, waiting 0.1 s more after each
        attempt (at most 1 s). A 422 that lists causes (a schema or validation error) is never retried.
    type: int
    default: 5
"""
