"""The Ray layer, thin over ``allocator.jobs``: profiling shards on per-GPU actors, latency tables on a GPU type.

- ``profile_on_ray``: one ``ShardWorker`` actor per bundle of a placement group (``gpus_per_worker`` GPUs and
  ``cpus_per_worker`` CPUs each), each holding one model copy; shards go to them through ``ray.util.ActorPool``.
  A worker that dies is restarted (``max_restarts``) and its call retried (``max_task_retries``); its state
  is gone, but every finished shard is already in the store, so only the lost shard is computed again.
- ``measure_latency``: a Ray task that asks for one GPU of a given ``accelerator_type`` and measures the
  latency table there, so a job can profile on one GPU type and budget latency for another.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import ray
from ray.util import ActorPool
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from kernels.latency import LatencyTable, TimedLayer, timed_layers
from profilers import LayerGraph, build_layer_graph

from .device_latency import measure_here
from .jobs import JobSpec, RaySettings, load_inputs, profile_shard, shard_items
from .store import ProfileRequest, ResultStore

log = logging.getLogger("bitalloc")


class ShardWorker:
    """One model copy (on the worker's GPU when it has one) that profiles shards into the store."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import torch

        from profilers import build_layer_graph

        self.spec = JobSpec.from_dict(spec)
        torch.set_num_threads(max(1, int(self.spec.ray.cpus_per_worker)))
        self.model, self.calib = load_inputs(self.spec)
        if ray.get_gpu_ids() and torch.cuda.is_available():
            self.model.to("cuda")
        self.graph = build_layer_graph(self.model, self.calib[0])
        self.store = ResultStore(self.spec.store_dir)

    def run(self, shard: dict[str, list], request: ProfileRequest) -> dict[str, Any]:
        result = profile_shard(self.model, self.calib, self.graph, self.spec, shard, self.store, request)
        return {**result, "node": ray.get_runtime_context().get_node_id()}


def connect(settings: RaySettings) -> None:
    """Join the cluster at ``settings.address`` (or the job's own cluster; else start a local one)."""
    if not ray.is_initialized():
        ray.init(address=settings.address, log_to_driver=True)


def check_resources(settings: RaySettings) -> None:
    """Refuse, with the numbers, a job that asks for more GPUs or CPUs than the whole cluster has."""
    have = ray.cluster_resources()
    for name, each in (("GPU", settings.gpus_per_worker), ("CPU", settings.cpus_per_worker)):
        need = settings.workers * each
        if need > have.get(name, 0):
            raise ValueError(f"the job asks for {settings.workers} workers x {each:g} {name}s = {need:g} {name}s; "
                             f"the cluster has {have.get(name, 0):g}")


def profile_on_ray(spec: JobSpec, request: ProfileRequest, shards: list[dict[str, list]]) -> Iterator[dict[str, Any]]:
    """Yield one result per shard as it finishes: shards already in the store first (not scheduled), then
    the missing ones, computed by the workers."""
    settings = spec.ray
    store = ResultStore(spec.store_dir)
    todo = store.missing(request, shards)
    for shard in shards:
        if shard not in todo:
            yield {"path": str(store.path(request, shard)), "computed": False, "seconds": 0.0,
                   "items": shard_items(shard)}
    if not todo:
        return
    connect(settings)
    check_resources(settings)
    n = min(settings.workers, len(todo))
    bundle = {"CPU": settings.cpus_per_worker, **({"GPU": settings.gpus_per_worker} if settings.gpus_per_worker else {})}
    pg = placement_group([dict(bundle)] * n, strategy="PACK")
    actors = []
    try:
        ready, _ = ray.wait([pg.ready()], timeout=settings.placement_timeout_s)
        if not ready:
            raise RuntimeError(f"could not place {n} workers of {bundle} within {settings.placement_timeout_s:g} s "
                               f"(no node has room for one, or the cluster is busy; cluster: {ray.cluster_resources()})")
        worker = ray.remote(ShardWorker)
        actors = [worker.options(num_cpus=settings.cpus_per_worker, num_gpus=settings.gpus_per_worker,
                                 max_restarts=settings.max_retries, max_task_retries=settings.max_retries,
                                 scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
                  .remote(spec.to_dict()) for i in range(n)]
        pool = ActorPool(actors)
        yield from pool.map_unordered(lambda actor, shard: actor.run.remote(shard, request), todo)
    finally:
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(pg)


def _measure_task(layers: list[TimedLayer], choices: list[str], tokens: tuple[int, ...],
                  cache_dir: str, spec: JobSpec | None) -> tuple[dict, str]:
    """`measure_here` in a Ray task; with ``spec`` it loads the job's model to time its unquantized rest too."""
    model = graph = None
    if spec is not None:
        model, calib = load_inputs(spec)
        graph = build_layer_graph(model, calib[0])
    table = measure_here(layers, choices, tokens, cache_dir, model=model, graph=graph)
    return table.to_dict(), ray.get_runtime_context().get_node_id()


def measure_latency(graph: LayerGraph, choices: list[str], tokens: int | tuple[int, ...], accelerator: str | None,
                    cache_dir: str, spec: JobSpec | None = None, max_retries: int = 2) -> tuple[LatencyTable, str]:
    """Measure the latency table at ``tokens`` (one count or several) in a Ray task on one GPU of type
    ``accelerator`` (a Ray accelerator label such as "H100"; None: any node, no GPU); with ``spec``, the task also
    loads the job's model and times its unquantized rest. Returns the table and the id of the node it ran on."""
    options: dict[str, Any] = {"max_retries": max_retries}
    if accelerator is not None:
        options.update(num_gpus=1, accelerator_type=accelerator)
    task = ray.remote(_measure_task).options(**options)
    counts = (tokens,) if isinstance(tokens, int) else tuple(tokens)
    table, node = ray.get(task.remote(timed_layers(graph), choices, counts, cache_dir, spec))
    return LatencyTable.from_dict(table), node


def latency_table(spec: JobSpec, graph: LayerGraph, model) -> LatencyTable:
    """The job's latency table, with the rest of its model: in-process without a ``ray:`` section and
    accelerator, else in a Ray task (which loads the model itself)."""
    choices = [c.label for c in spec.candidates]
    cache_dir = str(spec.store_dir / "latency")
    if spec.ray is None and spec.latency.accelerator is None:
        return measure_here(timed_layers(graph), choices, spec.latency_tokens, cache_dir, model=model, graph=graph)
    connect(spec.ray or RaySettings())
    table, node = measure_latency(graph, choices, spec.latency_tokens, spec.latency.accelerator, cache_dir, spec)
    log.warning("bitalloc: latency table measured on %s (node %s)", table.device, node)
    return table
