"""The training loop, top to bottom: check -> join the process group -> data -> build on meta,
parallelize, materialise -> (resume) -> steps of grad_accum micro-batches -> log / validate /
checkpoint. ``train(recipe, out_dir)`` is the API that ``rapid run`` (and later ``rapid sweep``)
call, in every process; it returns the run's final metrics and timings. Only rank 0 writes
metrics.jsonl, the progress bar and console output."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from rapid import checkpoint, dist as rdist
from rapid.batches import BatchIterator, PackedSequences, val_batches
from rapid.cpu import TRIM_EVERY, keep_freed_memory, release_freed_memory
from rapid.errors import UserError
from rapid.kernels import Kernels
from rapid.moe import count_params
from rapid.plugins import Registry
from rapid.recipe import Recipe, build_model, resolve
from rapid.types import Batch, ModelOutput

RESUMABLE_RUN_KEYS = ("steps", "log_every", "eval_every", "eval_at_start", "eval_batches", "save_every",
                      "save_final", "keep_checkpoints", "max_skipped_steps", "cpu_keep_freed_memory")
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def lr_factor(i: int, warmup: int, total: int, min_ratio: float) -> float:
    """The LR factor of step ``i`` (0-based) of ``total``: linear warmup reaching 1 at step
    ``warmup - 1``, then cosine decay reaching ``min_ratio`` at the last step ``total - 1``."""
    if i < warmup:
        return (i + 1) / warmup
    span = total - warmup if warmup else total - 1
    progress = min(1.0, (i + 1 - warmup if warmup else i) / max(1, span))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_factory(recipe: Recipe, horizon: int | None = None):
    """AdamW + the warmup/cosine schedule over ``horizon`` steps (default ``[run] steps``; a resumed
    run keeps its checkpoint's horizon)."""
    o, total = recipe.optim, horizon or recipe.run.steps

    def make(model: nn.Module, regroup=None):
        """``regroup(groups) -> groups`` lets a backend split the parameter groups (DeepSpeed's MoE groups)."""
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"name": "decay", "params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
                  {"name": "no_decay", "params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # torch's fused AdamW (one kernel over all parameters): on the CPU 9 ms instead of 34 ms per
        # step for a 10M-parameter MoE model, whose expert weights make the optimizer a larger share
        # of its step than of a dense model's. Plain parameters only (not DTensors, not DeepSpeed's).
        fused = not regroup and all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") for p in params)
        opt = torch.optim.AdamW(regroup(groups) if regroup else groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                fused=fused or None)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, o.warmup, total, o.min_lr / o.lr))
        return opt, sched

    return make


def metric_key(term: str) -> str:
    return term if term.endswith("loss") else f"{term}_loss"


class LossFn:
    """The recipe's ``[loss]`` table: ``total = sum(weight * term(out, batch))``."""

    def __init__(self, recipe: Recipe, registry: Registry):
        self.terms = {name: (w, registry.get("loss", name)) for name, w in recipe.loss.items()}

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


def _sha256(path: Path) -> str:
    return checkpoint._sha256(Path(path))


def _say(message: str) -> None:
    if rdist.is_main():
        print(f"rapid: {message}", file=sys.stderr, flush=True)


