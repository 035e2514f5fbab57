"""Ray at the edge: the one module that starts Ray and submits, waits on and unwraps Ray work.

Stages say what to run and what it asks for (`Resources`); this module turns that into Ray tasks
and actors, with the job's `ray.retries` as task retries and actor restarts everywhere, a progress
bar while waiting, results in submission order, and a negprep error raised inside any task or
actor re-raised as itself, so the CLI prints its one line and exits 2.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from negprep import storage
from negprep.errors import NegprepError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resources:
    """What one Ray task or actor of a stage asks the scheduler for."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory: int = 0  # bytes reserved with Ray's scheduler (0: none)
    spread: bool = False  # place actors on as many nodes as possible
    one_call: bool = False  # the worker exits after the call, with whatever memory it took
    actors: int = 0  # an actor pool: how many actors of this ask (0: tasks, as many as there is work)

    def __str__(self) -> str:
        ask = f"{self.cpus:g} CPU" + (f", {self.gpus:g} GPU" if self.gpus else "") + \
            (f", {self.memory >> 20} MB" if self.memory else "")
        return f"{self.actors} actors x {ask}" if self.actors else ask

    def options(self, retries: int, actor: bool) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.cpus}
        if self.gpus:
            opts["num_gpus"] = self.gpus
        if self.memory:
            opts["memory"] = self.memory
        if self.spread:
            opts["scheduling_strategy"] = "SPREAD"
        if actor:
            opts |= {"max_restarts": retries, "max_task_retries": retries}
        else:
            opts["max_retries"] = retries
            if self.one_call:
                opts["max_calls"] = 1
        return opts


