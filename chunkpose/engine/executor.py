"""Engine: runs a batched op over chunks of its leading axis under a memory budget.

    engine = Engine(budget_gb=4.0, device="cuda")
    with engine.call("frame", resident=[network]) as report:
        xyz = engine.map(op, rows, name="depth.xyz", depth=depth, K=K)

The op is called on slices of the positional tensors (axis 0) with the keyword arguments
whole; chunk outputs are written into outputs preallocated from the first chunk's result
(no concatenation). The chunk size comes from the planner's cost model; an out-of-memory
error halves it (after leaving the except block and freeing), bounded or not, and a chunk
of one item that still fails raises BudgetTooSmall (unbounded: the memory error). With
autograd on and an input that requires grad, each chunk runs under non-reentrant gradient
checkpointing (per call: ``map(..., checkpoint=False)`` keeps whole graphs), so only chunk
inputs are kept for backward.

CUDA allocator tip: set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before the first
CUDA allocation to cut the reserved-minus-allocated overhead that the budget margin covers
(``torch.backends.cuda.max_split_size_mb`` is not an API; the env var is the real knob).

Over 400 lines mostly because of the Args/Returns documentation of its public API; the code
is one concern and splitting it would scatter it.
"""
from __future__ import annotations

import functools
import gc
import re
import warnings
from contextlib import contextmanager

import torch
import torch.utils._pytree as pytree
from torch.utils.checkpoint import checkpoint as _checkpoint

from .budget import GIB, MIB, Budget, BudgetTooSmall, gib_ceil
from .meter import Meter, tensors_in
from .chunks import ChunkLoop
from .groups import GroupedOp, GroupPlan, MapGroup
from .planner import CostModel, Planner, output_bytes, stage_signature, tracing_fake
from .report import RunReport