def _resume_checkpoint(run_dir: Path, recipe: Recipe) -> Path:
    """The newest checkpoint that verifies and was written by the same recipe (only
    RESUMABLE_RUN_KEYS may differ)."""
    ckpt, skipped = checkpoint.find_resumable(run_dir / "checkpoints")
    for reason in skipped:
        _say(f"--resume skips a checkpoint: {reason}")
    if ckpt is None:
        why = f" ({len(skipped)} skipped, the newest because: {skipped[0]})" if skipped else ""
        raise UserError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}{why}",
                        hint="run without --resume to start fresh")
    saved = ckpt / "recipe.toml" if (ckpt / "recipe.toml").exists() else run_dir / "recipe.toml"
    if saved.exists():
        old, new = tomllib.loads(saved.read_text()), recipe.to_dict()
        for table in (old, new):
            for key in RESUMABLE_RUN_KEYS:
                table["run"].pop(key, None)
            table.pop("parallel", None)            # the layout and the backend may change: checkpoints reshard
        diff = sorted(f"[{t}] {k}" for t in new for k in set(new[t]) | set(old.get(t, {}))
                      if k in old.get(t, {}) and new[t].get(k) != old[t][k])   # keys added since: defaults
        if diff:
            raise UserError(f"--resume: recipe differs from {saved} in {', '.join(diff)}",
                            hint=f"only [run] {', '.join(RESUMABLE_RUN_KEYS)} and [parallel] may change")
    return ckpt


def check_run_dir(run_dir: Path, recipe: Recipe, resume: bool, overwrite: bool) -> None:
    """Before anything runs: ``--out`` can be a run directory, and a fresh run never silently
    replaces another run's files (``--overwrite`` moves them aside until the new run's first
    checkpoint)."""
    if resume and overwrite:
        raise UserError("--resume continues a run and --overwrite replaces it: give one of them")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file, not a directory")
    parent = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {run_dir}: {parent} is not a writable directory")
    # a run's own recipe.toml may be resumed (it is rewritten as the resumed run's record)
    if Path(recipe.path).resolve() == (run_dir / "recipe.toml").resolve() and not resume:
        raise UserError(f"--out {run_dir} would overwrite the recipe {recipe.path} with the resolved one",
                        hint="use another --out, e.g. runs/<name>")
    used = [p.name for p in (run_dir / "metrics.jsonl", run_dir / "checkpoints", run_dir / "recipe.toml") if p.exists()]
    if used and not resume and not overwrite:
        raise UserError(f"run directory {run_dir} already holds a run ({', '.join(used)})",
                        hint="--resume continues it, --out DIR starts elsewhere, --overwrite replaces it")


def _open_run_dir(run_dir: Path, recipe: Recipe, resume: bool, overwrite: bool, start: int) -> Path:
    """Rank 0 starts writing: recipe.toml, metrics.jsonl (cut back to ``start`` on resume). With
    ``--overwrite`` the previous run's files move to ``.replaced/``, deleted at the first checkpoint."""
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    if overwrite:
        aside = run_dir / ".replaced"
        shutil.rmtree(aside, ignore_errors=True)
        aside.mkdir()
        for name in ("metrics.jsonl", "checkpoints", "recipe.toml"):
            if (run_dir / name).exists():
                os.rename(run_dir / name, aside / name)
    checkpoint._write_atomic(run_dir / "recipe.toml", recipe.to_toml())
    keep = []
    if resume and metrics.exists():   # drop records past the checkpoint (logged again) and torn lines
        for line in metrics.read_text().splitlines():
            try:
                if int(json.loads(line)["step"]) <= start:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                pass
    checkpoint._write_atomic(metrics, "".join(line + "\n" for line in keep))
    return metrics


def _finite(model: nn.Module, device) -> bool:
    """Every parameter of every rank is finite (checked before a checkpoint is written)."""
    bad = torch.zeros((), device=device)
    for p in model.parameters():
        bad += (~torch.isfinite(p.detach().to_local() if hasattr(p, "to_local") else p.detach())).sum()
    if dist.is_initialized():
        dist.all_reduce(bad)
    return not bool(bad)


