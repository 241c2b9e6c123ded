"""Who this process is in a torchrun job, its device, and the key-value store all ranks share.

torchrun (``python -m torch.distributed.run``) starts one process per rank and tells each
who it is through environment variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, TORCHELASTIC_RESTART_COUNT, ...). A process started without
them (plain ``python -m chunkpose ...``) is a world of one: same code path, no process
group, an in-memory store.

Where the store comes from. The ranks claim work with ``store.add(key, 1)``, so every rank,
on every node, must reach the same store. The process group's own store is only reachable
through a private torch function, so instead this module asks torch's public
``torch.distributed.rendezvous("env://")`` for the store -- the very call that
``init_process_group`` makes internally -- and hands that store to
``init_process_group(store=...)`` (under the same ``default_pg`` prefix torch would use).
Under torchrun, MASTER_ADDR:MASTER_PORT is the TCPStore the elastic agent of node 0 hosts
for the job (TORCHELASTIC_USE_AGENT_STORE=True), which every node already reaches for the
rendezvous, so this works on one node and across nodes with ``--rdzv-backend=c10d``, and
under SLURM or Kubernetes through torchrun's usual flags. Without torchrun's agent, rank 0
hosts the TCPStore at MASTER_ADDR:MASTER_PORT, as torch does for env://. A FileStore in the
output folder would need a shared filesystem with working locks between nodes, which
network filesystems often lack; the TCPStore needs only the network the ranks already use.

Keys are put under ``chunkpose/attempt_<TORCHELASTIC_RESTART_COUNT>/`` (and the process
group's under ``default_pg/attempt_<n>``) because the agent's store outlives a worker group:
with torch 2.13 a key set by the workers of attempt 0 is still there for attempt 1, so after
``--max-restarts`` brings the workers back they must not see the failed attempt's counters
or its peers' addresses.

Over 400 lines mostly because of the Args/Returns documentation of its public API; the code
is one concern and splitting it would scatter it.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from chunkpose.errors import InputError

DEFAULT_TIMEOUT_S = 30 * 60.0  # how long a rank waits for the others (rendezvous, barriers)
# A rank that works posts a heartbeat every HEARTBEAT_PERIOD_S; one silent for DEFAULT_STALL_S is
# given up as dead. The stall limit is long because a unit may hold the GIL in C code for a while.
HEARTBEAT_PERIOD_S = 5.0
DEFAULT_STALL_S = 600.0
_POLL_FIRST_S = 0.005
_POLL_MAX_S = 0.25


class LaunchError(InputError):
    """The launch environment cannot be used; ``str`` is "<what> (<how to fix>)"."""


class RanksDidNotArrive(TimeoutError):
    """Some ranks did not reach a barrier in time. ``missing`` lists their rank numbers.

    Args:
        message: the error text.
        missing: rank numbers that did not arrive ([] when the awaited keys were not per rank).
    """

    def __init__(self, message: str, missing: list[int]):
        super().__init__(message)
        self.missing = list(missing)


def _env_int(environ, name: str, default: int | None = None) -> int:
    text = environ.get(name)
    if text is None or text == "":
        if default is None:
            raise LaunchError(f"environment variable {name} is not set (launch with torchrun, which sets it)")
        return default
    try:
        return int(text)
    except ValueError:
        raise LaunchError(f"environment variable {name}={text!r} is not an integer "
                          "(launch with torchrun, which sets it)") from None


def _pick_device(device: str, local_rank: int, local_world_size: int) -> torch.device:
    """The device of one rank: "auto" -> cuda:LOCAL_RANK if CUDA is there, else cpu."""
    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not name.startswith("cuda"):
        raise LaunchError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N (pick one of those)")
    if not torch.cuda.is_available():
        raise LaunchError(f"device {device!r} but CUDA is not available (use device cpu)")
    count = torch.cuda.device_count()
    if name == "cuda":
        if local_rank >= count:
            raise LaunchError(
                f"LOCAL_RANK {local_rank} needs cuda:{local_rank} but only {count} CUDA device(s) are visible "
                f"(use --nproc-per-node {count} or fewer, or check CUDA_VISIBLE_DEVICES)")
        return torch.device("cuda", local_rank)
    chosen = torch.device(name)
    if local_world_size > 1:
        # Several ranks of one node on one GPU would share its memory, and NCCL refuses it.
        raise LaunchError(f"device {device!r} for all {local_world_size} ranks of this node "
                          "(give device cuda so that each rank takes cuda:LOCAL_RANK)")
    if chosen.index is not None and chosen.index >= count:
        raise LaunchError(f"device {device!r} but only {count} CUDA device(s) are visible (pick cuda:0..cuda:{count - 1})")
    return chosen


@dataclass
class RankContext:
    """One rank of a (possibly one-process) job: identity, device, backend and shared store.

    Build it with ``RankContext.from_env()``; ``init()`` joins the process group and opens the
    store, ``close()`` leaves it (or use it as a context manager).

    Attributes:
        rank: this process's global rank.
        world_size: the number of ranks.
        local_rank: the rank within this node (the GPU index).
        local_world_size: the number of ranks on this node.
        device: the torch device this rank computes on.
        backend: "nccl" on CUDA, "gloo" on the CPU.
        launched: True when started by torchrun (or another launcher that sets RANK and
            WORLD_SIZE); False for a plain single process.
        master_addr: MASTER_ADDR (host of the shared TCPStore), None without a launcher.
        master_port: MASTER_PORT, None without a launcher.
        restart_count: torchrun's TORCHELASTIC_RESTART_COUNT.
        max_restarts: torchrun's TORCHELASTIC_MAX_RESTARTS.
        run_id: torchrun's TORCHELASTIC_RUN_ID (its --rdzv-id), None without torchrun.
        timeout_s: seconds rendezvous and barriers wait for the other ranks.
        store: the shared key-value store (a torch.distributed.Store) once initialised, else None.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "gloo"
    launched: bool = False
    master_addr: str | None = None
    master_port: int | None = None
    restart_count: int = 0
    max_restarts: int = 0
    run_id: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    store: object = field(default=None, init=False, repr=False)
    _owns_group: bool = field(default=False, init=False, repr=False)
    _namespaces: int = field(default=0, init=False, repr=False)

    @classmethod
    def from_env(cls, environ=None, device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> "RankContext":
        """The context described by torchrun's environment variables, or a world of one.

        Args:
            environ: the environment to read (default os.environ).
            device: "auto" (cuda:LOCAL_RANK with CUDA, else cpu), "cpu", "cuda" (cuda:LOCAL_RANK)
                or "cuda:N" (only with one rank per node).
            timeout_s: seconds to wait for the other ranks at rendezvous and barriers.

        Returns:
            A RankContext, not yet initialised.

        Raises:
            LaunchError: the variables are partial or inconsistent, or the device is unusable.
        """
        env = os.environ if environ is None else environ
        if timeout_s <= 0:
            raise LaunchError(f"timeout_s={timeout_s} must be positive (seconds to wait for the other ranks)")
        launched = "RANK" in env or "WORLD_SIZE" in env
        if not launched:
            dev = _pick_device(device, 0, 1)
            return cls(device=dev, backend="nccl" if dev.type == "cuda" else "gloo", timeout_s=float(timeout_s))
        rank = _env_int(env, "RANK")
        world_size = _env_int(env, "WORLD_SIZE")
        if world_size < 1 or not 0 <= rank < world_size:
            raise LaunchError(f"RANK={rank} with WORLD_SIZE={world_size} (need 0 <= RANK < WORLD_SIZE; launch with torchrun)")
        # A single-rank world may omit LOCAL_*; several ranks must say which GPU is theirs.
        local_rank = _env_int(env, "LOCAL_RANK", 0 if world_size == 1 else None)
        local_world_size = _env_int(env, "LOCAL_WORLD_SIZE", 1 if world_size == 1 else None)
        if not 0 <= local_rank < local_world_size:
            raise LaunchError(f"LOCAL_RANK={local_rank} with LOCAL_WORLD_SIZE={local_world_size} "
                              "(need 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE; launch with torchrun)")
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not env.get(name):
                raise LaunchError(f"environment variable {name} is not set (launch with torchrun, which sets it)")
        dev = _pick_device(device, local_rank, local_world_size)
        return cls(
            rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=local_world_size,
            device=dev, backend="nccl" if dev.type == "cuda" else "gloo", launched=True,
            master_addr=env["MASTER_ADDR"], master_port=_env_int(env, "MASTER_PORT"),
            restart_count=_env_int(env, "TORCHELASTIC_RESTART_COUNT", 0),
            max_restarts=_env_int(env, "TORCHELASTIC_MAX_RESTARTS", 0),
            run_id=env.get("TORCHELASTIC_RUN_ID") or None, timeout_s=float(timeout_s),
        )

    # ------------------------------------------------------------------ lifecycle

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def host(self) -> str:
        return socket.gethostname()

    @property
    def initialized(self) -> bool:
        return self.store is not None

    def init(self) -> "RankContext":
        """Join the process group (when launched) and open the shared store; idempotent.

        Returns:
            self, so that ``ctx = RankContext.from_env().init()`` reads naturally.

        Raises:
            LaunchError: torch has no torch.distributed, or an already joined process group
                disagrees with the environment's rank / world size.
        """
        if self.store is not None:
            return self
        import torch.distributed as dist

        if not self.launched:
            # A world of one: nobody to talk to, an in-memory store gives the same API.
            self.store = dist.PrefixStore("chunkpose/attempt_0", dist.HashStore())
            return self
        if not dist.is_available():
            raise LaunchError("this torch was built without torch.distributed (install a torch with it)")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL binds a rank to the current device
        timeout = timedelta(seconds=self.timeout_s)
        if dist.is_initialized():
            # The caller already joined a group (e.g. its own init_process_group): reuse it
            # and reach the same store the same way.
            if dist.get_rank() != self.rank or dist.get_world_size() != self.world_size:
                raise LaunchError(f"the process group already joined has rank {dist.get_rank()} of "
                                  f"{dist.get_world_size()}, the environment says {self.rank} of {self.world_size} "
                                  "(let RankContext.init() create the group)")
        base, rank, world_size = next(dist.rendezvous("env://", rank=self.rank, world_size=self.world_size,
                                                      timeout=timeout))
        base.set_timeout(timeout)
        if not dist.is_initialized():
            # The attempt is in the group's prefix too: gloo finds its peers' addresses in the
            # store, and stale addresses of a failed attempt made the restarted one fail to connect.
            group_store = dist.PrefixStore(f"default_pg/attempt_{self.restart_count}", base)
            dist.init_process_group(backend=self.backend, store=group_store, rank=rank, world_size=world_size,
                                    timeout=timeout)
            self._owns_group = True
        self.store = dist.PrefixStore(f"chunkpose/attempt_{self.restart_count}", base)
        return self

    def close(self) -> None:
        """Leave the process group this context created; the store is dropped."""
        if self._owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_group = False
        self.store = None

    def __enter__(self) -> "RankContext":
        return self.init()

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    # ------------------------------------------------------------------ store helpers

    def namespace(self, name: str) -> str:
        """A fresh key prefix for one collective step; every rank must call it in the same order.

        Two run_units calls in one job (or one per BOP scene) then never share counters.

        Args:
            name: the step's name.

        Returns:
            str ``"<name>/<n>"``, n counting this context's calls.
        """
        self._namespaces += 1
        return f"{name}/{self._namespaces}"

    def _require_store(self):
        if self.store is None:
            raise RuntimeError("RankContext is not initialised (call init() or use it in a with-block)")
        return self.store

    def publish(self, key: str, value) -> None:
        """Set ``key`` to ``value`` (JSON) in the shared store.

        Args:
            key: the store key.
            value: any JSON-serialisable value.

        Raises:
            RuntimeError: the context is not initialised.
        """
        self._require_store().set(key, json.dumps(value))

    def wait_for(self, keys: dict[int, str] | list[str], timeout_s: float | None = None,
                 what: str = "the other ranks", heartbeats: dict[int, str] | None = None,
                 stall_s: float = DEFAULT_STALL_S) -> dict:
        """Wait until every key exists in the store and return {name: decoded JSON value}.

        Args:
            keys: {rank: key} (a timeout then names the ranks that did not arrive) or a list of keys.
            timeout_s: seconds to wait at most (default self.timeout_s; None: no limit, for waits
                that last as long as the slowest rank's work, e.g. a long video; without heartbeats
                None means self.timeout_s).
            what: what is awaited, for the error message.
            heartbeats: {rank: heartbeat key} of the awaited ranks (see Heartbeat): a rank whose
                counter has not moved for stall_s is given up as dead, whatever timeout_s says.
            stall_s: seconds without a heartbeat after which a rank counts as dead.

        Returns:
            dict {rank or list index: the key's decoded JSON value}.

        Raises:
            RanksDidNotArrive: keys still missing after timeout_s, or their ranks' heartbeats stopped.
            RuntimeError: the context is not initialised.
        """
        store = self._require_store()
        named = dict(keys) if isinstance(keys, dict) else dict(enumerate(keys))
        label = "ranks" if isinstance(keys, dict) else "keys"
        if timeout_s is None and heartbeats is None:
            timeout_s = self.timeout_s
        deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
        beats = {r: (None, time.monotonic()) for r in (heartbeats or {})}  # rank -> (last count, when it moved)
        pending = dict(named)
        pause = _POLL_FIRST_S
        while pending:
            for name, key in list(pending.items()):
                if store.check([key]):
                    del pending[name]
            if not pending:
                break
            now = time.monotonic()
            if heartbeats:
                stalled = []
                for r in pending:
                    if r not in heartbeats:
                        continue
                    count = store.add(heartbeats[r], 0)  # add 0 reads a counter, creating it at 0
                    last, moved = beats[r]
                    if count != last:
                        beats[r] = (count, now)
                    elif now - moved > stall_s:
                        stalled.append(r)
                if stalled:
                    raise RanksDidNotArrive(
                        f"rank {self.rank}: waiting for {what}, ranks {_list(stalled)} gave no sign of life for "
                        f"{stall_s:.0f} s (died or hung: see their logs; rerun the same command to resume)", stalled)
            if deadline is not None and now >= deadline:
                missing = sorted(pending)
                raise RanksDidNotArrive(
                    f"rank {self.rank}: waited {timeout_s:.0f} s for {what}; {label} {_list(missing)} did not arrive "
                    "(a rank died or hangs: see its log; rerun the same command to resume, or raise the timeout)",
                    missing if isinstance(keys, dict) else [])
            time.sleep(pause)
            pause = min(pause * 2, _POLL_MAX_S)
        return {name: json.loads(store.get(key)) for name, key in named.items()}

    def heartbeat(self, key: str, period_s: float = HEARTBEAT_PERIOD_S) -> "Heartbeat":
        """Start bumping the counter ``key`` every period_s while this rank works (see wait_for).

        Args:
            key: the store counter.
            period_s: seconds between beats (default HEARTBEAT_PERIOD_S).

        Returns:
            Heartbeat (running; stop() it or use it as a context manager).
        """
        return Heartbeat(self, key, period_s)

    def _store_client(self):
        """A second connection to the shared store, for a thread (a store client is not shared across threads)."""
        if not self.launched:
            return self._require_store()  # the in-memory HashStore locks internally
        import torch.distributed as dist

        base = dist.TCPStore(self.master_addr, self.master_port, is_master=False,
                             timeout=timedelta(seconds=self.timeout_s))
        return dist.PrefixStore(f"chunkpose/attempt_{self.restart_count}", base)

    def barrier(self, name: str, timeout_s: float | None = None, value=None) -> dict:
        """Wait until every rank reached the barrier ``name``; each may post a JSON ``value``.

        Unlike torch.distributed.barrier this works the same on gloo, NCCL and a world of one, and
        a timeout names the ranks that did not arrive.

        Args:
            name: the barrier's name (unique per barrier in the job).
            timeout_s: seconds to wait (None: self.timeout_s).
            value: JSON-serialisable value this rank posts (default None).

        Returns:
            {rank: the value that rank posted}.

        Raises:
            RanksDidNotArrive: some ranks did not arrive in time.
        """
        prefix = f"barrier/{name}"
        self.publish(f"{prefix}/{self.rank}", value)
        return self.wait_for({r: f"{prefix}/{r}" for r in range(self.world_size)}, timeout_s,
                             what=f"all ranks at barrier {name!r}")

    def describe(self) -> dict:
        """This rank's identity for reports.

        Returns:
            dict of rank, world_size, local_rank, host, device (str), backend and restart_count.
        """
        return {"rank": self.rank, "world_size": self.world_size, "local_rank": self.local_rank,
                "host": self.host, "device": str(self.device), "backend": self.backend,
                "restart_count": self.restart_count}


def _list(ranks) -> str:
    return ", ".join(str(r) for r in ranks[:16]) + (" ..." if len(ranks) > 16 else "")


class Heartbeat:
    """A daemon thread that adds 1 to a store counter every period_s until stopped.

    Other ranks waiting on this one read the counter: while it moves, the rank is alive, however
    long its current unit takes (a video can take longer than any fixed timeout). Use as a
    context manager, or call stop().

    Args:
        ctx: the initialised RankContext whose store holds the counter.
        key: the counter's key.
        period_s: seconds between beats (default HEARTBEAT_PERIOD_S).
    """

    def __init__(self, ctx: RankContext, key: str, period_s: float = HEARTBEAT_PERIOD_S):
        self.key = key
        self.period_s = float(period_s)
        self._stop = threading.Event()
        self._store = ctx._store_client()
        self._store.add(key, 1)
        self._thread = threading.Thread(target=self._beat, name=f"chunkpose-heartbeat-{ctx.rank}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self._store.add(self.key, 1)
            except Exception:  # the store went away (the job is ending): nothing left to tell
                return

    def stop(self) -> None:
        """Stop beating and wait (up to period_s + 1 s) for the thread to end."""
        self._stop.set()
        self._thread.join(timeout=self.period_s + 1.0)

    def __enter__(self) -> "Heartbeat":
        return self

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False


__all__ = ["DEFAULT_STALL_S", "DEFAULT_TIMEOUT_S", "HEARTBEAT_PERIOD_S", "Heartbeat", "LaunchError", "RankContext",
           "RanksDidNotArrive"]