#: nvdiffrast reports its own failed allocations as a plain RuntimeError "Cuda error: 2[cudaMalloc ..."
#: (cudaErrorMemoryAllocation), outside torch's allocator.
_FOREIGN_OOM = re.compile(r"Cuda error: 2\[cudaMalloc|cudaErrorMemoryAllocation|CUDA error: out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` means that memory ran out (and nothing else).

    Args:
        exc: any exception.

    Returns:
        bool: True for torch.OutOfMemoryError, the CPU allocator's "can't allocate memory" and
        nvdiffrast's or CUDA's out-of-memory RuntimeErrors.
    """
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    # The CPU allocator reports exhaustion as a plain RuntimeError; so does nvdiffrast.
    return "DefaultCPUAllocator: can't allocate memory" in text or bool(_FOREIGN_OOM.search(text))


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text.splitlines()[0][:300] if text else type(exc).__name__


class Engine:
    """Budget-driven chunked execution. See the module docstring.

    Args:
        budget_gb: GiB (2**30 bytes) the work may use on ``device``, resident tensors, inputs and
            outputs included; None = unbounded (every map runs as one chunk unless memory runs out).
        device: "cpu", "cuda", "cuda:N" or a torch.device. The meter measures this device.
        hard_cap: CUDA: torch.cuda.set_per_process_memory_fraction while the engine runs
            (restored afterwards); CPU: the meter raises torch.OutOfMemoryError rather than let
            live tensor bytes pass the budget. Default False: the budget is only planned for.
        checkpoint: run chunks under gradient checkpointing when autograd needs them (default
            True; ``map(..., checkpoint=)`` decides per call).
        max_chunk: optional upper bound on items per chunk (latency, debugging); None = the
            budget alone decides.

    Raises:
        ValueError: ``budget_gb`` is not a positive number or None, ``device`` is not a usable CPU
            or CUDA device, or ``max_chunk`` is not a positive int or None.
    """

    def __init__(
        self,
        budget_gb: float | None = None,
        device="cpu",
        hard_cap: bool = False,
        checkpoint: bool = True,
        max_chunk: int | None = None,
    ):
        if max_chunk is not None and (isinstance(max_chunk, bool) or not isinstance(max_chunk, int) or max_chunk < 1):
            raise ValueError(f"max_chunk must be a positive int or None, got {max_chunk!r}")
        self.max_chunk = max_chunk
        self.budget = Budget.from_gb(budget_gb, device, hard_cap)
        cap = self.budget.total_bytes if (hard_cap and not self.budget.unbounded) else None
        self.meter = Meter(self.budget.device, hard_cap_bytes=cap)
        self.planner = Planner(self.budget)
        self.report = self._new_report()
        self.checkpointing = bool(checkpoint)
        self._external: dict[str, int] = {}
        self._calibrating = False
        self._listeners: list = []

    # ------------------------------------------------------------------ properties
    @property
    def budget_bytes(self) -> int | None:
        return self.budget.total_bytes

    @property
    def device(self) -> torch.device:
        return self.budget.device

    @property
    def hard_cap(self) -> bool:
        return self.budget.hard_cap

    @property
    def external_bytes(self) -> int:
        """Bytes held outside torch's allocator now (declared with ``external``)."""
        return sum(self._external.values())

    def __repr__(self) -> str:
        budget = "unbounded" if self.budget_bytes is None else f"{self.budget_bytes / GIB:g} GiB"
        return f"Engine(budget={budget}, device={self.device}, hard_cap={self.hard_cap})"

    def available_bytes(self) -> int | None:
        """Budget minus what is live now on the device and outside torch (None when unbounded).

        Returns:
            int bytes >= 0, or None for an unbounded engine.
        """
        if self.budget_bytes is None:
            return None
        return max(0, self.budget_bytes - self.meter.live_bytes() - self.external_bytes)

    def _new_report(self) -> RunReport:
        return RunReport(budget_bytes=self.budget.total_bytes, device=str(self.budget.device))

    # ------------------------------------------------------------------ hooks
    def add_listener(self, listener) -> None:
        """Register a progress callback for map calls.

        ``listener(event, stage)`` is called with event "start" when a map call begins, "chunk"
        after each chunk, "end" when it returns; ``stage`` is its StageReport.

        Args:
            listener: callable ``(event: str, stage: StageReport) -> None``.
        """
        self._listeners.append(listener)

    def remove_listener(self, listener) -> None:
        """Stop calling ``listener`` (added with add_listener); unknown listeners are ignored.

        Args:
            listener: the callable passed to add_listener.
        """
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _notify(self, event: str, stage) -> None:
        for listener in list(self._listeners):
            listener(event, stage)

    # ------------------------------------------------------------------ contexts
    @contextmanager
    def resident(self, *tensors_or_modules):
        """Count these tensors (module parameters and buffers) against the budget inside the block.

        On CUDA the allocator counts every device tensor anyway; on CPU the meter only counts
        tensors created outside the engine when they are declared here or passed to map.

        Args:
            *tensors_or_modules: tensors, torch modules, or containers of them.

        Returns:
            A context manager that yields this engine.
        """
        with self.meter.holding(*tensors_or_modules):
            yield self

    @contextmanager
    def external(self, what: str, nbytes: int):
        """Declare ``nbytes`` held outside torch's allocator inside the block.

        For a renderer's framebuffers or a library's own device buffers: taken off the budget the
        planner fills and added to the reported peak (report.external_bytes). Declaring the same
        ``what`` again inside the block replaces the earlier amount until the inner block ends.

        Args:
            what: a name for the holder (e.g. "renderer").
            nbytes: int bytes >= 0 held outside torch.

        Returns:
            A context manager that yields this engine.

        Raises:
            ValueError: ``nbytes`` is negative.
        """
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError(f"nbytes: expected a non-negative number of bytes, got {nbytes}")
        previous = self._external.get(what)
        self._external[what] = nbytes
        self.planner.reserve_bytes = self.external_bytes
        self.report.see_external(self.external_bytes)
        try:
            yield self
        finally:
            if previous is None:
                self._external.pop(what, None)
            else:
                self._external[what] = previous
            self.planner.reserve_bytes = self.external_bytes

    @contextmanager
    def session(self, name: str):
        """One measured span over several map calls; its peak goes to report.peak_bytes.

        Args:
            name: non-empty session name (the key of report.sessions).

        Returns:
            A context manager that yields the meter's span (peak_bytes, peak_allocated_bytes, wall_s).

        Raises:
            ValueError: ``name`` is not a non-empty string.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"session name must be a non-empty string, got {name!r}")
        self._release_cache_over_budget()
        span = None
        try:
            with self.meter.span(name) as span:
                yield span
        finally:
            if span is not None:
                self.report.record_session(name, span.peak_bytes, span.peak_allocated_bytes, span.wall_s)
                self.report.see_peak(span.peak_bytes, span.peak_allocated_bytes)

    @contextmanager
    def call(self, name: str, resident=()):
        """One call of the layer above (a register, a track).

        A fresh report, one session over everything, and ``resident`` (tensors, modules) counted
        from the first byte. Cost models stay cached across calls, so a tracking loop plans once.

        Args:
            name: the call's name (its session in the report), e.g. "register".
            resident: tensors or torch modules held for the whole call (default: none).

        Returns:
            A context manager that yields the call's RunReport (also ``engine.report``).
        """
        self.report = self._new_report()
        self.report.see_external(self.external_bytes)
        with self.meter.holding(*resident), self.session(name):
            yield self.report

    @contextmanager
    def calibrating(self):
        """Inside the block, every map call measures its op on all the items it is given and caches
        that as the stage's cost model.

        The caller hands it a few spread items on a small frame; the op's output is returned as
        usual. Nothing is reported as stage work.

        Returns:
            A context manager that yields this engine.
        """
        previous, self._calibrating = self._calibrating, True
        try:
            yield self
        finally:
            self._calibrating = previous

    def note_downscale(self, factor: float, reason: str) -> None:
        """Record (and warn about) a decision to run on inputs downscaled by ``factor``.

        Args:
            factor: scale in (0, 1] of the image sides; below 1 a warning is issued.
            reason: why, for report.downscale_reason.

        Raises:
            ValueError: ``factor`` is outside (0, 1].
        """
        factor = float(factor)
        if not (0.0 < factor <= 1.0):
            raise ValueError(f"factor must be in (0, 1], got {factor!r}")
        self.report.downscale_factor = factor
        self.report.downscale_reason = str(reason)
        if factor < 1.0:
            warnings.warn(f"chunkpose: input downscaled by {factor:.3f}: {reason}", stacklevel=2)

    # ------------------------------------------------------------------ checks
    def _grad_mode(self, mapped, kwargs, checkpoint=None):
        needs_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (*mapped, *tensors_in(kwargs))
        )
        wanted = self.checkpointing if checkpoint is None else bool(checkpoint)
        checkpointed = needs_grad and wanted
        return ("checkpoint" if checkpointed else ("saved" if needs_grad else "none")), checkpointed

    @staticmethod
    def _check_args(op, mapped, name):
        if not callable(op):
            raise ValueError(f"op must be callable (a function of the sliced tensors), got {type(op).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty stage name such as 'refine.render', got {name!r}")
        if not mapped:
            raise ValueError("map needs at least one positional tensor to slice along axis 0; pass whole tensors as keywords")
        for i, t in enumerate(mapped):
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                what = type(t).__name__ if not isinstance(t, torch.Tensor) else "a 0-dim tensor"
                raise ValueError(
                    f"positional argument {i} of map must be a tensor with a leading item axis, got {what}; "
                    f"pass non-sliced values as keyword arguments"
                )
        n = mapped[0].shape[0]
        for i, t in enumerate(mapped[1:], start=1):
            if t.shape[0] != n:
                raise ValueError(
                    f"positional tensors must share the leading length: argument 0 has {n}, argument {i} has {t.shape[0]}"
                )

    @staticmethod
    def _check_output(out, n):
        leaves = pytree.tree_leaves(out)
        if not leaves:
            raise ValueError("op returned no tensors; it must return a tensor or a tuple/list/dict of tensors")
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                raise ValueError(
                    f"op must return tensors (or a tuple/list/dict of tensors), found a {type(leaf).__name__}"
                )
            if leaf.dim() == 0 or leaf.shape[0] != n:
                raise ValueError(
                    f"op output of shape {tuple(leaf.shape)} lacks the leading item axis of length {n}; "
                    f"ops run by Engine.map must return one row per input item"
                )
        return leaves

    # ------------------------------------------------------------------ running
    def map(self, op, *mapped, name: str, per_item_bytes: int | None = None, fixed_bytes: int | None = None,
            out_per_item_bytes: int | None = None, checkpoint: bool | None = None, **kwargs):
        """Run ``op`` over chunks of the positional tensors' first axis.

        Args:
            op: a function of slices of ``mapped`` and of ``kwargs`` (passed whole); it must return
                a tensor, or a tuple/list/dict of tensors, with one row per input item.
            *mapped: tensors sliced along axis 0, all of the same leading length N.
            name: the stage name (the report's key, and part of the cost model's signature).
            per_item_bytes: cost hint in bytes per item (with ``fixed_bytes``: skip estimation).
            fixed_bytes: cost hint in bytes independent of the chunk size.
            out_per_item_bytes: the outputs' bytes per item; with it the hint is taken as it is,
                without one item run first to check it.
            checkpoint: None = the engine's setting; False = keep whole autograd graphs (e.g. an
                op that runs its own backward); True = checkpoint when autograd needs it.
            **kwargs: passed to every call of ``op`` unsliced.

        Returns:
            What ``op(*mapped, **kwargs)`` returns: a tensor, or a tuple/list/dict of tensors, each
            with leading length N (chunk outputs written into outputs preallocated from the first).

        Raises:
            BudgetTooSmall: a chunk of one item does not fit the budget (bounded engine).
            torch.OutOfMemoryError: one item runs out of memory on an unbounded engine.
            ValueError: ``op``, ``mapped``, ``name`` or the op's outputs are malformed.
        """
        self._check_args(op, mapped, name)
        if tracing_fake():  # an outer stage is being estimated on fake tensors
            return op(*mapped, **kwargs)
        grad_mode, checkpointed = self._grad_mode(mapped, kwargs, checkpoint)
        if self._calibrating:
            return self._calibrate(op, mapped, kwargs, name, grad_mode, checkpointed)
        return self._map(op, mapped, kwargs, name, grad_mode, checkpointed,
                         (per_item_bytes, fixed_bytes, out_per_item_bytes), GroupPlan(op, mapped, kwargs))

    def map_groups(self, op, groups, *, name: str, checkpoint: bool | None = None, **common):
        """``map`` over several groups of items as ONE stage: one plan over all their items, and
        chunks that may span groups (each group's part of a chunk is one call of ``op`` with that
        group's own keyword arguments).

        For work of the same kind on different things (the hypotheses of several objects, each
        with its own frame and renderer): the budget is filled with items of any group, and a
        chunk is not cut short where a group ends. The stage's cost model is the one a plain
        ``map`` of the first group would use (same signature, so calibrations carry over), i.e.
        the groups' items are taken to cost alike; the first chunk corrects it if not.

        Args:
            op: as for ``map``; called as ``op(*slices of group.mapped, **common, **group.kwargs)``.
            groups: sequence of MapGroup (or (mapped, kwargs) pairs); every group's positional
                tensors have the first group's per-item shapes.
            name: the stage name.
            checkpoint: as for ``map``.
            **common: keyword arguments of every group (a group's own kwargs win).

        Returns:
            list with each group's output (what ``op`` on the whole group would return), in order.

        Raises:
            ValueError: no groups, or a group's tensors or the op's outputs are malformed.
            BudgetTooSmall, torch.OutOfMemoryError: as for ``map``.
        """
        groups = [MapGroup(tuple(g[0]), {**common, **dict(g[1])}) if not isinstance(g, MapGroup)
                  else MapGroup(tuple(g.mapped), {**common, **g.kwargs}) for g in groups]
        if not groups:
            raise ValueError("map_groups needs at least one group of items")
        shapes = [tuple(t.shape[1:]) for t in groups[0].mapped]
        for i, group in enumerate(groups):
            self._check_args(op, group.mapped, name)
            mine = [tuple(t.shape[1:]) for t in group.mapped]
            if mine != shapes:
                raise ValueError(f"group {i} of map_groups has per-item shapes {mine}, the first group {shapes}; "
                                 "the groups of one stage take items of one shape")
        if len(groups) == 1 or self._calibrating or tracing_fake() or sum(g.items for g in groups) == 0:
            return [self.map(op, *g.mapped, name=name, checkpoint=checkpoint, **g.kwargs) for g in groups]
        grouped = GroupedOp(op, groups)
        index = torch.arange(grouped.items)  # the items' places; the op finds its groups' slices from them
        grad_mode, checkpointed = self._grad_mode([t for g in groups for t in g.mapped],
                                                  [g.kwargs for g in groups], checkpoint)
        plan = GroupPlan(op, groups[0].mapped, groups[0].kwargs,
                         tracked=(*(g.mapped for g in groups), *(g.kwargs for g in groups)))
        return grouped.split(self._map(grouped, (index,), {}, name, grad_mode, checkpointed, (None, None, None), plan))

    def _map(self, op, mapped, kwargs, name, grad_mode, checkpointed, hints, plan):
        stage = self.report.stage(name)
        stage.checkpointed = stage.checkpointed or checkpointed
        self._release_cache_over_budget()
        self._notify("start", stage)
        span = None
        try:
            with self.meter.span(name) as span:
                # Inputs count against the budget for the whole outermost span (a session).
                self.meter.track(mapped, kwargs, *plan.tracked, scope="span")
                return self._run(op, mapped, kwargs, name, stage, grad_mode, checkpointed, hints, plan)
        finally:
            stage.calls += 1
            if span is not None:
                stage.wall_s += span.wall_s
                if span.gpu_s is not None:
                    stage.gpu_s = (stage.gpu_s or 0.0) + span.gpu_s
                stage.peak_bytes = max(stage.peak_bytes, span.peak_bytes)
                stage.peak_allocated_bytes = max(stage.peak_allocated_bytes, span.peak_allocated_bytes)
                self.report.see_peak(span.peak_bytes, span.peak_allocated_bytes)
            self._notify("end", stage)

    def _call_chunk(self, op, mapped, kwargs, start, stop, checkpointed, indices=None):
        args = [t[start:stop] for t in mapped] if indices is None else [t[indices] for t in mapped]
        if checkpointed:
            return _checkpoint(functools.partial(op, **kwargs), *args, use_reentrant=False)
        return op(*args, **kwargs)

    def _measured(self, op, mapped, kwargs, checkpointed, start=0, stop=None, indices=None):
        """Run one chunk under a meter span: (output, transient bytes, kept bytes)."""
        before = self.meter.live_bytes()
        with self.meter.span() as span:
            out = self._call_chunk(op, mapped, kwargs, start, stop, checkpointed, indices)
            kept = self.meter.live_bytes() - before
        return out, span.peak_allocated_bytes - before, kept

    def _probe(self, op, mapped, kwargs, checkpointed, indices):
        """Run the real op on the items ``indices``; (transient, output, kept) bytes measured."""
        out, transient, kept = self._measured(op, mapped, kwargs, checkpointed, indices=indices)
        out_bytes = output_bytes(self._check_output(out, len(indices)))
        del out
        return transient, out_bytes, kept

    def _attempt(self, fn):
        """(fn(), None), or (None, (first line, attempted bytes)) when memory ran out. The
        failed attempt's tensors are freed out of the except block: a tensor caught in the
        exception's frames would otherwise stay alive."""
        try:
            return fn(), None
        except Exception as exc:  # noqa: BLE001 - only memory errors are caught, see below
            if not is_out_of_memory(exc):
                raise
            failure = (_first_line(exc), getattr(exc, "attempted_bytes", None))
        self._free()
        return None, failure

    def _calibrate(self, op, mapped, kwargs, name, grad_mode, checkpointed):
        """Measure op on all of ``mapped`` and cache that as the stage's model (calibrating())."""
        key = stage_signature(name, mapped, kwargs, None, None, grad_mode)
        n = mapped[0].shape[0]
        with self.meter.span(name):
            self.meter.track(mapped, kwargs, scope="span")
            out, transient, kept = self._measured(op, mapped, kwargs, checkpointed, 0, n)
            out_bytes = output_bytes(self._check_output(out, n))
            self.planner.calibrated(key, name, n, transient, out_bytes, kept)
        return out

    def _run(self, op, mapped, kwargs, name, stage, grad_mode, checkpointed, hints, plan):
        per_item_bytes, fixed_bytes, out_per_item_bytes = hints
        n = mapped[0].shape[0]
        model = None
        if self.budget.unbounded or n == 0:
            stage.estimate_source = stage.estimate_source or "none"
            chunk = n if self.max_chunk is None else min(n, self.max_chunk)
        else:
            model = self._model(plan.op, plan.mapped, plan.kwargs, name, stage, grad_mode, checkpointed,
                                per_item_bytes, fixed_bytes)
            if out_per_item_bytes is not None and model.source == "hint":
                model.out_per_item_bytes = int(out_per_item_bytes)
            live = self.meter.live_bytes()
            # one chunk returns the op's own outputs: no output buffers besides them
            pending = model.pending_bytes(n, 0, True)
            chunk = self.planner.chunk_size(model, live, pending, n, self.max_chunk)
            if chunk < n:  # several chunks: their outputs are copied into buffers for all n
                pending = model.pending_bytes(n, 0, False)
                chunk = self.planner.chunk_size(model, live, pending, n, self.max_chunk)
            if chunk < 1:  # before anything big exists
                raise self._too_small(name, model, n, live)
            if model.out_per_item_bytes is None:
                chunk = 1  # hints that say nothing about outputs: check them on one item first
            stage.predicted_peak_bytes = max(stage.predicted_peak_bytes,
                                             self.planner.predicted_peak(model, live, pending, chunk))
        if n == 0:
            out = op(*mapped, **kwargs)
            self._check_output(out, 0)
            stage.chunk_sizes.append(0)
            return out
        return ChunkLoop(self, op, mapped, kwargs, name, stage, model, checkpointed).run(chunk)

    def _model(self, op, mapped, kwargs, name, stage, grad_mode, checkpointed, per_item_bytes, fixed_bytes):
        """The stage's cost model (cached, hinted, faked or probed); a probe that runs out of
        memory on its few items means the budget is too small."""
        key = stage_signature(name, mapped, kwargs, per_item_bytes, fixed_bytes, grad_mode)
        probe = functools.partial(self._probe, op, mapped, kwargs, checkpointed)
        estimations_before = self.planner.estimations
        found, failure = self._attempt(lambda: self.planner.model_for(
            key, op, mapped, kwargs, per_item_bytes, fixed_bytes, grad_mode, probe, name=name,
            probe_limit=self.max_chunk))
        if failure is not None:  # the probe itself did not fit
            stage.oom_errors.append(failure[0])
            attempted = failure[1] or (self.budget_bytes + 1)
            raise self._too_small(name, CostModel(0, 0, 0, source="probe"), mapped[0].shape[0], self.meter.live_bytes(),
                                  attempted=attempted, detail=f"; the probe of its cost ran out of memory: {failure[0]}")
        model, cached = found
        stage.estimations += self.planner.estimations - estimations_before
        stage.estimate_source = f"cache:{model.source}" if cached else model.source
        stage.estimate_note = model.note
        stage.per_item_bytes, stage.fixed_bytes = model.per_item_bytes, model.fixed_bytes
        self._release_cache_over_budget()  # the estimate may have left cached blocks
        return model

    def _too_small(self, name, model: CostModel, n, live, attempted=None, detail="") -> BudgetTooSmall:
        need = model.minimum_bytes(n, live) + self.external_bytes
        if attempted is not None:
            need = max(need, int(attempted))
        minimum = max(self.budget.budget_for_usable(need), (self.budget_bytes or 0) + 1 if attempted is not None else 0)
        budget_gb = self.budget_bytes / GIB
        text = (
            f"budget {budget_gb:.3f} GiB is below the minimum {minimum / GIB:.3f} GiB this stage needs "
            f"(stage '{name}': {live / MIB:.1f} MiB live, {self.external_bytes / MIB:.1f} MiB outside torch, "
            f"{model.pending_bytes(n, 0, False) / MIB:.1f} MiB of outputs, {model.fixed_bytes / MIB:.1f} MiB fixed + "
            f"{model.per_item_bytes / MIB:.2f} MiB per item){detail}; the minimum is {gib_ceil(minimum)} GiB"
        )
        return BudgetTooSmall(text, minimum_bytes=minimum, stage=name)

    def _release_cache_over_budget(self):
        """CUDA: cached blocks of earlier work count in reserved bytes; when they alone pass
        the usable budget, return them before a span starts measuring."""
        usable = self.planner.usable_bytes
        if self.meter.is_cuda and usable is not None and self.meter.reserved_bytes() > usable:
            torch.cuda.empty_cache()

    def _free(self):
        gc.collect()
        if self.meter.is_cuda:
            torch.cuda.empty_cache()
