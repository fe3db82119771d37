"""The edge runtime: wire contract, artifact store, program backends and the device agent.

Imports no torch: only the ExecuTorch backend does, when it is chosen.
"""

from edge_runtime.agent import AgentConfig, AgentState, EdgeAgent
from edge_runtime.artifacts import ArtifactStore, sha256_bytes
from edge_runtime.backends import Backend, Program, TensorSpec, get_backend
from edge_runtime.errors import (
    ArtifactError,
    BackendError,
    BackendUnavailable,
    BrokerUnreachable,
    EdgeError,
    ProtocolError,
)
from edge_runtime.exit_codes import ExitCode
from edge_runtime.mqtt import BrokerAddress

__all__ = [
    "AgentConfig",
    "AgentState",
    "ArtifactError",
    "ArtifactStore",
    "Backend",
    "BackendError",
    "BackendUnavailable",
    "BrokerAddress",
    "BrokerUnreachable",
    "EdgeAgent",
    "EdgeError",
    "ExitCode",
    "Program",
    "ProtocolError",
    "TensorSpec",
    "get_backend",
    "sha256_bytes",
]
