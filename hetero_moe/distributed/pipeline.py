"""The driver's side of a pipeline over Ray: stage actors, and a net that looks like a Transformer
to Model (api.py) and the server's Engine.

Hidden states go from stage to stage as the return value of one actor call passed as an argument
(an ObjectRef) to the next: Ray resolves it without the driver waiting. Small values (under Ray's
100 KiB inline limit: a decode step's n_embd x 4 bytes per token, 28 KiB for R1) travel inline
through the driver, which owns them; larger ones (prompt chunks) go through the object store and
are pulled by the next stage's node straight from the producing node. Ray calls, not a home-made
RPC layer: actor restarts, placement and object transfer come with it.

A decode step of B sequences is cut into micro-batches that enter the pipeline one after another
without waiting: while stage 1 runs micro-batch 0, stage 0 runs micro-batch 1. Each stage actor
runs one call at a time, in the order the driver submitted them. The server's engine keeps the
pipeline full across steps with submit() / wait_any() / collect(): one work item per group of
sequences (or prompt chunk), each group's next step sent as soon as its logits are back.

A stage that dies (its process killed, its host gone) fails the calls in flight with StageError,
which names the stage; Ray restarts the actor (max_restarts) and the next request evaluates its
prompt again, since the restarted stage's KV caches are empty.

Dimension key: B sequences in a decode step, T tokens, D n_embd, V vocabulary.
"""
from __future__ import annotations

import itertools
import os
import sys
import threading
import time
import weakref

import numpy as np
import torch

from ..errors import HeteroMoEError, UnsupportedError
from ..runtime.placement import PlacementPlan
from .split import StageSplit

DEFAULT_TIMEOUT_S = 600.0        # one forward pass through all stages (a 512-token R1 chunk)
DEFAULT_MAX_RESTARTS = 3
_ids = itertools.count(1)


class StageError(HeteroMoEError, RuntimeError):
    """A pipeline stage failed (its actor died or did not answer in time). Every sequence's KV
    cache is void afterwards (caches_lost): requests must evaluate their prompts again."""
    caches_lost = True


def ray_module():
    """Ray, or an error that says how to get it."""
    try:
        import ray
    except ImportError:
        raise HeteroMoEError("pipeline stages run on Ray, which is not installed: "
                             "pip install 'hetero-moe[ray]' (or pip install ray)") from None
    return ray


def connect(cluster: str | None, num_cpus: int | None = None):
    """Join (or start) the Ray cluster: "local" starts one on this machine, bound to 127.0.0.1;
    "auto" joins the running one; "ray://host:10001" or "host:6379" a remote one. Reuses a
    connection this process already has."""
    if not (cluster in (None, "local", "auto") or (isinstance(cluster, str) and (
            cluster.startswith("ray://") or ":" in cluster))):
        raise HeteroMoEError(f"cluster must be 'local', 'auto', 'ray://HOST:PORT' or "
                             f"'HOST:PORT', got {cluster!r}")
    ray = ray_module()
    if ray.is_initialized():
        return ray
    # workers import this copy of the package (an editable checkout need not be on their path)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}}
    if cluster in (None, "local"):
        # a node on the loopback address only (Ray otherwise advertises the host's own address)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        try:
            ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
        except AttributeError:
            pass
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False, runtime_env=env)
    else:
        ray.init(address=cluster, log_to_driver=False, configure_logging=False)
    return ray


class RemoteCache:
    """One sequence's KV cache, held in pieces by the stages (created there on first use)."""

    def __init__(self, net: "StagedNet"):
        self.id = next(_ids)
        self.n_ctx = net.n_ctx
        self.pos = 0
        self._net = weakref.ref(net)
        self._bpt = net._bytes_per_token

    def reset(self, pos: int = 0) -> None:
        """Forget positions >= pos (each stage truncates on its next call)."""
        self.pos = min(self.pos, pos)

    def bytes_per_token(self) -> int:
        return self._bpt

    def __del__(self):
        net = self._net()
        if net is not None:
            net._free(self.id)


class Pending:
    """A work item in the pipeline (StagedNet.submit): the last stage's ObjectRef and what
    collect() needs to advance the caches."""
    __slots__ = ("ref", "caches", "positions", "n", "t_submit")

    def __init__(self, ref, caches: list, positions: list[int], n: int):
        self.ref, self.caches, self.positions, self.n = ref, caches, positions, n
        self.t_submit = time.monotonic()


