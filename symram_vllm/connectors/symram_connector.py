"""SymramConnector: the vLLM ``KVConnectorBase_V1`` implementation.

vLLM builds one instance per role: the scheduler-side instance (in the engine-core
process) decides loads and saves; each worker-side instance (one per GPU/TP rank,
usually another process) copies pages. The two halves talk only through vLLM's
per-step metadata, so the design works for any executor and any TP size.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
    supports_hma,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from symram_vllm import bypass, latency_sink
from symram_vllm.config import ConfigError, SymramConfig, load_config
from symram_vllm.connectors.families import check_model_family, windowed_groups
from symram_vllm.connectors.kv_layout_choice import choose_kv_layout
from symram_vllm.connectors.metadata import SymramConnectorMetadata, SymramWorkerMetadata
from symram_vllm.connectors.scheduler import SchedulerSide
from symram_vllm.connectors.vllm_stats import SymramConnectorStats, SymramPromMetrics
from symram_vllm.connectors.worker import WorkerSide
from symram_vllm.directory import open_fleet_directory
from symram_vllm.directory.async_directory import AsyncDirectory
from symram_vllm.keys import ModelSignature
from symram_vllm.tiers.disk_layout import store_id

if TYPE_CHECKING:
    from collections.abc import Iterable

    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
        PromMetric,
        PromMetricT,
    )
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

# Hash algorithms whose block hashes are identical in every process and machine.
REPRODUCIBLE_HASH_ALGOS = ("sha256_cbor", "sha256")


class SymramStartupError(RuntimeError):
    """The engine configuration cannot be served correctly by symram."""


def ensure_reproducible_hashes(vllm_config: VllmConfig) -> str:
    """Make vLLM hash prefixes with sha256_cbor, or refuse with the fix.

    Pages are found again by block hash across processes, restarts and machines, so
    the hash must not depend on a per-process seed. vLLM reads the algorithm after
    the scheduler (and this connector) is built, so switching it here takes effect.
    """
    cache_config = vllm_config.cache_config
    algo = cache_config.prefix_caching_hash_algo
    if algo == "sha256_cbor":
        return algo
    if algo == "sha256":
        # Same strength, but CBOR is canonical across Python versions and languages
        # (the gateway recomputes these hashes to route requests).
        cache_config.prefix_caching_hash_algo = "sha256_cbor"
        logger.info("symram: using --prefix-caching-hash-algo sha256_cbor (reproducible)")
        return "sha256_cbor"
    raise SymramStartupError(
        f"symram cannot use --prefix-caching-hash-algo {algo}: its hashes are seeded per "
        "process, so stored KV would never be found again (or found by the wrong prompt "
        "after a restart). Start vLLM with --prefix-caching-hash-algo sha256_cbor."
    )


def shared_tier_names(config: SymramConfig) -> tuple[str, frozenset[str]]:
    """(this engine's disk tier name in the directory, the tiers its workers can read
    whatever engine wrote them).

    The disk tier is "disk.<id of the storage behind disk_path>" when disk_share is on:
    engines that mount the same filesystem read the same id, so they count each
    other's disk pages and nobody else's (an engine with its own local disk at the same
    path has another id). The Redis page tier is "redis" when this engine uses it."""
    shared: set[str] = set()
    disk_tier = "disk"
    if config.disk_path is not None and config.disk_share:
        sid = store_id(config.disk_path)
        if sid is not None:
            disk_tier = f"disk.{sid[:16]}"
            shared.add(disk_tier)
        else:
            logger.warning(
                "symram: cannot read or create the store id under %s; its disk pages are "
                "not shared with other engines", config.disk_path,
            )
    if config.redis_pages_bytes > 0 and (config.redis_pages_url or config.directory_url):
        shared.add("redis")
    return disk_tier, frozenset(shared)


def _open_directory(
    config: SymramConfig, namespace: bytes, shared_tiers: frozenset[str]
) -> AsyncDirectory:
    """The block directory: in-process by default, Redis when directory_url is set,
    always behind an ``AsyncDirectory`` so the scheduler loop never does network I/O.

    A block counts as loadable when this instance holds it, or when any instance put
    it in one of `shared_tiers` (tiers this instance's workers can read)."""
    instance = config.instance_id or f"{socket.gethostname()}:{os.getpid()}"
    try:
        return open_fleet_directory(
            config.directory_url, namespace=namespace, instance_id=instance,
            shared_tiers=shared_tiers, settings=getattr(config, "redis", None),
        )
    except ValueError as exc:
        raise SymramStartupError(f"symram directory_url: {exc}") from exc


def page_bytes_of(
    codec: str, num_layers: int, block_elems: tuple[int, ...], dtype: torch.dtype, shards: int
) -> int:
    """Bytes of one block's pages over all TP shards (for dedupe accounting); 0 if the
    codec cannot say."""
    from symram_vllm.codecs import get_codec
    from symram_vllm.codecs.base import FixedSizeCodec, PageGeometry

    try:
        geometry = PageGeometry(num_layers, *block_elems, dtype)
        if codec == "none":
            return geometry.page_bytes * shards
        built = get_codec(codec, geometry, measure_error=False)
        return built.encoded_size() * shards if isinstance(built, FixedSizeCodec) else 0
    except (ValueError, TypeError):
        return 0


def _read_config(vllm_config: VllmConfig) -> SymramConfig:
    extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
    try:
        return load_config(extra)
    except ConfigError as exc:
        raise SymramStartupError(
            f"{exc}. Fix kv_connector_extra_config in --kv-transfer-config, the SYMRAM_* "
            "environment variables, or the file named by SYMRAM_CONFIG."
        ) from exc


def build_signature(
    vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, hash_algo: str, codec: str = "none"
) -> tuple[ModelSignature, tuple[int, ...]]:
    groups = kv_cache_config.kv_cache_groups
    # families.check_model_family has refused groups that differ in block shape.
    spec = groups[0].kv_cache_spec
    head_v = getattr(spec, "head_size_v", None) or spec.head_size
    num_heads = getattr(spec, "num_kv_heads", 1)
    block_elems = (num_heads, spec.block_size, spec.head_size + head_v)
    parallel = vllm_config.parallel_config
    signature = ModelSignature(
        model=str(vllm_config.model_config.model),
        dtype=str(spec.dtype).removeprefix("torch."),
        block_size=spec.block_size,
        kv_layout=(
            f"{type(spec).__name__}:H{num_heads}:D{spec.head_size}+{head_v}:"
            f"{vllm_config.device_config.device_type}"
            # Hybrid allocator on: pages are ordered by vLLM's layer registration, which
            # may differ from the single-group order, so the two never share pages.
            + (f":G{len(groups)}" if len(groups) > 1 else "")
        ),
        tp_size=parallel.tensor_parallel_size * parallel.pipeline_parallel_size,
        codec=codec,
        hash_algo=hash_algo,
        num_layers=sum(len(group.layer_names) for group in groups),
    )
    return signature, block_elems


def layer_groups_of(kv_cache_config: KVCacheConfig) -> dict[str, int] | None:
    """Each layer's KV-cache group when there are several (vLLM's hybrid allocator)."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) < 2:
        return None
    return {name: g for g, group in enumerate(groups) for name in group.layer_names}


class SymramConnector(KVConnectorBase_V1, SupportsHMA):
    """Keeps vLLM's hybrid allocator (SupportsHMA): a hybrid model (sliding-window and
    full-attention layers) gets its KV-cache groups, each with its own block ids, and a
    page holds a token block of every layer whatever group it is in."""

    _cache_hit_source = CacheHitSource.HOST

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        try:
            setting = _read_config(vllm_config).kv_layout
        except SymramStartupError:
            return None  # __init__ reports the bad config with its full message
        return choose_kv_layout(setting, vllm_config.device_config.device_type)

    @property
    def requires_kv_delivery(self) -> bool:
        # A best-effort cache: a dropped save is a future miss, never an error.
        return False

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.config = _read_config(vllm_config)
        bypass.configure(self.config.control_port)  # the engine-wide kill switch
        # One clear refusal at start for a model family symram cannot serve (Mamba and
        # linear-attention state, MLA without prefix caching, 8-bit codecs over an fp8
        # cache), naming the layer kinds and what to do: never a crash mid-serving.
        refusal = check_model_family(
            vllm_config, kv_cache_config, self.config.codec, hma=supports_hma(self)
        )
        if refusal is not None:
            raise SymramStartupError(refusal)
        hash_algo = ensure_reproducible_hashes(vllm_config)
        signature, block_elems = build_signature(
            vllm_config, kv_cache_config, hash_algo, self.config.codec
        )
        self.signature = signature
        self.block_size = signature.block_size
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            transfer = vllm_config.kv_transfer_config
            if (
                transfer.kv_load_failure_policy != "recompute"
                and not self.config.fail_on_load_error
            ):
                # A page that cannot be loaded must cost a recompute, never a request.
                transfer.kv_load_failure_policy = "recompute"
            disk_tier, shared = shared_tier_names(self.config)
            spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
            self._scheduler = SchedulerSide(
                signature.digest(), self.block_size, self.config,
                directory=_open_directory(self.config, signature.digest(), shared),
                page_bytes=page_bytes_of(
                    self.config.codec, signature.num_layers, block_elems, spec.dtype,
                    signature.tp_size,
                ),
                disk_tier=disk_tier,
                shared_tiers=shared,
                tp_size=signature.tp_size,
                num_groups=len(kv_cache_config.kv_cache_groups),
                windowed_groups=windowed_groups(kv_cache_config),
            )
            seeded = self._scheduler.seed_from_disk(signature.tp_size)
            logger.info(
                "symram scheduler: signature %s (%s), codec %s, DRAM budget %d bytes, disk %s "
                "(%d blocks found), directory %s, shared tiers %s",
                signature.short(),
                signature.kv_layout,
                self.config.codec,
                self.config.dram_bytes,
                self.config.disk_path or "off",
                seeded,
                type(self._scheduler.directory).__name__,
                ", ".join(sorted(shared)) or "none",
            )
        else:
            rank = vllm_config.parallel_config.rank
            info: dict[str, object] = {
                "instance_id": self.config.instance_id,
                "signature_digest": signature.digest().hex(),
                "block_size": self.block_size,
                "tp_size": signature.tp_size,
                "codec": self.config.codec,
                "model": signature.model,
            }
            self._worker = WorkerSide(self.config, rank, namespace=signature.digest(), info=info)
            self._expected_block_elems = block_elems
            self._expected_blocks = kv_cache_config.num_blocks
            self._layer_groups = layer_groups_of(kv_cache_config)

    # ---------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        first = next(iter(kv_caches.values()), None)
        expected = 1
        for dim in self._expected_block_elems:
            expected *= dim
        if first is not None and (
            first.shape[0] != self._expected_blocks or first[0].numel() != expected
        ):
            self._worker._disable(
                f"KV cache tensor {tuple(first.shape)} does not hold {self._expected_blocks} "
                f"blocks of {self._expected_block_elems} elements"
            )
            return
        self._worker.register_kv_caches(kv_caches, self._layer_groups)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if self._worker is not None and isinstance(kv_connector_metadata, SymramConnectorMetadata):
            self._worker.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert self._worker is not None and isinstance(meta, SymramConnectorMetadata)
        # vLLM runs connector-only steps with no attention metadata.
        idle = getattr(forward_context, "attn_metadata", None) is None
        self._worker.start_loads(meta, idle_step=idle)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Loads are whole-request and asynchronous: a request only runs after
        # get_finished() reported its load, so no layer ever waits here.
        return

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        # Saves are submitted once per step in wait_for_save, after the forward pass
        # has written every layer, as one job per request.
        return

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert self._worker is not None and isinstance(meta, SymramConnectorMetadata)
        self._worker.submit_saves(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self._worker is not None
        sending, recving = self._worker.get_finished(finished_req_ids)
        return sending or None, recving or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self._worker is not None
        sending, recving = self._worker.get_finished(finished_req_ids)
        # Several KV-cache groups: vLLM takes load failures per request only.
        return KVConnectorTransferResults(
            finished_sending=sending, finished_recving=recving,
            failed_recving=self._worker.take_failed_loads(recving),
        )

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None
        return self._worker.take_load_errors()

    def build_connector_worker_meta(self) -> SymramWorkerMetadata | None:
        return self._worker.build_worker_meta() if self._worker is not None else None

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._scheduler is not None:
            counters, gauges = self._scheduler.take_stats()
        elif self._worker is not None:
            counters, gauges = self._worker.take_counters()
        else:
            return None
        stats = SymramConnectorStats()
        for name, value in counters.items():
            if value:
                stats.add(name, value)
        for name, value in gauges.items():
            stats.set_gauge(name, value)
        stats.add_latencies(latency_sink.drain())
        stats.set_gauge("bypass_active", float(bypass.bypass_active()))
        return None if stats.is_empty() else stats

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.directory.close()

    # ------------------------------------------------------------- scheduler side
    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        if self._scheduler is not None:
            self._scheduler.kv_cache_manager = kv_cache_manager

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self._scheduler is not None
        meta = connector_output.kv_connector_worker_meta
        self._scheduler.update_connector_output(
            meta if isinstance(meta, SymramWorkerMetadata) else None,
            connector_output.finished_recving,
        )

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.request_finished(request), None

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.request_finished(request), None

    def has_pending_push_work(self) -> bool:
        # Pages still being written to disk or Redis: a few more steps deliver their
        # events, so other engines can find them even if this one goes idle.
        return self._scheduler is not None and self._scheduler.has_pending_work()

    def take_events(self) -> Iterable[KVCacheEvent]:
        # symram's tiers in vLLM's KV event stream (--kv-events-config publishes it).
        return self._scheduler.events.take() if self._scheduler is not None else ()

    # ------------------------------------------------------------------- metrics
    @classmethod
    def build_kv_connector_stats(
        cls, data: dict[str, Any] | None = None
    ) -> KVConnectorStats | None:
        return SymramConnectorStats(data=data) if data is not None else SymramConnectorStats()

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics | None:
        return SymramPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
