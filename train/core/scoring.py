"""Scoring a checkpoint: the callbacks' framework. Each callback (train/core/callbacks.py)
schedules scores defined in train/core/metrics.py or train/core/circuits.py on probes built in
train/core/probes.py, and returns its results by metric name (tensors, numbers, lists);
`evaluate_checkpoint` publishes them in `RunContext.scores` for the callbacks after it and
flattens them into the checkpoint's row once (train/core/names.py).

A callback is built from config (`_target_`, conf/callbacks/default.yaml), gets `setup(ctx)` once
(builds what depends only on the fixed probes, never per checkpoint) and `__call__(ctx)` at every
`every`-th checkpoint. It declares what it publishes (`provides`), what it reads from earlier
callbacks (`needs`; `uses` for what it reads only when it is there) and what it needs of the
model and the probes (`requires`: capabilities of the model adapter, train/core/adapter.py, and
the optional probe inputs, train/core/probes.py HELDOUT / ALLOWED). `prepare_callbacks` orders
the callbacks so that each runs after those it reads from (config order where that leaves a
choice) and refuses, with a one-line error before training, a configuration where a need has no
provider or its provider does not run at every checkpoint the reader runs at. A callback the
model or the probes cannot serve is left out, with the callbacks that need its results, and one
note in `RunContext.notes` says which and why (the project's model serves every callback)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from train.core import adapter as A
from train.core import names as N
from train.core import probes as P
from train.core.config import ConfigError
from train.core.probes import Probes

# What the note says a model or probes lack.
LACKS = {A.LOGITS: "no logits", A.PATTERNS: "no attention patterns", A.Z: "no per-head z",
         A.WEIGHTS: "no mapped weights", A.RUN_FROM: "cannot run from a layer", A.PARAMETERS: "not trainable",
         P.HELDOUT: "no held-out text", P.ALLOWED: "no probe token set (allowed)"}


@dataclass
class RunContext:
    """What the callbacks see. `model`: the project's model or a model adapter
    (train/core/adapter.py adapt). `scores` holds, by metric name, the results of the callbacks
    that already ran at this checkpoint (emptied at every checkpoint); `notes`, what
    prepare_callbacks left out and why."""

    model: Any
    probes: Probes
    step: int = 0
    tokens: int = 0
    checkpoint_index: int = 0  # how many checkpoints came before this one
    scores: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Callback:
    provides: tuple[str, ...] = ()  # result names later callbacks may read
    needs: tuple[str, ...] = ()  # result names read from ctx.scores; a provider must run first
    uses: tuple[str, ...] = ()  # read when a configured callback provides them
    requires: tuple[str, ...] = ()  # model capabilities (adapter.py) and probe inputs (probes.py) it needs

    def __init__(self, every: int = 1):
        if every < 1:
            raise ValueError(f"callback 'every' must be >= 1, got {every}")
        self.every = every
        self.name = type(self).__name__  # its key under `callbacks:` once prepared

    def due(self, ctx: RunContext) -> bool:
        return ctx.checkpoint_index % self.every == 0

    def setup(self, ctx: RunContext) -> None:
        pass

    def __call__(self, ctx: RunContext) -> dict[str, Any]:
        raise NotImplementedError


def instantiate_callbacks(configs: Mapping[str, Any]) -> dict[str, Callback]:
    """Callbacks from their configs (`_target_` entries; None entries are switched off). A setting
    a callback refuses (out of range, unknown) is a ConfigError naming `callbacks.NAME`."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    callbacks = {}
    for name, c in configs.items():
        try:
            if c is not None:
                callbacks[name] = instantiate(c)
        except InstantiationException as e:
            if not isinstance(e.__cause__, (ValueError, TypeError)):
                raise
            raise ConfigError(f"callbacks.{name}: {' '.join(str(e.__cause__).split())}") from None
    return callbacks


