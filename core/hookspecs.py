"""Every hook rapid calls. Each docstring is that hook's contract.

Plugins implement these with ``@rapid.hookimpl``. Core code never touches ``pm.hook`` directly:
``rapid.plugins.Registry`` wraps each hook in one typed method.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("rapid")


@hookspec
def rapid_register_models():
    """Return ``{name: model class}``.

    A model class is an ``nn.Module`` with a ``Config`` dataclass (the ``[model]`` table's keys
    other than ``name``) and the constructor ``cls(config, make_router, kernels)``:
    ``make_router(moe_index, moe_spec) -> Router`` builds the router of one MoE layer and
    ``kernels`` is a ``rapid.kernels.Kernels``. ``forward(batch) -> ModelOutput``. It is built on the
    meta device, handed to the parallel strategy, materialised with ``to_empty`` and then
    initialised by ``reset_parameters()``, which must set every parameter and buffer (and re-tie
    shared weights). Its experts live in ``rapid.moe.Experts`` modules (every parameter of one is an
    expert parameter, experts stacked on dim 0) behind a ``rapid.moe.Dispatcher``; its transformer
    blocks are ``model.blocks`` (an ``nn.ModuleList``: activation checkpointing and FSDP wrap each).
    """


@hookspec
def rapid_register_routers():
    """Return ``{name: Router subclass}`` (see ``rapid.types.Router``).

    ``Router(config, spec)`` gets its ``Config`` dataclass (the ``[router]`` table's keys other than
    ``name``) and a ``MoESpec`` (hidden size, number of experts, top_k, capacities, drop policy).
    ``forward(x_TD, *, token_ids_T, domain_ids_T) -> Routing``: expert ids ``[T, k]`` (``-1`` marks a
    dropped assignment), combine weights ``[T, k]``, optional logits ``[T, E]``, named loss terms
    and float statistics. A router must be deterministic given the torch RNG state.
    """


@hookspec
def rapid_register_parallel():
    """Return ``{name: ParallelStrategy subclass}`` (see ``rapid.types.ParallelStrategy``).

    ``Strategy(config, world_size)`` gets its ``Config`` (extending ``rapid.types.ParallelConfig``)
    and declares ``capabilities``; ``check(recipe)`` refuses impossible combinations before any
    process starts; ``parallelize(model, device)`` shards and rewires the meta-device model (for
    instance replacing each MoE layer's dispatcher); ``wrap(model, make_optimizer, clip)`` turns the
    materialised model into an ``Engine`` (``forward``, ``backward``, ``step``, ``checkpoint_state``).
    Backend libraries are imported inside these methods, never at module import time.
    """


@hookspec
def rapid_register_losses():
    """Return ``{name: LossTerm}``.

    A loss term is a callable ``term(out: ModelOutput, batch: Batch) -> scalar Tensor``. The recipe's
    ``[loss]`` table maps names to weights; the total loss is ``sum(weight * term)``. Router loss
    terms are exposed as ``rapid.types.RouterLoss(name)``, which sums ``out.aux[name]`` over MoE
    layers.
    """


@hookspec(firstresult=True)
def rapid_kernel(op, device, dtype, backend):
    """Return the implementation of kernel ``op`` for tensors on ``device`` with ``dtype``, or None.

    ``op`` is one of ``rapid.kernels.OPS`` (``route``, ``permute``, ``grouped_mlp``, ``unpermute``;
    signatures in ``rapid.kernels``). ``backend`` is the recipe's ``[kernels] backend``: ``"auto"``
    lets any implementation answer; any other value must only be answered by the implementation of
    that name. The first non-None answer wins; the pure-torch reference is registered ``trylast`` and
    answers every device. The plugin names its backend with ``KERNEL_BACKEND`` and may define
    ``unavailable(op, device, dtype) -> str | None`` (why it does not answer: the error an explicit
    backend gets). ``permute`` may accept ``order=`` (a route's expert order, to gather without
    sorting) and ``grouped_mlp`` ``pad_rows=`` (``[kernels] pad_rows``); without them the generic path
    runs, or the recipe is refused. ``rapid kernels check`` tests an implementation against the
    reference.
    """


@hookspec
def rapid_register_data_sources():
    """Return ``{name: DataSource subclass}`` (see ``rapid.types.DataSource``).

    ``DataSource(config)`` gets its ``Config`` (the ``[data]`` table's keys other than ``name``);
    ``corpus(vocab_size)`` returns a ``rapid.types.Corpus``: the tokenizer and one token stream per
    split. Sources of text subclass ``rapid.builtin.data.corpus.DocumentSource`` and yield
    ``Document(text, domain)`` from ``documents()``; it deduplicates, splits, tokenizes and caches.
    """


@hookspec
def rapid_check_run(recipe, registry, world_size, device):
    """Refuse a run before anything is written or any process starts: raise ``rapid.UserError``.

    Called with the validated ``rapid.recipe.Recipe``, the ``Registry``, the number of processes
    and this process's ``torch.device`` (the builtin planner stops runs that would not fit in memory).
    """


@hookspec
def rapid_step_end(step, metrics):
    """Observe the end of a logged training step.

    ``metrics`` is the dict written to ``metrics.jsonl`` for ``step``. Observers must not modify it.
    """


@hookspec
def rapid_add_commands(app):
    """Add sub-commands to the ``rapid`` CLI: ``app`` is its ``typer.Typer``."""
