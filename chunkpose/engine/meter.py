"""Measured memory peaks over spans of work.

CUDA: the caching allocator's own counters. A span resets the peak counters when it opens
and reads ``max_memory_reserved`` / ``max_memory_allocated`` when it closes; before a nested
span resets them, the running maxima are folded into the spans already open, so an outer
span (a session) and the inner spans (its map calls, each chunk) all get their true peaks.
The budget promise is on reserved bytes (the allocator's footprint).

CPU: a TorchDispatchMode that sees every aten op run while a span is open and counts the
bytes of live tensor storages:
- an op's output storage that is new (not one of the op's input storages, not yet counted)
  is counted with its ``nbytes``; views and in-place results share a counted storage and
  add nothing; a counted storage that an op resized (``out=``) is re-read;
- a storage stops counting when its Python storage object dies (a weakref callback on the
  ``UntypedStorage``, whose Python object lives exactly as long as the storage);
- tensors that existed before the span (mapped inputs, kwargs, weights) are counted only
  when ``track()``-ed; ops on untracked tensors count only the new storages they produce;
- peak = the largest live total seen after any op (or track) inside the span.
Memory an aten kernel allocates internally and frees before returning is not visible, nor is
memory that is not a torch storage (numpy arrays, OpenGL buffers).

With ``hard_cap_bytes`` the CPU meter raises ``HardCapExceeded`` (a torch.OutOfMemoryError)
instead of letting live bytes pass the cap, so the out-of-memory path can be exercised without
a GPU; the failed op's outputs are never counted, like a failed cudaMalloc. On CUDA the cap is
``torch.cuda.set_per_process_memory_fraction`` while the outermost span is open (restored
afterwards).

Over 400 lines mostly because of the Args/Returns documentation of its public API; the code
is one concern and splitting it would scatter it.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

from .budget import normalize_device


class HardCapExceeded(torch.OutOfMemoryError):
    """The CPU meter's hard cap: an op would have taken live tensor bytes past the cap."""

    def __init__(self, message: str, attempted_bytes: int, cap_bytes: int):
        super().__init__(message)
        self.attempted_bytes = int(attempted_bytes)
        self.cap_bytes = int(cap_bytes)


@dataclass
class Span:
    """One measured stretch of work. Bytes are device bytes (CPU: live tensor bytes)."""

    name: str | None
    start_bytes: int = 0
    start_allocated_bytes: int = 0
    peak_bytes: int = 0  # CUDA: max reserved; CPU: max live tensor bytes
    peak_allocated_bytes: int = 0  # CUDA: max allocated; CPU: same as peak_bytes
    end_bytes: int = 0
    end_allocated_bytes: int = 0
    wall_s: float = 0.0
    _t0: float = field(default=0.0, repr=False)
    _events: tuple | None = field(default=None, repr=False)  # CUDA: (start, end) timing events

    @property
    def gpu_s(self) -> float | None:
        """CUDA: seconds between the span's start and end on the device's stream, from CUDA
        events (waits for the end event); None on the CPU."""
        if self._events is None:
            return None
        start, end = self._events
        end.synchronize()
        return start.elapsed_time(end) / 1000.0

    def _see(self, reserved: int, allocated: int) -> None:
        if reserved > self.peak_bytes:
            self.peak_bytes = reserved
        if allocated > self.peak_allocated_bytes:
            self.peak_allocated_bytes = allocated


@dataclass
class _Entry:
    nbytes: int
    ref: object  # weakref.ref to the UntypedStorage (None when not referenced weakly)
    token: int
    owned: bool  # allocated under the meter: counted until freed
    holds: int = 0  # explicit track() holds: counted until freed or released


