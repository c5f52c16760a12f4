# Copyright: onprem.mesh maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters of the mesh_namespace role: the sidecar ("2/2") report over pods, and the Deployments to restart."""

from __future__ import annotations

SIDECAR = "istio-proxy"
INJECT_KEY = "sidecar.istio.io/inject"


def _has_sidecar(spec):
    """A pod has the sidecar as a container, or as a native sidecar (init container that restarts Always)."""
    if any(c.get("name") == SIDECAR for c in spec.get("containers") or []):
        return True
    return any(c.get("name") == SIDECAR and c.get("restartPolicy") == "Always" for c in spec.get("initContainers") or [])


def _ready_count(pod):
    status = pod.get("status") or {}
    spec = pod.get("spec") or {}
    statuses = list(status.get("containerStatuses") or [])
    native = {c.get("name") for c in spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"}
    statuses += [s for s in status.get("initContainerStatuses") or [] if s.get("name") in native]
    total = len(spec.get("containers") or []) + len(native)
    return sum(1 for s in statuses if s.get("ready")), total


def _injection_disabled(pod):
    meta = pod.get("metadata") or {}
    for source in ("labels", "annotations"):
        value = (meta.get(source) or {}).get(INJECT_KEY)
        if value is not None and str(value).lower() == "false":
            return source[:-1]
    return None


def _pending_cause(pod, memory_request):
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            message = cond.get("message") or cond.get("reason") or "unschedulable"
            if "Insufficient memory" in message:
                return ("pending for lack of memory: no node has room for the pod and its sidecar (sidecar request "
                        f"{memory_request}); lower istio_proxy_memory_request or the pod's requests, or add nodes ({message})")
            if "Insufficient cpu" in message:
                return f"pending for lack of CPU: no node has room for the pod and its sidecar ({message})"
            return f"pending, not scheduled: {message}"
    return "pending: " + (status.get("reason") or status.get("message") or "waiting for its containers")


def sidecar_report(pods, namespace_labels=None, memory_request="the sidecar's memory request"):
    """Return one entry per pod: namespace, pod, ready ("2/2"), sidecar (bool), ok (bool) and cause (when not ok).

    pods: Pod objects as returned by kubernetes.core.k8s_info. namespace_labels: {namespace: labels} to explain pods
    in namespaces where injection is not enabled. Finished pods (Succeeded, Failed) are left out.
    """
    namespace_labels = namespace_labels or {}
    report = []
    for pod in pods or []:
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        phase = (pod.get("status") or {}).get("phase", "Unknown")
        if phase in ("Succeeded", "Failed"):
            continue
        ready, total = _ready_count(pod)
        sidecar = _has_sidecar(spec)
        entry = {"namespace": meta.get("namespace", ""), "pod": meta.get("name", ""), "phase": phase,
                 "ready": f"{ready}/{total}", "sidecar": sidecar, "ok": False, "cause": ""}
        labels = namespace_labels.get(entry["namespace"], {}) or {}
        disabled = _injection_disabled(pod)
        if not sidecar:
            if disabled:
                entry["cause"] = (f"injection disabled on the pod ({disabled} {INJECT_KEY}=false); remove it from the "
                                  "pod template if this workload belongs in the mesh")
            elif spec.get("hostNetwork"):
                entry["cause"] = "host-network pods are never injected"
            elif labels and labels.get("istio-injection") != "enabled" and not labels.get("istio.io/rev"):
                entry["cause"] = "injection is not enabled on its namespace (no istio-injection or istio.io/rev label)"
            elif labels.get("istio-injection") == "disabled":
                entry["cause"] = "injection disabled on its namespace (istio-injection=disabled overrides istio.io/rev)"
            elif phase == "Pending":
                entry["cause"] = _pending_cause(pod, memory_request)
            else:
                entry["cause"] = ("created before injection was enabled, or while the injector was unavailable: restart "
                                  "its workload (mesh_namespace_restart_deployments: true)")
        elif phase == "Pending":
            entry["cause"] = _pending_cause(pod, memory_request)
        elif ready < total:
            entry["cause"] = f"not all containers are ready ({ready}/{total}); see kubectl describe pod"
        else:
            entry["ok"] = True
        report.append(entry)
    return report


def _selects(match_labels, labels):
    return bool(match_labels) and all((labels or {}).get(k) == v for k, v in match_labels.items())


def deployments_without_sidecars(deployments, pods):
    """Deployments with at least one running or pending pod that lacks the sidecar (and does not opt out)."""
    result = []
    for deploy in deployments or []:
        meta = deploy.get("metadata") or {}
        match = ((deploy.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        template_meta = (((deploy.get("spec") or {}).get("template") or {}).get("metadata")) or {}
        if _injection_disabled({"metadata": template_meta}):
            continue
        for pod in pods or []:
            pmeta = pod.get("metadata") or {}
            if pmeta.get("namespace") != meta.get("namespace") or not _selects(match, pmeta.get("labels")):
                continue
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                continue
            if not _has_sidecar(pod.get("spec") or {}) and not _injection_disabled(pod):
                result.append({"namespace": meta.get("namespace"), "name": meta.get("name")})
                break
    return result


def unavailable_deployments(deployments):
    """Names of Deployments with fewer available (or updated) replicas than desired."""
    names = []
    for deploy in deployments or []:
        desired = (deploy.get("spec") or {}).get("replicas", 1)
        status = deploy.get("status") or {}
        if status.get("availableReplicas", 0) < desired or status.get("updatedReplicas", desired) < desired:
            names.append((deploy.get("metadata") or {}).get("name", ""))
    return names


class FilterModule:
    """mesh_namespace filters."""

    def filters(self):
        return {
            "mesh_namespace_sidecar_report": sidecar_report,
            "mesh_namespace_deployments_without_sidecars": deployments_without_sidecars,
            "mesh_namespace_unavailable_deployments": unavailable_deployments,
        }