def _jsonable(record: dict) -> dict:
    """Strict JSON: a non-finite number is written as null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


@torch.no_grad()
def evaluate(engine, loss_fn: LossFn, batches: list[Batch], device) -> float:
    """The lm loss per target token over every data-parallel rank's ``batches``. Runs on a forked,
    fixed RNG: evaluation never draws from (or shifts) the training random stream."""
    engine.model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)   # loss * tokens, tokens
    lm = loss_fn.terms["lm"][1]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        for batch in batches:
            batch = batch.to(device)
            with engine.autocast():
                out = engine.model(batch)
            mask = batch.loss_mask_BS
            n = batch.targets_BS.numel() if mask is None else mask.sum()
            sums += torch.stack([lm(out, batch).double() * n, torch.as_tensor(n, dtype=torch.float64, device=device)])
    engine.model.train()
    if dist.is_initialized():
        dist.all_reduce(sums)
    return float(sums[0] / sums[1].clamp_min(1))


def preflight(recipe: Recipe, registry: Registry, world: int):
    """Every check that needs no data, no weights and no other process, run before anything is
    written or launched: the strategy against the recipe and the world size, the device, the memory
    plan (which builds the model on the meta device, so model and router options are checked), the
    loss terms and a kernel for every op."""
    strategy = registry.strategy(recipe.names["parallel"], recipe.parallel, world)
    strategy.check(recipe)
    device = strategy.device(recipe.run.device)
    registry.check_run(recipe, world, device)       # the planner: stop before allocating what cannot fit
    kernels = Kernels(registry, recipe.kernels.backend, recipe.kernels.pad_rows)
    for dtype in {torch.float32, PRECISION_DTYPES[recipe.parallel.precision]}:
        kernels.check(device, dtype)
    return strategy, device, LossFn(recipe, registry)


def _corpus(recipe: Recipe, registry: Registry):
    """Rank 0 prepares (and caches) the corpus first; the others then read the cache."""
    source = registry.get("data", recipe.names["data"])(recipe.data)
    if not rdist.is_main():
        rdist.barrier()
    try:
        return source.corpus(recipe.model.vocab_size)
    finally:
        if rdist.is_main():
            rdist.barrier()


def train(recipe: Recipe, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          registry: Registry | None = None, progress: bool = True) -> RunResult:
    registry = registry or Registry()
    recipe = resolve(recipe.to_dict(), recipe.path, registry)   # validated again: Configs are plain dataclasses
    run_dir = Path(out_dir)
    strategy, device, loss_fn = preflight(recipe, registry, rdist.env().world)
    check_run_dir(run_dir, recipe, resume, overwrite)
    grouped_before = dist.is_initialized()
    rdist.init(device.type)
    try:
        return _train(recipe, registry, strategy, device, loss_fn, run_dir, resume, overwrite, progress)
    finally:   # also a 1-process group a backend (DeepSpeed) created
        strategy.close()
        if dist.is_initialized() and not grouped_before:
            if sys.exc_info()[0] is None:
                dist.barrier()           # tear gloo down together (one rank leaving early aborted the other)
            dist.destroy_process_group()


def _train(recipe, registry, strategy, device, loss_fn, run_dir, resume, overwrite, progress) -> RunResult:
    run_cfg, par = recipe.run, recipe.parallel
    main = rdist.is_main()
    if device.type == "cpu" and run_cfg.cpu_keep_freed_memory:
        keep_freed_memory()
    ckpt = _resume_checkpoint(run_dir, recipe) if resume else None
    corpus = _corpus(recipe, registry)
    seq_len = recipe.model.seq_len
    dp_rank, dp_size = strategy.data_parallel()
    train_seqs = PackedSequences(corpus.train_tokens, corpus.train_domains, seq_len, "train")
    val = val_batches(PackedSequences(corpus.val_tokens, corpus.val_domains, seq_len, "validation"),
                      par.micro_batch, run_cfg.eval_batches * par.grad_accum, dp_rank, dp_size
                      ) if run_cfg.eval_batches else None   # global batches; none: the run never validates
    batches = BatchIterator(train_seqs, par.micro_batch, run_cfg.seed, par.grad_accum, dp_rank, dp_size)

    # build on meta, shard, materialise this rank's part, initialise it (experts by global id)
    with torch.device("meta"):
        counts_V = torch.from_numpy(corpus.train_tokens).bincount(minlength=recipe.model.vocab_size)
        model = build_model(recipe, registry, tuple(corpus.domains), counts_V)
    params = count_params(model, getattr(recipe.model, "top_k", 1))   # of the whole model, before sharding
    model = strategy.parallelize(model, device)
    model.to_empty(device=device)
    torch.manual_seed(run_cfg.seed)
    model.reset_parameters()
    torch.manual_seed(run_cfg.seed * 1_000_003 + rdist.env().rank)   # each rank its own training stream
    state = json.loads((ckpt / "state.json").read_text()) if ckpt else {}
    # The LR schedule's horizon is part of the run: a resumed run keeps its checkpoint's.
    horizon = int(state.get("schedule_steps", run_cfg.steps))
    if horizon != run_cfg.steps:
        _say(f"[run] steps={run_cfg.steps} but the checkpoint's LR schedule spans {horizon} steps; it is kept "
             f"(steps past {horizon} run at min_lr={recipe.optim.min_lr})")
    engine = strategy.wrap(model, optimizer_factory(recipe, horizon), recipe.optim.clip)
    start, skipped_total, skipped_run = 0, 0, 0
    data_id = {"corpus": corpus.fingerprint, "tokenizer": _sha256(corpus.tokenizer_path), "domains": corpus.domains}
    if ckpt:
        if state["step"] >= run_cfg.steps:
            raise UserError(f"--resume: the run is already complete at step {state['step']} ([run] steps = "
                            f"{run_cfg.steps})", hint="raise [run] steps to train further")
        if state.get("data_id", data_id) != data_id:
            raise UserError(f"--resume: the data or the tokenizer changed since {ckpt} was written "
                            f"({state['data_id']} -> {data_id}); its token ids would mean other text",
                            hint="restore the data files, or start a fresh run")
        _say(f"resuming from {ckpt}")
        state = checkpoint.load(ckpt, engine)
        start, skipped_total = int(state["step"]), int(state.get("skipped_steps", 0))
        batches.load_state_dict(state["data"])
        if state.get("world_size") != rdist.env().world:
            torch.manual_seed(run_cfg.seed * 1_000_003 + start * 101 + rdist.env().rank)   # a fresh stream per rank
            _say(f"the checkpoint was written by {state.get('world_size')} process(es): parameters and optimizer "
                 "state were resharded; random streams (jitter, random drops) restart")

    # ---- from here on the run directory is written (by rank 0)
    metrics_path = _open_run_dir(run_dir, recipe, resume, overwrite, start) if main else Path(os.devnull)

    tokens_per_step = par.micro_batch * par.grad_accum * seq_len * dp_size
    result = RunResult(run_dir, run_cfg.steps)
    window_steps, window_time, run_time = 0, 0.0, 0.0
    sums: dict[str, torch.Tensor] = {}
    layout = {"strategy": recipe.names["parallel"], "world_size": rdist.env().world,
              "expert_parallel": par.expert_parallel}
    bar = _Progress(run_cfg.steps, start, enabled=progress and main)
    with bar, metrics_path.open("a") as metrics_file:

        def emit(record: dict) -> None:
            if main:
                metrics_file.write(json.dumps(_jsonable(record)) + "\n")
                metrics_file.flush()
                registry.step_end(record["step"], record)

        if run_cfg.eval_at_start and start == 0 and val:
            emit({"step": 0, "val_loss": evaluate(engine, loss_fn, val, device)})
        for step in range(start + 1, run_cfg.steps + 1):
            t0 = time.perf_counter()
            for _ in range(par.grad_accum):
                batch = batches.next().to(device)
                out = engine.forward(batch)
                total, parts = loss_fn(out, batch)
                engine.backward(total / par.grad_accum)
                # running sums stay tensors: no device sync until a step is logged
                for name, value in (("loss", total), *parts.items()):
                    sums[name] = sums.get(name, 0.0) + value.detach().float() / par.grad_accum
                for name, values in out.stats.items():
                    sums[name] = sums.get(name, 0.0) + torch.as_tensor(sum(values) / len(values)).float() / par.grad_accum
            step_stats = engine.step()
            if step % TRIM_EVERY == 0:
                release_freed_memory()              # bounds the CPU heap's fragmentation (rapid.cpu)
            dt = time.perf_counter() - t0
            window_steps, window_time, run_time = window_steps + 1, window_time + dt, run_time + dt
            # A step with non-finite gradients (fp16 overflow, a diverging run) was not applied.
            skipped = bool(step_stats.pop("skipped", False))
            skipped_total, skipped_run = skipped_total + skipped, (skipped_run + 1) if skipped else 0
            if skipped_run >= run_cfg.max_skipped_steps:
                raise UserError(
                    f"training stopped at step {step}: {skipped_run} consecutive steps had a non-finite loss or "
                    f"gradients (last loss {float(total.detach()):.4g}); nothing was saved after the last checkpoint",
                    hint="lower [optim] lr, use bf16 instead of fp16, or raise [run] max_skipped_steps; "
                         "--resume restarts from the last checkpoint")
            save = ((run_cfg.save_every and step % run_cfg.save_every == 0)
                    or (step == run_cfg.steps and run_cfg.save_final))
            record: dict = {}
            if step % run_cfg.log_every == 0 or step == run_cfg.steps or save:   # a resume starts a fresh window
                n, names = window_steps, list(sums)
                means = torch.stack([torch.as_tensor(sums[k], device=device).float() for k in names])
                if dist.is_initialized():          # averaged over data-parallel ranks
                    dist.all_reduce(means)
                    means /= dist.get_world_size()
                means = dict(zip(names, (means / n).tolist()))
                record = {"step": step, "loss": means.pop("loss")}
                record.update({metric_key(k): means.pop(k) for k in loss_fn.terms})
                record.update(means)
                peak = torch.tensor([float(_peak_memory(device))], device=device)
                if dist.is_initialized():          # the fullest rank
                    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
                record.update(tokens_per_s=n * tokens_per_step / window_time, skipped_steps=skipped_total,
                              peak_memory_bytes=int(peak.item()), **step_stats)
                sums.clear()
                window_steps, window_time = 0, 0.0
                result.final = dict(record)
            if val and ((run_cfg.eval_every and step % run_cfg.eval_every == 0) or step == run_cfg.steps):
                record.setdefault("step", step)
                record["val_loss"] = result.val_loss = evaluate(engine, loss_fn, val, device)
            if record:
                emit(record)
            if save:
                if not _finite(model, device):
                    raise UserError(f"training stopped at step {step}: parameters are no longer finite; nothing was "
                                    "saved after the last checkpoint", hint="lower [optim] lr; --resume restarts "
                                    "from the last checkpoint")
                checkpoint.save(run_dir / "checkpoints", step, engine,
                                {"format": checkpoint.FORMAT, "step": step, "schedule_steps": horizon,
                                 "skipped_steps": skipped_total, "data": batches.state_dict(), "data_id": data_id},
                                keep=run_cfg.keep_checkpoints, recipe=recipe.to_toml(),
                                meta={"layout": layout, "params": params})
                if main and overwrite:
                    shutil.rmtree(run_dir / ".replaced", ignore_errors=True)   # the new run has a checkpoint now
            bar.update(step, result.final.get("loss"), result.final.get("tokens_per_s"), result.val_loss)
    result.seconds = run_time
    result.tokens_per_s = (run_cfg.steps - start) * tokens_per_step / run_time if run_time else 0.0
    return result


def _peak_memory(device: torch.device) -> int:
    """This process's peak memory so far: CUDA's max reserved bytes on a GPU, peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device)
    try:       # this process image's high-water mark (ru_maxrss would include the parent's RSS at fork)
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # Linux reports KiB


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
