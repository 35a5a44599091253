import contextlib

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


def fake_config(connector: str | None, module: str | None = None, ranks: int = 1):
    from types import SimpleNamespace

    transfer = None if connector is None else SimpleNamespace(
        kv_connector=connector, kv_connector_module_path=module)
    return SimpleNamespace(kv_transfer_config=transfer,
                           parallel_config=SimpleNamespace(local_world_size=ranks))


def test_reservation_is_vanilla_only_for_symram_and_only_when_unset():
    from symram_vllm.connectors.plugin import RESERVED_CPU_ENV, reservation_env

    assert reservation_env(fake_config("symram"), {}) == "1"
    assert reservation_env(fake_config("symram", ranks=2), {}) == "2"
    assert reservation_env(fake_config("SymramConnector",
                                       "symram_vllm.connectors.symram_connector"), {}) == "1"
    assert reservation_env(fake_config("symram"), {RESERVED_CPU_ENV: "3"}) is None
    assert reservation_env(fake_config("NixlConnector"), {}) is None
    assert reservation_env(fake_config(None), {}) is None


def test_plugin_sets_the_reservation_before_vllm_reads_it(monkeypatch):
    """The wrapped OMPProcessManager constructor sets the variable, then runs vLLM's own
    constructor, which reads it (a fake config makes vLLM's part stop early)."""
    import os

    from vllm.utils import ompmultiprocessing

    from symram_vllm.connectors.plugin import RESERVED_CPU_ENV

    register()
    register()
    init = ompmultiprocessing.OMPProcessManager.__init__
    assert getattr(init, "_symram_wrapped", False)
    monkeypatch.delenv(RESERVED_CPU_ENV, raising=False)
    with contextlib.suppress(AttributeError):
        ompmultiprocessing.OMPProcessManager(fake_config("NixlConnector"))
    assert RESERVED_CPU_ENV not in os.environ
    with contextlib.suppress(AttributeError):
        ompmultiprocessing.OMPProcessManager(fake_config("symram"))
    assert os.environ[RESERVED_CPU_ENV] == "1"
    monkeypatch.setenv(RESERVED_CPU_ENV, "0")
    with contextlib.suppress(AttributeError):
        ompmultiprocessing.OMPProcessManager(fake_config("symram"))
    assert os.environ[RESERVED_CPU_ENV] == "0"  # the user's choice wins
