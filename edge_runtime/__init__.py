"""The edge runtime: artifact store, program backends and the device agent.

Imports no torch: only the ExecuTorch backend does, when it is chosen. Names load on first
use, so importing one module (``edge_runtime.artifacts``) does not start the agent's
imports; the wire contract both ends share is :mod:`eclm_wire`.
"""

from __future__ import annotations

from eclm_common.lazy import lazy_exports

_EXPORTS = {
    "AgentConfig": "edge_runtime.agent",
    "AgentState": "edge_runtime.agent",
    "EdgeAgent": "edge_runtime.agent",
    "ArtifactStore": "edge_runtime.artifacts",
    "sha256_bytes": "edge_runtime.artifacts",
    "Backend": "edge_runtime.backends",
    "Program": "edge_runtime.backends",
    "TensorSpec": "edge_runtime.backends",
    "get_backend": "edge_runtime.backends",
    "DataSet": "edge_runtime.datasets",
    "Samples": "edge_runtime.datasets",
    "load_eval_set": "edge_runtime.datasets",
    "read_dataset": "edge_runtime.datasets",
    "ArtifactError": "edge_runtime.errors",
    "BackendError": "edge_runtime.errors",
    "BackendUnavailable": "edge_runtime.errors",
    "DataError": "edge_runtime.errors",
    "BrokerUnreachable": "edge_runtime.errors",
    "EdgeError": "edge_runtime.errors",
    "ProtocolError": "edge_runtime.errors",
    "ExitCode": "eclm_common.exit_codes",
    "BrokerAddress": "eclm_wire.mqtt",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