def start_ray(address: str | None, num_cpus: int | None, object_store_mb: int) -> None:
    """Attach to `address` (else RAY_ADDRESS) if given, else start a local Ray sized for this machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    forward = ("HF_HUB_OFFLINE", "NEGPREP_CACHE", "NEGPREP_CUDA_ON_CPU")
    env = {"env_vars": {k: os.environ[k] for k in forward if k in os.environ}}
    # workers (maybe on other machines) need the driver's AWS endpoint and region; the keys go in
    # the pickled Folders instead (storage.with_env_credentials): Ray logs the runtime_env
    env["env_vars"] |= storage.ray_env()
    if address:
        # under `ray job submit --runtime-env-json` the job's env vars would clash with these same
        # keys (a ValueError); merge them instead, ours (the driver's own values) winning
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            object_store_memory=object_store_mb << 20,
            runtime_env=env,
            log_to_driver=False,
        )


@contextmanager
def _unwrapped() -> Iterator[None]:
    """A negprep error raised inside a task or actor arrives wrapped in RayTaskError with its
    traceback: re-raise the original, so the CLI still prints one line and exits 2."""
    import ray

    try:
        yield
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, NegprepError):
            raise e.cause from None
        raise


def get(refs: Any) -> Any:
    """ray.get, negprep errors unwrapped."""
    import ray

    with _unwrapped():
        return ray.get(refs)


def put(value: Any) -> Any:
    """A reference to `value` in the object store, to hand one copy to many calls."""
    import ray

    return ray.put(value)


def submit(actors: Sequence[Any], method: str, *args: Any) -> list:
    """Call `method(*args)` on every actor; the futures, in actor order (wait with `get`)."""
    return [getattr(a, method).remote(*args) for a in actors]


def nodes() -> list[tuple[float, float]]:
    """(CPUs, memory bytes for tasks) of each live node with CPUs."""
    import ray

    out = []
    for node in ray.nodes():
        res = node.get("Resources", {})
        if node.get("Alive") and res.get("CPU", 0) > 0:
            out.append((float(res["CPU"]), float(res.get("memory", 0))))
    return out


def gpu_nodes() -> list[tuple[float, float]]:
    """(GPUs, memory bytes for tasks) of each live node with GPUs (logical ones too)."""
    import ray

    out = []
    for node in ray.nodes():
        res = node.get("Resources", {})
        if node.get("Alive") and res.get("GPU", 0) > 0:
            out.append((float(res["GPU"]), float(res.get("memory", 0))))
    return out


def gpu_node_cpus() -> list[tuple[float, float, float]]:
    """(CPUs, GPUs, memory bytes for tasks) of each live node with GPUs (logical ones too)."""
    import ray

    out = []
    for node in ray.nodes():
        res = node.get("Resources", {})
        if node.get("Alive") and res.get("GPU", 0) > 0:
            out.append((float(res.get("CPU", 0)), float(res["GPU"]), float(res.get("memory", 0))))
    return out


def cluster_cpus() -> int:
    """CPUs of the whole cluster."""
    return max(1, int(sum(c for c, _ in nodes())))


def cluster_gpus() -> float:
    """GPUs of the whole cluster (logical ones too: `ray start --num-gpus`)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def wait_for_gpus(seconds: float) -> float:
    """Ask the autoscaler for a GPU node and wait up to `seconds` for one; the cluster's GPUs then."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": 1}])
    deadline = time.monotonic() + seconds
    while (gpus := cluster_gpus()) <= 0 and time.monotonic() < deadline:
        time.sleep(5)
    request_resources(bundles=[])  # the job's own actors keep what they need
    return gpus


def node_id() -> str:
    """The Ray node the caller runs on ("" outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def assigned_gpus() -> list:
    """The GPUs Ray assigned the calling actor or task (empty when it asked for none)."""
    import ray

    return list(ray.get_gpu_ids())


def largest_node_cpus() -> int:
    """CPUs of the largest live node: a task asking for more would never be scheduled."""
    return max((int(c) for c, _ in nodes()), default=1)


class Executor:
    """Runs a stage's Ray work with the job's retries; every wait goes through `get`."""

    def __init__(self, retries: int):
        self.retries = retries

    def submit(self, fn: Callable, *args: Any, res: Resources = Resources(), returns: int = 1) -> Any:
        """Start one task; its future (or `returns` futures)."""
        import ray

        opts = res.options(self.retries, actor=False) | ({"num_returns": returns} if returns != 1 else {})
        return ray.remote(**opts)(fn).remote(*args)

    def call(self, fn: Callable, *args: Any, res: Resources = Resources()) -> Any:
        """Run one task and wait for its result."""
        return get(self.submit(fn, *args, res=res))

    def map(self, fn: Callable, calls: Sequence[tuple], res: Resources = Resources(), desc: str = "",
            limit: int | None = None) -> list:
        """`fn(*args)` as a task for every args tuple, at most `limit` in flight (None: all at once);
        results in submission order, the first failure raised at once."""
        import ray

        remote = ray.remote(**res.options(self.retries, actor=False))(fn)
        results: list = [None] * len(calls)
        queue, running = deque(enumerate(calls)), {}
        with _progress(len(calls), desc) as bar:
            while queue or running:
                while queue and (limit is None or len(running) < limit):
                    i, args = queue.popleft()
                    running[remote.remote(*args)] = i
                done, _ = ray.wait(list(running), num_returns=1)
                results[running.pop(done[0])] = get(done[0])
                bar.update(1)
        return results

    @contextmanager
    def actors(self, cls: type, args: Sequence[tuple], res: Resources) -> Iterator[list]:
        """One actor of `cls(*a)` per args tuple; a dead actor is restarted (`ray.retries` times)
        and rebuilds itself in `__init__`. The actors are killed on exit, so their memory (a model,
        an index) is back before the next stage starts."""
        import ray

        remote = ray.remote(**res.options(self.retries, actor=True))(cls)
        pool = [remote.remote(*a) for a in args]
        try:
            yield pool
        finally:
            for a in pool:
                ray.kill(a)

    def map_actors(self, cls: type, args: tuple, count: int, res: Resources, call: Callable[[Any, Any], Any],
                   items: Sequence, desc: str = "") -> list:
        """Results of `call(actor, item)` for every item, in order, on `count` actors of `cls(*args)`,
        each taking the next item when free."""
        from ray.util import ActorPool

        results = []
        with self.actors(cls, [args] * count, res) as pool, _progress(len(items), desc) as bar, _unwrapped():
            for out in ActorPool(pool).map(call, items):
                bar.update(1)
                results.append(out)
        return results

    def stream(self, prepare: Callable, prepare_res: Resources, cls: type, args: tuple, count: int,  # noqa: PLR0913
               res: Resources, pieces: Callable[[Any], list[tuple]], call: Callable[[Any, Any, list], Any],
               items: Sequence, ahead: int, desc: str = "") -> list:
        """Results of `call(actor, item, futures)` for every item, in order, on `count` actors of
        `cls(*args)`, where `futures` are those of `prepare(*p)` for each `p` in `pieces(item)`, each
        run as a task of its own (`prepare_res`): CPU work (tokenising) streams into the actors (a
        GPU), which take an item's futures in order as they are ready (`each`), so an actor starts
        on an item's first piece while the rest are being prepared.

        Pieces are prepared for items beyond those the actors hold while fewer than `ahead` such
        pieces are waiting (and always for the next item per free actor slot), so memory stays
        bounded; each actor holds two items, the second queued behind the first, so it never waits
        for the driver between items."""
        import ray

        task = ray.remote(**prepare_res.options(self.retries, actor=False))(prepare)
        results: list = [None] * len(items)
        queue: deque = deque(range(len(items)))
        staged: deque = deque()  # (item, its pieces' futures), not yet given to an actor
        with self.actors(cls, [args] * count, res) as pool, _progress(len(items), desc) as bar, _unwrapped():
            held = [0] * len(pool)
            busy: dict = {}
            while queue or staged or busy:
                free = sum(2 - h for h in held)
                while queue and (len(staged) < free or sum(len(f) for _, f in staged) < ahead):
                    i = queue.popleft()
                    staged.append((i, [task.remote(*p) for p in pieces(items[i])]))
                while staged:
                    a = min(range(len(pool)), key=held.__getitem__)  # the least loaded actor
                    if held[a] == 2:
                        break
                    i, futures = staged.popleft()
                    held[a] += 1
                    busy[call(pool[a], items[i], futures)] = (i, a)
                done, _ = ray.wait(list(busy), num_returns=1)
                i, a = busy.pop(done[0])
                results[i] = ray.get(done[0])
                held[a] -= 1
                bar.update(1)
        return results


def each(futures: Sequence) -> Iterator:
    """The values of `futures`, in order, each as soon as it is ready: inside an actor, work starts
    on the first while the later ones are still being computed."""
    for f in futures:
        yield get(f)


@contextmanager
def _progress(total: int, desc: str):
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="shard", leave=False, disable=not desc) as bar:
        yield bar
