"""The training loop, top to bottom: build -> (resume) -> steps of grad_accum micro-batches ->
log / validate / checkpoint. ``train(recipe, out_dir)`` is the API that ``rapid run`` (and later
``rapid sweep``) call; it returns the run's final metrics and timings."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rapid import checkpoint
from rapid.cpu import keep_freed_memory
from rapid.data import BatchIterator, PackedSequences, prepare_corpus, val_batches
from rapid.errors import UserError
from rapid.kernels import Kernels
from rapid.plan import available_memory, fmt_bytes, make_plan
from rapid.plugins import Registry
from rapid.recipe import Recipe, resolve
from rapid.types import Batch, ModelOutput

RESUMABLE_RUN_KEYS = ("steps", "log_every", "eval_every", "eval_at_start", "eval_batches", "save_every",
                      "keep_checkpoints")


def build_model(recipe: Recipe, registry: Registry) -> nn.Module:
    model_cls = registry.get("model", recipe.names["model"])
    router_cls = registry.get("router", recipe.names["router"])
    kernels = Kernels(registry, recipe.kernels.backend)
    return model_cls(recipe.model, lambda moe_index, spec: router_cls(recipe.router, spec), kernels)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_factory(recipe: Recipe):
    o, total = recipe.optim, recipe.run.steps

    def make(model: nn.Module):
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, o.warmup, total, o.min_lr / o.lr if o.lr else 0.0))
        return opt, sched

    return make


def metric_key(term: str) -> str:
    return term if term.endswith("loss") else f"{term}_loss"


class LossFn:
    """The recipe's ``[loss]`` table: ``total = sum(weight * term(out, batch))``."""

    def __init__(self, recipe: Recipe, registry: Registry):
        self.terms = {name: (w, registry.get("loss", name)) for name, w in recipe.loss.items()}
        if "lm" not in self.terms:
            raise UserError("[loss] must include lm", hint="add lm = 1.0 to [loss]")

    def __call__(self, out: ModelOutput, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {name: fn(out, batch) for name, (_, fn) in self.terms.items()}
        total = sum(w * parts[name] for name, (w, _) in self.terms.items() if w)
        return total, parts


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    final: dict = field(default_factory=dict)     # last logged training metrics
    val_loss: float | None = None
    tokens_per_s: float = 0.0                     # over the whole run, excluding eval and saving
    seconds: float = 0.0


def check_memory(recipe: Recipe, registry: Registry, device: torch.device) -> None:
    plan = make_plan(recipe, registry)
    need, have = plan.memory_planned["total"], available_memory(device)
    if need > have:
        raise UserError(
            f"this recipe needs about {fmt_bytes(need)} per device ({plan.params_total / 1e9:.2f}B parameters, "
            f"{plan.precision}, {recipe.names['parallel']}) but {device.type} has {fmt_bytes(have)} available; "
            "stopped before allocating",
            hint="`rapid plan` shows the breakdown and `rapid plan --dp N` what ZeRO over N devices needs; "
                 "here, use fewer experts/layers/hidden or a smaller micro_batch")


def _resume_state(run_dir: Path, recipe: Recipe):
    ckpt = checkpoint.find_latest(run_dir / "checkpoints")
    if ckpt is None:
        raise UserError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}")
    saved = run_dir / "recipe.toml"
    if saved.exists():
        import tomllib
        old, new = tomllib.loads(saved.read_text()), recipe.to_dict()
        for table in (old, new):
            for key in RESUMABLE_RUN_KEYS:
                table["run"].pop(key, None)
        if old != new:
            diff = sorted(f"[{t}] {k}" for t in new for k in set(new[t]) | set(old.get(t, {}))
                          if new[t].get(k) != old.get(t, {}).get(k))
            raise UserError(f"--resume: recipe differs from the run's recipe.toml in {', '.join(diff)}",
                            hint=f"only [run] {', '.join(RESUMABLE_RUN_KEYS)} may change on resume")
    return checkpoint.load(ckpt)