class _Stage:
    def __init__(self, spec, actor):
        self.spec, self.actor = spec, actor
        self.actor_id = actor._actor_id.hex()


class StagedNet:
    """Transformer's interface (forward, forward_batch, new_cache, cache) over stage actors."""

    def __init__(self, path: str, cfg, split: StageSplit, n_ctx: int, *, threads: int = 1,
                 stage_cpus: float = 1, cpu_kernels: str = "auto", repack: str | None = None,
                 micro_batches: int | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, max_restarts: int = DEFAULT_MAX_RESTARTS,
                 resources: list[dict] | None = None, placement_group=None):
        ray = ray_module()
        from .stage import Stage
        self.cfg, self.split, self.n_ctx = cfg, split, n_ctx
        self.timeout_s = timeout_s
        self.micro_batches = micro_batches
        self.sparse = __import__("hetero_moe.layers.sparse_attn", fromlist=["x"]) \
            .SparseAttnConfig()
        self.nsa_missing = None
        self.executor = None
        self.embed = None
        self.plan = PlacementPlan()
        per_layer = _cache_bytes_per_token(cfg, cpu_kernels) // cfg.n_layer
        self._bytes_per_token = per_layer * cfg.n_layer
        self._lock = threading.Lock()
        self._closed = False
        self._recovering = False
        self.failures = 0
        self.placement_group = placement_group
        actor_cls = ray.remote(Stage)
        self.stages: list[_Stage] = []
        for s in split.stages:
            opts = dict(num_cpus=stage_cpus, max_restarts=max_restarts, max_task_retries=0,
                        name=None)
            if resources and s.index < len(resources):
                opts["resources"] = resources[s.index]
            if placement_group is not None:      # stage i in bundle i: its own host (spread)
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=placement_group, placement_group_bundle_index=s.index)
            a = actor_cls.options(**{k: v for k, v in opts.items() if v is not None}).remote(
                str(path), s, n_ctx, threads, cpu_kernels, repack)
            self.stages.append(_Stage(s, a))
        self._get([st.actor.ping.remote() for st in self.stages], what="loading the stages")
        self._caches: "weakref.WeakSet[RemoteCache]" = weakref.WeakSet()
        self.cache = self.new_cache()
        self._model = None            # the Model wrapping this net (its cached tokens)

    # -- caches ----------------------------------------------------------------------------------
    def new_cache(self) -> RemoteCache:
        c = RemoteCache(self)
        self._caches.add(c)
        return c

    def _free(self, cid: int) -> None:
        if self._closed:
            return
        try:
            for st in self.stages:
                st.actor.free.remote([cid])
        except Exception:              # shutting down: the actors go anyway
            pass

    def _lost(self) -> None:
        """A stage failed: no sequence's cache can be trusted any more."""
        self.failures += 1
        self._recovering = True
        for c in list(self._caches):
            c.pos = 0
        m = self._model() if self._model is not None else None
        if m is not None:
            m._cached, m._cache_user = [], None

    # -- calls -----------------------------------------------------------------------------------
    def _stage_of(self, err) -> str:
        text = str(err)
        for st in self.stages:
            if st.actor_id in text or getattr(err, "actor_id", None) == st.actor_id:
                s = st.spec
                return f"stage {s.index} ({s.layers()})"
        return "a stage"

    def _get(self, refs, what: str = "a forward pass", timeout: float | None = None):
        ray = ray_module()
        from ray import exceptions as rx
        from .stage import CacheLostError
        try:
            return ray.get(refs, timeout=self.timeout_s if timeout is None else timeout)
        except rx.GetTimeoutError:
            self._lost()
            for r in refs if isinstance(refs, list) else [refs]:
                try:
                    ray.cancel(r, force=False)
                except Exception:       # an actor task that cannot be cancelled: it is dropped
                    pass
            raise StageError(f"the pipeline did not answer within {self.timeout_s:g} s during "
                             f"{what} (stages: {self.describe()})") from None
        except (rx.RayActorError, rx.WorkerCrashedError, rx.ObjectLostError,
                getattr(rx, "ActorUnavailableError", rx.RayActorError)) as e:
            self._lost()
            raise StageError(f"{self._stage_of(e)} failed during {what}: "
                             f"{type(e).__name__}: the actor died or became unreachable. Its "
                             f"KV caches are lost; Ray restarts it (up to its max_restarts) and "
                             f"the next request evaluates its prompt again") from None
        except CacheLostError as e:
            self._lost()
            raise StageError(str(e).splitlines()[-1]) from None

    def _chain(self, x, positions: list[int], cids: list[int], all_logits: bool):
        ref = x
        for st in self.stages:
            ref = st.actor.run.remote(ref, positions, cids, all_logits)
        return ref

    def _check(self):
        if self._closed:
            raise HeteroMoEError("the pipeline is closed")
        if self._recovering:
            self._wait_ready()

    def _wait_ready(self) -> None:
        """After a failure: wait (up to the timeout) until every stage answers again, Ray having
        restarted the dead one."""
        ray = ray_module()
        from ray import exceptions as rx
        deadline = time.monotonic() + self.timeout_s
        for st in self.stages:
            while True:
                try:
                    ray.get(st.actor.ping.remote(), timeout=max(0.1, deadline - time.monotonic()))
                    break
                except (rx.RayActorError, getattr(rx, "ActorUnavailableError", rx.RayActorError),
                        rx.GetTimeoutError) as e:
                    if isinstance(e, rx.ActorDiedError) or time.monotonic() > deadline:
                        raise StageError(f"stage {st.spec.index} ({st.spec.layers()}) did not "
                                         f"come back after a failure ({type(e).__name__}); "
                                         f"reload the model") from None
                    time.sleep(0.2)
        self._recovering = False

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos0: int, all_logits: bool = True, sparse=None,
                cache=None) -> torch.Tensor:
        """Tokens ids [T] at positions pos0.. of `cache` through every stage -> logits
        [T or 1, V] float32."""
        self._check()
        _no_sparse(sparse)
        cache = cache or self.cache
        if pos0 > cache.pos:
            raise ValueError(f"cannot evaluate at position {pos0}: the cache holds {cache.pos} "
                             f"positions")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = self._get(self._chain(ids, [pos0], [cache.id], all_logits))
        cache.pos = pos0 + len(ids)
        return torch.from_numpy(np.array(out))

    @torch.inference_mode()
    def forward_batch(self, ids: list[int], positions: list[int], caches: list,
                      sparse=None) -> torch.Tensor:
        """One decode step of B sequences -> logits [B, V] float32, as micro-batches that follow
        each other through the stages (a pipeline)."""
        self._check()
        _no_sparse(sparse)
        B = len(ids)
        if not B == len(positions) == len(caches):
            raise ValueError(f"forward_batch: {len(ids)} ids, {len(positions)} positions and "
                             f"{len(caches)} caches; expected one of each per sequence")
        for c, p in zip(caches, positions):
            if p > c.pos:
                raise ValueError(f"cannot evaluate at position {p}: the cache holds {c.pos} "
                                 f"positions")
        m = max(1, min(B, self.micro_batches or len(self.stages)))
        bounds = [round(i * B / m) for i in range(m + 1)]
        refs = []
        for a, b in zip(bounds, bounds[1:]):
            refs.append(self._chain(np.asarray(ids[a:b], dtype=np.int64), list(positions[a:b]),
                                    [c.id for c in caches[a:b]], False))
        outs = self._get(refs, what=f"a decode step of {B} sequence(s)")
        for c, p in zip(caches, positions):
            c.pos = p + 1
        return torch.from_numpy(np.concatenate(outs))

    # -- asynchronous calls (the server's pipelined engine) --------------------------------------
    def submit(self, ids, positions: list[int], caches: list,
               all_logits: bool = False) -> "Pending":
        """Send one work item into the pipeline and return at once: a prompt chunk of one
        sequence (one cache, T tokens at positions[0]..) or one decode token for each of B
        sequences (row b at positions[b] of caches[b]). Items reach each stage in the order they
        were submitted, so an item may follow another of the same sequence before that one
        came back. Nothing changes on the driver until collect(): a cache's position advances
        only when its result is taken."""
        self._check()
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(caches) == 1:
            positions = [int(positions[0])]
        elif not len(ids) == len(positions) == len(caches):
            raise ValueError(f"submit: {len(ids)} ids, {len(positions)} positions and "
                             f"{len(caches)} caches; expected one of each per sequence")
        for c, p in zip(caches, positions):
            if p > c.pos:
                raise ValueError(f"cannot evaluate at position {p}: the cache holds {c.pos} "
                                 f"positions")
        ref = self._chain(ids, list(positions), [c.id for c in caches], all_logits)
        return Pending(ref, list(caches), list(positions), len(ids))

    def wait_any(self, pending: list, timeout: float | None = None) -> list:
        """The items of `pending` whose results are ready (ray.wait), waiting at most `timeout`
        seconds for the first; an item older than timeout_s counts as ready (collect() then
        raises StageError)."""
        if not pending:
            return []
        ray = ray_module()
        now = time.monotonic()
        late = [p for p in pending if now - p.t_submit > self.timeout_s]
        if late:
            return late
        refs = [p.ref for p in pending]
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout, fetch_local=True)
        if ready:          # every item ready by now, not just the first
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=True)
        ready = set(ready)
        return [p for p in pending if p.ref in ready]

    def collect(self, item: "Pending") -> torch.Tensor:
        """A submitted item's logits ([T or 1, V] for a prompt chunk, [B, V] for a decode step),
        its caches' positions advanced; StageError (caches lost) when a stage failed."""
        left = max(0.01, self.timeout_s - (time.monotonic() - item.t_submit))
        kind = "a prompt chunk" if len(item.caches) == 1 and item.n > 1 else \
            f"a decode step of {len(item.caches)} sequence(s)"
        out = self._get(item.ref, what=kind, timeout=left)
        if len(item.caches) == 1:
            item.caches[0].pos = item.positions[0] + item.n
        else:
            for c, p in zip(item.caches, item.positions):
                c.pos = p + 1
        return torch.from_numpy(np.array(out))

    def discard(self, pending: list, timeout: float = 10.0) -> None:
        """Wait (up to timeout) for items whose results no one will take, ignoring their
        errors: after a failure, so that no earlier item is still on its way through a stage."""
        if not pending:
            return
        try:
            ray_module().wait([p.ref for p in pending], num_returns=len(pending),
                              timeout=timeout, fetch_local=False)
        except Exception:
            pass

    # -- reports ---------------------------------------------------------------------------------
    def describe(self) -> str:
        return ", ".join(f"{st.spec.index}: {st.spec.layers()}" for st in self.stages)

    def stage_info(self) -> list[dict]:
        """Each stage's pid, host and memory (stage.Stage.info)."""
        return self._get([st.actor.info.remote() for st in self.stages], what="stage_info")

    def traces(self) -> list[list[tuple]]:
        """Each stage's work intervals since the last call (stage.Stage.take_trace)."""
        return self._get([st.actor.take_trace.remote() for st in self.stages], what="traces")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            ray = ray_module()
            for st in self.stages:
                ray.kill(st.actor, no_restart=True)
            if self.placement_group is not None:
                from ray.util.placement_group import remove_placement_group
                remove_placement_group(self.placement_group)
        except Exception:
            pass


