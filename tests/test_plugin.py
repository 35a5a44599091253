from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

from symram_vllm.connectors.plugin import register
from symram_vllm.connectors.symram_connector import SymramConnector


def test_registration_is_idempotent_and_resolves_by_name():
    register()
    register()  # vLLM loads general plugins in every process; a second call must not raise
    config = KVTransferConfig(kv_connector="symram", kv_role="kv_both")
    assert KVConnectorFactory.get_connector_class(config) is SymramConnector


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert names.get("symram") == "symram_vllm.connectors.plugin:register"