def prepare_callbacks(named: Mapping[str, Callback], ctx: RunContext) -> list[Callback]:
    """Check the declared needs, leave out what the model or probes cannot serve (one note in
    ctx.notes), order the rest (readers after their providers, config order otherwise) and set
    them up. Raises ConfigError naming the callbacks at fault."""
    provider: dict[str, str] = {}
    for name, cb in named.items():
        cb.name = name
        for result in cb.provides:
            if result in provider:
                raise ConfigError(f"callbacks.{provider[result]} and callbacks.{name} both provide {result!r}")
            provider[result] = name
    after = _sources(named, provider)
    skipped = _unservable(named, ctx, provider)
    if skipped:
        note = getattr(ctx.model, "note", None)
        ctx.notes.append((f"{note}; skipped " if note else f"{getattr(ctx.model, 'name', type(ctx.model).__name__)}: "
                          "skipped ") + ", ".join(f"callbacks.{n} ({why})" for n, why in skipped.items()))
    kept = [n for n in named if n not in skipped]
    ordered: list[str] = []
    while len(ordered) < len(kept):
        ready = [n for n in kept if n not in ordered and after[n] - set(skipped) <= set(ordered)]
        if not ready:
            stuck = ", ".join(f"callbacks.{n}" for n in kept if n not in ordered)
            raise ConfigError(f"the callbacks {stuck} read each other's results in a cycle")
        ordered.append(ready[0])
    callbacks = [named[n] for n in ordered]
    for cb in callbacks:
        cb.setup(ctx)
    return callbacks


def _sources(named: Mapping[str, Callback], provider: dict[str, str]) -> dict[str, set[str]]:
    """{callback: the callbacks whose results it reads}; ConfigError for a need without a provider
    running at each of the reader's checkpoints."""
    after: dict[str, set[str]] = {}
    for name, cb in named.items():
        after[name] = set()
        for result in (*cb.needs, *cb.uses):
            source = provider.get(result)
            if source is None:
                if result in cb.needs:
                    raise ConfigError(f"callbacks.{name} needs {result!r}, which no configured callback provides")
                continue
            # A need must be there at every checkpoint the reader runs at; a use is read when it is.
            if result in cb.needs and cb.every % named[source].every:
                raise ConfigError(f"callbacks.{name} (every {cb.every}) reads {result!r} from callbacks.{source}, "
                                  f"which runs every {named[source].every}; make callbacks.{name}.every a multiple "
                                  f"of {named[source].every}")
            after[name].add(source)
    return after


def _unservable(named: Mapping[str, Callback], ctx: RunContext, provider: dict[str, str]) -> dict[str, str]:
    """{callback: why} for those whose `requires` the model or the probes lack, and, transitively,
    those that need their results."""
    available = set(getattr(ctx.model, "capabilities", ())) | ctx.probes.inputs()
    why = {name: ", ".join(LACKS.get(r, f"no {r}") for r in cb.requires if r not in available)
           for name, cb in named.items() if not set(cb.requires) <= available}
    grew = True
    while grew:
        grew = False
        for name, cb in named.items():
            source = next((provider[r] for r in cb.needs if provider.get(r) in why), None)
            if name not in why and source is not None:
                why[name], grew = f"needs callbacks.{source}", True
    return {name: why[name] for name in named if name in why}


def with_providers(named: Mapping[str, Callback | type[Callback]], chosen: list[str]) -> set[str]:
    """The chosen callbacks and, transitively, those that provide what they need (callbacks or
    their classes: `provides` and `needs` are class attributes)."""
    provider = {result: name for name, cb in named.items() for result in cb.provides}
    found: set[str] = set()
    todo = list(chosen)
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo += [provider[r] for r in named[name].needs if r in provider]
    return found


def evaluate_checkpoint(callbacks: list[Callback], ctx: RunContext) -> dict[str, Any]:
    """Run the callbacks due at this checkpoint, in order; returns their flat row keys."""
    ctx.scores = {}
    row: dict[str, Any] = {}
    with torch.no_grad():
        for cb in callbacks:
            if not cb.due(ctx):
                continue
            results = cb(ctx)
            missing = [r for r in cb.provides if r not in results]
            if missing:
                raise RuntimeError(f"callbacks.{cb.name} did not return {', '.join(missing)}")
            ctx.scores |= results
            row |= N.flatten(results)
    return row
