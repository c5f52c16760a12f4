# -*- coding: utf-8 -*-
# Copyright (c) onprem.mesh contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    """Connection options shared by the modules that talk to the Kubernetes API (same names as kubernetes.core)."""

    DOCUMENTATION = r"""
options:
  kubeconfig:
    description:
      - Path to a kubeconfig file, or its content as a dictionary.
      - When neither O(kubeconfig) nor O(host) is set, the C(KUBECONFIG) environment variable or C(~/.kube/config) is used.
      - Can also be set with the E(K8S_AUTH_KUBECONFIG) environment variable.
    type: raw
  context:
    description:
      - The kubeconfig context to use. Can also be set with E(K8S_AUTH_CONTEXT).
    type: str
  host:
    description:
      - URL of the Kubernetes API server. When set, the kubeconfig is not read.
      - Can also be set with E(K8S_AUTH_HOST).
    type: str
  api_key:
    description:
      - Bearer token for the API server. Never logged. Can also be set with E(K8S_AUTH_API_KEY).
    type: str
  validate_certs:
    description:
      - Whether to verify the API server's TLS certificate.
      - With O(host), verification is on unless this is V(false). With a kubeconfig, the kubeconfig decides unless this is set.
      - Can also be set with E(K8S_AUTH_VERIFY_SSL).
    type: bool
    aliases: [verify_ssl]
  ca_cert:
    description:
      - Path to a CA certificate that signed the API server's certificate. Can also be set with E(K8S_AUTH_SSL_CA_CERT).
    type: path
    aliases: [ssl_ca_cert]
  client_cert:
    description:
      - Path to a client certificate. Can also be set with E(K8S_AUTH_CERT_FILE).
    type: path
    aliases: [cert_file]
  client_key:
    description:
      - Path to the key of O(client_cert). Can also be set with E(K8S_AUTH_KEY_FILE).
    type: path
    aliases: [key_file]
  proxy:
    description:
      - HTTP proxy URL for the API server connection. Can also be set with E(K8S_AUTH_PROXY).
    type: str
  request_timeout:
    description:
      - Seconds after which one request to the API server is given up (connecting and waiting for the answer).
      - A request that timed out counts as not answered and is retried as O(api_retries) says.
    type: float
    default: 30
  api_retries:
    description:
      - How many times more a request is sent when the API server (or a load balancer in front of it) answers
        HTTP 429, 500, 502, 503 or 504, or does not answer (connection refused or reset, O(request_timeout) passed).
      - Between attempts the module waits the answer's C(Retry-After) (at most 10 seconds), or 0.5 seconds doubling
        up to 4 seconds.
      - Reads are always retried. A write is retried only when it is a JSON patch guarded by C(test) operations, as every
        write of these modules is, because such a patch applies to the object it was built for or not at all. When the
        answer to a write was lost and a retry finds the object already changed, the object is read, and the write counts
        as done when the object holds what it set.
      - V(0) sends every request once. When the retries are used up, the error names each answer and this option.
    type: int
    default: 5
requirements:
  - kubernetes >= 29.0.0 (Python library)
"""