def _tensor_storages(t: torch.Tensor):
    """The UntypedStorages behind ``t`` (wrapper subclasses: those of their inner tensors)."""
    if is_traceable_wrapper_subclass(t) and not _is_fake(t):
        inner_names, _ = t.__tensor_flatten__()
        for name in inner_names:
            yield from _tensor_storages(getattr(t, name))
        return
    try:
        yield t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse / nested / storage-less tensors
        return


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def tensors_in(obj, _depth: int = 0):
    """Tensors in ``obj``: tensors, pytree containers, modules (parameters and buffers) and
    the fields of dataclasses (e.g. a frame object holding the full-resolution images)."""
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
        return
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if _depth < 3:
            for f in dataclasses.fields(obj):
                yield from tensors_in(getattr(obj, f.name), _depth + 1)
        return
    leaves = pytree.tree_leaves(obj)
    if len(leaves) == 1 and leaves[0] is obj:
        return
    for leaf in leaves:
        yield from tensors_in(leaf, _depth + 1)


def _release_callback(meter_ref, key, token):
    def release(_dead_storage):
        meter = meter_ref()
        if meter is not None:
            meter._forget(key, token)

    return release


def _aliased_returns(func) -> tuple[bool, ...] | None:
    """Per return of an aten op: whether its schema says it aliases an input (views,
    in-place and out= results); None when the op has no usable schema."""
    try:
        return tuple(r.alias_info is not None for r in func._schema.returns)
    except AttributeError:
        return None


def _flat_tensors(obj, found: list) -> list:
    """The tensors of an aten op's arguments or results: tensors, (nested) lists and tuples
    of them. Faster than a general pytree walk, which matters on every op."""
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            if isinstance(item, torch.Tensor):
                found.append(item)
            elif isinstance(item, (list, tuple)):
                _flat_tensors(item, found)
    return found


def _storages_of(t: torch.Tensor):
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
        try:
            return (t.untyped_storage(),)
        except (RuntimeError, NotImplementedError):
            return ()
    return tuple(_tensor_storages(t))


class _LiveStorageMode(TorchDispatchMode):
    """Dispatch mode that reports every op's outputs to its meter.

    An output the op's schema marks as aliasing an input (a view, an in-place or out=
    result) can only be an input's storage: it is never counted as new, only re-read when
    it is counted already (a resize). Every other output is a fresh storage."""

    def __init__(self, meter: "Meter"):
        super().__init__()
        self._meter = meter
        self._aliases: dict = {}

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Nothing is compiled in here; torch's default wraps every dispatch in a dynamo
        # guard, which costs more than the counting itself.
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliases = self._aliases.get(func, False)
        if aliases is False:
            aliases = self._aliases[func] = _aliased_returns(func)
        meter = self._meter
        if aliases is None:  # no schema: fall back to excluding every input storage
            meter._count_outputs(out, meter._storage_keys((args, kwargs)), func)
        elif isinstance(out, (tuple, list)) and len(aliases) == len(out):
            fresh = [o for o, aliased in zip(out, aliases) if not aliased]
            known = [o for o, aliased in zip(out, aliases) if aliased]
            meter._count_outputs(fresh, (), func, known)
        elif aliases and aliases[0]:
            meter._count_outputs((), (), func, out)
        elif type(out) is torch.Tensor:
            meter._count_fresh(out, func)
        else:
            meter._count_outputs(out, (), func)
        return out


