"""vLLM general-plugin entry point: registers the connector name ``symram``.

vLLM calls general plugins in every process it starts (API server, engine core,
workers), and ``KVConnectorFactory.register_connector`` raises on a second call, so
registration is guarded.
"""

from __future__ import annotations

CONNECTOR_NAME = "symram"
CONNECTOR_MODULE = "symram_vllm.connectors.symram_connector"
CONNECTOR_CLASS = "SymramConnector"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    _configure_logging()
    if CONNECTOR_NAME in KVConnectorFactory._registry:
        return
    KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_CLASS)


def _configure_logging() -> None:
    """vLLM configures only its own loggers; give ours the same visibility."""
    import logging

    log = logging.getLogger("symram_vllm")
    if log.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [symram] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
