"""OpenAI-compatible gateway with KV-aware routing in front of vLLM + symram engines.

Public API: ``create_app(config) -> FastAPI``, ``GatewayConfig``, ``load_gateway_config``;
command line: ``python -m symram_vllm.serving.gateway --help`` (docs/gateway.md).
"""

from symram_vllm.serving.gateway.app import create_app
from symram_vllm.serving.gateway.config import (
    BackendConfig,
    ConfigError,
    GatewayConfig,
    load_gateway_config,
)
from symram_vllm.serving.gateway.locator import PrefixHit, PrefixLocator

__all__ = [
    "BackendConfig",
    "ConfigError",
    "GatewayConfig",
    "PrefixHit",
    "PrefixLocator",
    "create_app",
    "load_gateway_config",
]