class Meter:
    """Measured peaks on one device. ``with meter.span(name) as s: ...; s.peak_bytes``.

    ``counted_device`` (CPU meter only) is the storage device type counted; "meta" makes a
    meter for FakeTensor traces (the planner's estimates).
    """

    def __init__(self, device="cpu", hard_cap_bytes: int | None = None, counted_device: str | None = None):
        self.device = normalize_device(device) if counted_device != "meta" else torch.device("cpu")
        self.hard_cap_bytes = None if hard_cap_bytes is None else int(hard_cap_bytes)
        self.is_cuda = self.device.type == "cuda"
        self._counted = counted_device or self.device.type
        self._open: list[Span] = []
        # CPU bookkeeping
        self._entries: dict[int, _Entry] = {}
        self._live = 0
        self._tokens = itertools.count()
        self._mode: _LiveStorageMode | None = None
        self._scoped_keys: list[int] = []
        self._saved_fraction: float | None = None

    # ------------------------------------------------------------------ readings
    def live_bytes(self) -> int:
        """Bytes live now: CUDA allocated bytes; CPU counted tensor storage bytes."""
        if self.is_cuda:
            return int(torch.cuda.memory_allocated(self.device))
        return self._live

    def reserved_bytes(self) -> int:
        """CUDA: the allocator's reserved bytes now; CPU: same as live_bytes()."""
        if self.is_cuda:
            return int(torch.cuda.memory_reserved(self.device))
        return self._live

    @property
    def active(self) -> bool:
        """True while a span is open."""
        return bool(self._open)

    # ------------------------------------------------------------------ spans
    @contextmanager
    def span(self, name: str | None = None):
        """Measure the enclosed work; yields a Span filled in when the block ends."""
        span = Span(name)
        outermost = not self._open
        if self.is_cuda:
            self._fold_cuda_peaks()
            if outermost:
                self._apply_cuda_cap()
            torch.cuda.reset_peak_memory_stats(self.device)
            reserved, allocated = self.reserved_bytes(), self.live_bytes()
        else:
            if outermost:
                self._mode = _LiveStorageMode(self)
                self._mode.__enter__()
            reserved = allocated = self._live
        span.start_bytes, span.start_allocated_bytes = reserved, allocated
        span.peak_bytes, span.peak_allocated_bytes = reserved, allocated
        if self.is_cuda:
            span._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            span._events[0].record()
        span._t0 = time.perf_counter()
        self._open.append(span)
        try:
            yield span
        finally:
            if self.is_cuda:
                self._fold_cuda_peaks()
            span.end_bytes, span.end_allocated_bytes = self.reserved_bytes(), self.live_bytes()
            span.wall_s = time.perf_counter() - span._t0
            if span._events is not None:
                span._events[1].record()
            position = self._open.index(span)
            self._open.remove(span)
            if not self.is_cuda:
                # CPU peaks are seen by the innermost span only (once per op); a closing span
                # hands its peak to the spans opened before it.
                for outer in self._open[:position]:
                    outer._see(span.peak_bytes, span.peak_allocated_bytes)
            if not self._open:
                if self.is_cuda:
                    self._restore_cuda_cap()
                else:
                    mode, self._mode = self._mode, None
                    mode.__exit__(None, None, None)
                keys, self._scoped_keys = self._scoped_keys, []
                self.release(keys)

    def _fold_cuda_peaks(self) -> None:
        reserved = int(torch.cuda.max_memory_reserved(self.device))
        allocated = int(torch.cuda.max_memory_allocated(self.device))
        for span in self._open:
            span._see(reserved, allocated)

    def _apply_cuda_cap(self) -> None:
        if self.hard_cap_bytes is None:
            return
        total = torch.cuda.get_device_properties(self.device).total_memory
        getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        self._saved_fraction = getter(self.device) if getter is not None else 1.0
        torch.cuda.set_per_process_memory_fraction(min(1.0, self.hard_cap_bytes / total), self.device)

    def _restore_cuda_cap(self) -> None:
        if self._saved_fraction is not None:
            torch.cuda.set_per_process_memory_fraction(self._saved_fraction, self.device)
            self._saved_fraction = None

    # ------------------------------------------------------------------ explicit tracking
    def track(self, *objs, scope: str = "manual") -> list[int]:
        """Count the storages of pre-existing tensors (and module parameters/buffers).

        scope="manual": counted until ``release(keys)`` with the returned keys (or freed);
        scope="span": counted until the outermost open span ends (no-op outside spans).
        CUDA: a no-op (the allocator already counts every tensor on the device).
        """
        if self.is_cuda or (scope == "span" and not self._open):
            return []
        keys = []
        for t in (t for obj in objs for t in tensors_in(obj)):
            for st in _tensor_storages(t):
                if st.device.type != self._counted:
                    continue
                key = st._cdata
                entry = self._entries.get(key)
                if entry is None:
                    entry = self._add_entry(key, st, st.nbytes(), owned=False)
                entry.holds += 1
                keys.append(key)
        if scope == "span":
            self._scoped_keys.extend(keys)
        self._see_live()
        return keys

    def release(self, keys) -> None:
        """Undo ``track`` holds; storages allocated under the meter stay counted until freed."""
        for key in keys:
            entry = self._entries.get(key)
            if entry is None:
                continue
            entry.holds -= 1
            if entry.holds <= 0 and not entry.owned:
                self._forget(key, entry.token)

    @contextmanager
    def holding(self, *objs):
        """Count ``objs`` while inside the block."""
        keys = self.track(*objs)
        try:
            yield
        finally:
            self.release(keys)

    # ------------------------------------------------------------------ CPU internals
    def _add_entry(self, key: int, storage, nbytes: int, owned: bool) -> _Entry:
        token = next(self._tokens)
        ref = weakref.ref(storage, _release_callback(weakref.ref(self), key, token))
        entry = _Entry(nbytes, ref, token, owned)
        self._entries[key] = entry
        self._live += nbytes
        return entry

    def _forget(self, key: int, token: int) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.token == token:
            del self._entries[key]
            self._live -= entry.nbytes

    def _storage_keys(self, obj) -> set[int]:
        return {st._cdata for t in _flat_tensors(pytree.tree_leaves(obj), []) for st in _storages_of(t)}

    def _count_fresh(self, out: torch.Tensor, func) -> None:
        """_count_outputs for the common case: one fresh plain tensor."""
        try:
            st = out.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        if st.device.type != self._counted:
            return
        key = st._cdata
        if key in self._entries:
            return
        nbytes = st.nbytes()
        if self.hard_cap_bytes is not None and self._live + nbytes > self.hard_cap_bytes:
            self._count_outputs(out, (), func)  # raises with the full message
            return
        self._add_entry(key, st, nbytes, owned=True)
        self._see_live()

    def _count_outputs(self, out, input_keys, func, aliased=()) -> None:
        """Count the new storages among ``out`` (not in ``input_keys``, not counted yet) and
        re-read the size of counted storages among ``out`` and ``aliased`` (resized by out=)."""
        new = {}
        resized = []
        delta = 0
        entries = self._entries
        fresh = _flat_tensors(out, [])
        for index, leaf in enumerate(fresh + _flat_tensors(aliased, [])):
            for st in _storages_of(leaf):
                if st.device.type != self._counted:
                    continue
                key = st._cdata
                entry = entries.get(key)
                if entry is not None:
                    nbytes = st.nbytes()
                    if nbytes != entry.nbytes:  # resized in place (out= / resize_)
                        resized.append((entry, nbytes))
                        delta += nbytes - entry.nbytes
                elif index < len(fresh) and key not in input_keys and key not in new:
                    new[key] = st
                    delta += st.nbytes()
        if not new and not resized:
            return
        if self.hard_cap_bytes is not None and delta > 0 and self._live + delta > self.hard_cap_bytes:
            attempted = self._live + delta
            raise HardCapExceeded(
                f"CPU hard cap: {func} would take live tensor bytes to {attempted} "
                f"({attempted / 2**30:.4f} GiB), over the cap of {self.hard_cap_bytes} bytes",
                attempted,
                self.hard_cap_bytes,
            )
        for entry, nbytes in resized:
            self._live += nbytes - entry.nbytes
            entry.nbytes = nbytes
        for key, st in new.items():
            self._add_entry(key, st, st.nbytes(), owned=True)
        self._see_live()

    def _see_live(self) -> None:
        if self._open:
            live = self._live
            self._open[-1]._see(live, live)