def _no_sparse(sparse) -> None:
    if sparse is not None and getattr(sparse, "enabled", False):
        raise UnsupportedError("sparse attention does not run on pipeline stages yet")


def stage_cache_type(cfg, cpu_kernels: str) -> str:
    """The stages' KV cache element type: f16 (MLA latents always; K/V where the C++ kernels
    read it), f32 on the torch path."""
    return "f16" if cfg.mla is not None or cpu_kernels != "torch" else "f32"


def _cache_bytes_per_token(cfg, cpu_kernels: str = "auto") -> int:
    from ..runtime.planner import cache_bytes_per_token
    return cache_bytes_per_token(cfg, stage_cache_type(cfg, cpu_kernels))


SPREAD_TIMEOUT_S = 60.0       # for a STRICT_SPREAD placement group the cluster could hold


def spread_group(stages: int, stage_cpus: float, timeout_s: float = SPREAD_TIMEOUT_S):
    """A STRICT_SPREAD placement group of one bundle per stage (each stage on its own host), or
    a HeteroMoEError at once when the cluster has fewer nodes that could hold a stage than
    stages (Ray would wait for nodes forever), or after timeout_s when the bundles cannot be
    placed (the nodes' CPUs taken)."""
    ray = ray_module()
    from ray.util.placement_group import placement_group, remove_placement_group
    cpus = max(float(stage_cpus), 1e-4)
    alive = [n for n in ray.nodes() if n.get("Alive")]
    able = [n for n in alive if n.get("Resources", {}).get("CPU", 0) >= cpus]
    names = ", ".join(sorted(n.get("NodeManagerAddress", "?") for n in alive)) or "none"
    if len(able) < stages:
        raise HeteroMoEError(
            f"spread: {stages} stages need {stages} hosts (one stage each, {cpus:g} CPU per "
            f"stage), but the Ray cluster has {len(alive)} node(s) ({names}), {len(able)} of "
            f"them with {cpus:g} CPU: add nodes (ray start --address ...), use fewer stages, or "
            f"drop --spread to share hosts")
    pg = placement_group([{"CPU": cpus} for _ in range(stages)], strategy="STRICT_SPREAD")
    if not pg.wait(timeout_seconds=timeout_s):
        remove_placement_group(pg)
        raise HeteroMoEError(
            f"spread: could not place {stages} stages on {stages} different hosts within "
            f"{timeout_s:g} s ({len(alive)} node(s): {names}; {cpus:g} CPU per stage, taken by "
            f"other work?)")
    return pg