def _truncate_metrics(path: Path, after_step: int) -> None:
    """Drop records past the checkpoint a resumed run restarts from (they will be logged again)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= after_step]
        path.write_text("".join(line + "\n" for line in keep))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


@torch.no_grad()
def evaluate(model: nn.Module, engine, loss_fn: LossFn, batches: list[Batch], device) -> float:
    model.eval()
    total = 0.0
    for batch in batches:
        batch = batch.to(device)
        with engine.autocast():
            out = model(batch)
        total += float(loss_fn.terms["lm"][1](out, batch))
    model.train()
    return total / len(batches)


def train(recipe: Recipe, out_dir: str | Path, *, resume: bool = False, registry: Registry | None = None,
          progress: bool = True) -> RunResult:
    registry = registry or Registry()
    run_cfg, par = recipe.run, recipe.parallel
    run_dir = Path(out_dir)
    strategy = registry.get("parallel", recipe.names["parallel"])(par)
    strategy.check(recipe)
    device = strategy.device(run_cfg.device)
    check_memory(recipe, registry, device)
    if device.type == "cpu" and run_cfg.cpu_keep_freed_memory:
        keep_freed_memory()
    loss_fn = LossFn(recipe, registry)

    source = registry.get("data", recipe.names["data"])(recipe.data)
    corpus = prepare_corpus(source, recipe.model.vocab_size)
    seq_len = recipe.model.seq_len
    train_seqs = PackedSequences(corpus.train_tokens, corpus.train_domains, seq_len, "train")
    val = val_batches(PackedSequences(corpus.val_tokens, corpus.val_domains, seq_len, "validation"),
                      par.micro_batch, run_cfg.eval_batches)

    torch.manual_seed(run_cfg.seed)
    model = build_model(recipe, registry).to(device)
    engine = strategy.wrap(model, optimizer_factory(recipe), recipe.optim.clip)
    batches = BatchIterator(train_seqs, par.micro_batch, run_cfg.seed)
    start = 0
    if resume:
        start, model_state, state = _resume_state(run_dir, recipe)
        model.load_state_dict(model_state)
        engine.load_state_dict(state["engine"])
        batches.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.toml").write_text(recipe.to_toml())
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        _truncate_metrics(metrics_path, start)
    else:
        metrics_path.write_text("")

    tokens_per_step = par.micro_batch * par.grad_accum * seq_len * strategy.world_size
    result = RunResult(run_dir, run_cfg.steps)
    window_steps, window_time, run_time = 0, 0.0, 0.0
    sums: dict[str, float] = {}
    bar = _Progress(run_cfg.steps, start, enabled=progress)
    with bar, metrics_path.open("a") as metrics_file:

        def emit(record: dict) -> None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            registry.step_end(record["step"], record)

        if run_cfg.eval_at_start and start == 0:
            emit({"step": 0, "val_loss": evaluate(model, engine, loss_fn, val, device)})
        for step in range(start + 1, run_cfg.steps + 1):
            t0 = time.perf_counter()
            for _ in range(par.grad_accum):
                batch = batches.next().to(device)
                with engine.autocast():
                    out = model(batch)
                total, parts = loss_fn(out, batch)
                engine.backward(total / par.grad_accum)
                # running sums stay tensors: no device sync until a step is logged
                for name, value in (("loss", total), *parts.items()):
                    sums[name] = sums.get(name, 0.0) + value.detach() / par.grad_accum
                for name, values in out.stats.items():
                    sums[name] = sums.get(name, 0.0) + sum(values) / len(values) / par.grad_accum
            step_stats = engine.step()
            dt = time.perf_counter() - t0
            window_steps, window_time, run_time = window_steps + 1, window_time + dt, run_time + dt
            record: dict = {}
            if step % run_cfg.log_every == 0 or step == run_cfg.steps:
                n = window_steps
                record = {"step": step, "loss": float(sums.pop("loss")) / n}
                record.update({metric_key(k): float(sums.pop(k)) / n for k in loss_fn.terms})
                record.update({k: float(v) / n for k, v in sums.items()})
                record.update(tokens_per_s=n * tokens_per_step / window_time, **step_stats)
                sums.clear()
                window_steps, window_time = 0, 0.0
                result.final = dict(record)
            if (run_cfg.eval_every and step % run_cfg.eval_every == 0) or step == run_cfg.steps:
                record.setdefault("step", step)
                record["val_loss"] = result.val_loss = evaluate(model, engine, loss_fn, val, device)
            if record:
                emit(record)
            if (run_cfg.save_every and step % run_cfg.save_every == 0) or step == run_cfg.steps:
                checkpoint.save(run_dir / "checkpoints", step, model.state_dict(),
                                {"engine": engine.state_dict(), "data": batches.state_dict(),
                                 "rng": _rng_state(), "step": step},
                                keep=run_cfg.keep_checkpoints)
            bar.update(step, result.final.get("loss"), result.final.get("tokens_per_s"), result.val_loss)
    result.seconds = run_time
    result.tokens_per_s = (run_cfg.steps - start) * tokens_per_step / run_time if run_time else 0.0
    return result


class _Progress:
    """A rich progress bar: step, loss, tokens/s, ETA."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.progress = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.progress.add_task("train", total=total, completed=start, info="")

    def __enter__(self):
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.stop()

    def update(self, step: int, loss, tps, val_loss) -> None:
        if self.enabled:
            info = " ".join(s for s in (
                f"loss {loss:.3f}" if loss is not None else "", f"val {val_loss:.3f}" if val_loss else "",
                f"{tps:,.0f} tok/s" if tps else "") if s)
            self.progress.update(self.task, completed=step, info=info)


def train_raw(raw: dict, out_dir, **kw) -> RunResult:
    """Train from a recipe given as a dict (tests, sweeps)."""
    registry = kw.pop("registry", None) or Registry()
    return train(resolve(raw, "<dict>", registry), out_dir, registry=registry, **kw)
