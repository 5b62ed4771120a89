"""Sharded search on Ray: one actor per shard, the driver fans a query out and merges.

The same code runs on a laptop and on a cluster:

- ``start_ray()`` with no address starts a local Ray bound to loopback (127.0.0.1, no dashboard)
  with ``num_cpus`` CPUs, so the local cluster's processes are bounded;
- ``start_ray("ray://head:10001")`` or ``start_ray("auto")`` joins an existing cluster; shard
  directories must then be readable by the node each actor lands on (a shared file system, or
  shards written on that node).

Ray is an optional extra (``requirements-scale.txt``); nothing else in the package imports it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from matcher.paths import REPO_ROOT
from matcher.scale.shards import Shard, sharded_search


LOOPBACK = "127.0.0.1"
# Ray turns a node address of 127.0.0.1 into the machine's external address (and its gRPC servers then
# listen on every interface) unless this switch says "no multi-node cluster"; with it, every Ray
# process of a local instance binds to 127.0.0.1 only.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def ray_available() -> bool:
    """Whether Ray is installed (without importing it: importing fixes its address settings)."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def _ray():
    try:
        import ray
    except ImportError:
        raise SystemExit("error: the Ray engine needs the scale extra: pip install -r requirements-scale.txt") from None
    return ray


def start_ray(address: str | None = None, num_cpus: int = 2, object_store_mb: int = 512):
    """Connect to ``address``, or start a local Ray on loopback with ``num_cpus`` CPUs (refused with
    an error if any of its processes would be reachable from another address)."""
    if not address:
        os.environ[LOCAL_ONLY_ENV] = "0"
    ray = _ray()
    if ray.is_initialized():
        return ray
    if not address:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False   # Ray was imported before the variable was set
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                        "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}}
    if os.environ.get("MATCHER_CACHE_DIR"):
        env["env_vars"]["MATCHER_CACHE_DIR"] = os.environ["MATCHER_CACHE_DIR"]
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        ray.init(_node_ip_address=LOOPBACK, include_dashboard=False, num_cpus=num_cpus,
                 object_store_memory=object_store_mb << 20, runtime_env=env, log_to_driver=False,
                 configure_logging=False)
        addresses = {node["NodeManagerAddress"] for node in ray.nodes()}
        if addresses != {LOOPBACK}:
            ray.shutdown()
            raise RuntimeError(f"the local Ray instance is on {sorted(addresses)}, not on {LOOPBACK} only; stopped it")
    return ray


def stop_ray() -> None:
    ray = _ray()
    if ray.is_initialized():
        ray.shutdown()


class RayShards:
    """One Ray actor per shard directory (``[(path, offset)]``), each holding its ``Shard``."""

    def __init__(self, shards: Sequence[tuple[str | Path, int]], cpus_per_shard: float = 1.0):
        ray = _ray()
        actor = ray.remote(num_cpus=cpus_per_shard)(Shard)
        self.ray = ray
        self.actors = [actor.remote(str(path), int(offset)) for path, offset in shards]
        self.infos = ray.get([a.info.remote() for a in self.actors])   # waits until every shard is open

    def _call(self, method: str, args: tuple) -> list:
        refs = [self.ray.put(a) if isinstance(a, np.ndarray) else a for a in args]  # one copy in the object store
        return self.ray.get([getattr(actor, method).remote(*refs) for actor in self.actors])

    def search(self, queries, k: int, c: int, modality: str = "text", rounds: int = 2):
        return sharded_search(self._call, queries, k, c, modality, rounds)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