def load_staged(path, *, stages: int, cluster: str | None = "local", threads: int | None = None,
                n_ctx: int | None = None, cpu_kernels: str = "auto", repack: str | None = None,
                stage_cpus: float | None = None,
                micro_batches: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                max_restarts: int = DEFAULT_MAX_RESTARTS, sequences: int = 1,
                ram_per_host=None, layers: list[int] | None = None, progress: bool = False,
                spread: bool = False, out=sys.stderr):
    """hetero_moe.load(path, stages=N, cluster=...): a Model whose layers run on N Ray actors.

    threads: CPU threads per stage (default: stage_cpus, default 1). stage_cpus: Ray CPUs each
    stage actor reserves (default: threads, else 1). sequences: KV caches the split makes room
    for on each stage (the server's slots). layers: explicit stage boundaries [0, b1, .., L].
    ram_per_host: refuse (HeteroMoEError naming the stage, the split printed) when a stage's
    weights and KV caches exceed it. spread: each stage on its own host (spread_group), failing
    at once when the cluster has fewer nodes than stages. repack: "auto", "on" or "off", as
    load()'s (None: HETERO_MOE_REPACK, else "auto"), decided by each stage for the tensors it
    maps (and the memory of its host)."""
    from ..api import DEFAULT_MAX_CTX, Model
    from ..models.base import config_from_gguf
    from .split import split_stages
    from .stage import STAGE_ARCHS, StageGGUF
    t0 = time.perf_counter()
    from ..config_env import default_repack
    repack = repack or default_repack()       # the driver's setting, not each host's
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
        raise ValueError(f"stages must be a positive integer, got {stages!r}")
    g = StageGGUF(path, None)                     # the header: metadata, tokenizer, tensor table
    cfg = config_from_gguf(g)
    if cfg.arch not in STAGE_ARCHS:
        raise UnsupportedError(f"{path}: architecture {cfg.arch!r} cannot be split into pipeline "
                               f"stages yet (supported: {', '.join(STAGE_ARCHS)})")
    if n_ctx is None:
        n_ctx = min(cfg.n_ctx_train or DEFAULT_MAX_CTX, DEFAULT_MAX_CTX)
    if not 1 <= n_ctx <= (1 << 20):
        raise ValueError(f"n_ctx must be in 1..{1 << 20}, got {n_ctx}")
    split = split_stages(g, cfg, stages, n_ctx=n_ctx, sequences=sequences,
                         cache_type=stage_cache_type(cfg, cpu_kernels),
                         ram_per_host=ram_per_host, layers=layers)
    if progress:
        print(split.summary(), file=out, flush=True)
    if not split.fits:
        from ..runtime.planner import fmt_bytes
        over = [s for s in split.stages if s.total_bytes > split.ram_per_host]
        raise HeteroMoEError(
            f"{path}: " + "; ".join(f"stage {s.index} ({s.layers()}) needs "
                                    f"{fmt_bytes(s.total_bytes)}" for s in over) +
            f", more than the {fmt_bytes(split.ram_per_host)} of RAM per host: use more stages "
            f"or a shorter context (KV cache for {split.sequences} sequence(s) x "
            f"{split.n_ctx} tokens):\n{split.summary()}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    stage_cpus = stage_cpus if stage_cpus is not None else (threads or 1)
    threads = threads or max(1, int(stage_cpus))
    connect(cluster)
    pg = spread_group(stages, stage_cpus) if spread else None
    try:
        net = StagedNet(str(path), cfg, split, n_ctx, threads=threads, stage_cpus=stage_cpus,
                        cpu_kernels=cpu_kernels, repack=repack, micro_batches=micro_batches,
                        timeout_s=timeout_s, max_restarts=max_restarts, placement_group=pg)
    except BaseException:
        if pg is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(pg)
        raise
    model = Model(g, cfg, net, threads, time.perf_counter() - t0)
    net._model = weakref.ref(model)
    model.stages = net
    return model
