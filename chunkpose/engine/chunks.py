"""The chunk loop of one Engine.map call: run a chunk, measure it, correct the stage's cost
model after the first, copy the outputs into buffers preallocated from the first chunk,
plan the next; halve on out-of-memory and never grow back past a size that failed.

Separate from executor.py (the Engine's public face and its probes) because it is the one
piece with its own state per call; it reaches the engine only through its planner, meter,
report hooks and the `_attempt` / `_measured` / `_check_output` / `_too_small` helpers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.utils._pytree as pytree

from .planner import output_bytes

if TYPE_CHECKING:
    from .executor import Engine


class ChunkLoop:
    """The chunks of one map call: run, measure, correct the model, store, plan the next;
    halve on out-of-memory (bounded or not) and never grow back past a size that failed."""

    def __init__(self, engine: "Engine", op, mapped, kwargs, name, stage, model, checkpointed):
        self.engine, self.op, self.mapped, self.kwargs = engine, op, mapped, kwargs
        self.name, self.stage, self.model, self.checkpointed = name, stage, model, checkpointed
        self.n = mapped[0].shape[0]
        self.outputs = None  # (buffers, spec) of the preallocated outputs
        self.ceiling = engine.max_chunk

    def run(self, chunk: int):
        engine, stage, model = self.engine, self.stage, self.model
        done, first = 0, True
        while True:
            chunk = max(1, min(chunk, self.n - done))
            found, failure = engine._attempt(lambda: engine._measured(
                self.op, self.mapped, self.kwargs, self.checkpointed, done, done + chunk))
            if failure is not None:
                chunk = self._shrink(chunk, failure)
                continue
            out, transient, kept = found
            del found
            leaves = engine._check_output(out, chunk)
            if model is not None:
                engine.planner.note_success(model, chunk)
                if first:
                    if engine.planner.correct(model, chunk, transient, output_bytes(leaves), kept, name=self.name):
                        stage.corrections += 1
                    stage.per_item_bytes, stage.fixed_bytes = model.per_item_bytes, model.fixed_bytes
                self._cap_overshoot(chunk)
            first = False
            if done == 0 and chunk == self.n:
                stage.chunk_sizes.append(chunk)
                stage.n_chunks += 1
                stage.items += self.n
                engine._notify("chunk", stage)
                return out  # one chunk: the op's own result, nothing copied
            self._store(out, leaves, done, chunk)
            del out, leaves
            stage.chunk_sizes.append(chunk)
            stage.n_chunks += 1
            done += chunk
            engine._notify("chunk", stage)
            if done >= self.n:
                stage.items += self.n
                return pytree.tree_unflatten(self.outputs[0], self.outputs[1])
            chunk = self._next(chunk, done)

    def _shrink(self, chunk: int, failure) -> int:
        """Record an out-of-memory chunk and return the halved size (or raise at one item)."""
        engine, stage = self.engine, self.stage
        stage.retries += 1
        stage.oom_errors.append(failure[0])
        if self.model is not None:
            engine.planner.note_failure(self.model, chunk)
        if chunk == 1:
            if self.model is None:  # unbounded: nothing smaller to try
                raise torch.OutOfMemoryError(f"stage '{self.name}': one item ran out of memory: {failure[0]}")
            raise engine._too_small(self.name, self.model, self.n, engine.meter.live_bytes(),
                                    attempted=failure[1] or (engine.budget_bytes + 1),
                                    detail=f"; one item ran out of memory: {failure[0]}")
        chunk //= 2
        self.ceiling = chunk if self.ceiling is None else min(self.ceiling, chunk)
        return chunk

    def _cap_overshoot(self, chunk: int) -> None:
        """CUDA: a chunk whose reserved peak passed the usable budget (allocator overhead
        beyond the margin) caps the later chunks at three quarters of it."""
        engine = self.engine
        usable = engine.planner.usable_bytes
        if engine.meter.is_cuda and usable is not None and chunk > 1 and engine.meter.reserved_bytes() > usable:
            smaller = max(1, (chunk * 3) // 4)
            self.ceiling = smaller if self.ceiling is None else min(self.ceiling, smaller)
            torch.cuda.empty_cache()

    def _store(self, out, leaves, start: int, chunk: int) -> None:
        """Copy one chunk's outputs into the preallocated outputs (allocated at the first)."""
        engine = self.engine
        if self.outputs is None:
            spec = pytree.tree_structure(out)
            buffers, failure = engine._attempt(lambda: [
                torch.empty((self.n,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device) for t in leaves])
            if failure is not None:
                if self.model is None:
                    raise torch.OutOfMemoryError(f"stage '{self.name}': the full outputs did not fit: {failure[0]}")
                raise engine._too_small(self.name, self.model, self.n, engine.meter.live_bytes(), attempted=failure[1],
                                        detail="; the full outputs did not fit")
            self.outputs = (buffers, spec)
        for buffer, leaf in zip(self.outputs[0], leaves):
            if buffer.shape[1:] != leaf.shape[1:] or buffer.dtype != leaf.dtype:
                raise ValueError(
                    f"op returned {tuple(leaf.shape[1:])} {leaf.dtype} per item for items {start}..{start + chunk - 1} "
                    f"but {tuple(buffer.shape[1:])} {buffer.dtype} before; ops must not depend on the slicing"
                )
            buffer[start: start + chunk].copy_(leaf)

    def _next(self, chunk: int, done: int) -> int:
        """The next chunk's size: the plan under the budget, or (unbounded) the rest up to
        the ceiling an out-of-memory error left."""
        engine, model, stage = self.engine, self.model, self.stage
        remaining = self.n - done
        if model is None:
            return remaining if self.ceiling is None else min(remaining, self.ceiling)
        live = engine.meter.live_bytes()
        pending = model.pending_bytes(self.n, done, self.outputs is not None)
        next_chunk = engine.planner.chunk_size(model, live, pending, remaining, self.ceiling)
        if next_chunk < 1:
            next_chunk = 1
            stage.over_budget = True
        stage.predicted_peak_bytes = max(
            stage.predicted_peak_bytes, engine.planner.predicted_peak(model, live, pending, min(next_chunk, remaining)))
        return next_chunk
