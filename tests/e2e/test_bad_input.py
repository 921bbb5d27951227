"""Bad input, nothing lost: every malformed recipe, data file, tokenizer, checkpoint and command line
is answered with one clear error (or typer's usage message), exit code 2, no traceback, and not one
file changed, the previous run's directory included. Plus property-based tests for recipes."""

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import tomli_w
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rapid.cli import main
from rapid.errors import UserError
from rapid.recipe import load_recipe, parse_override
from rapid.train import train_raw
from tests.conftest import tiny_raw
from tests.e2e.test_train import _text_data


# ------------------------------------------------------------------ a workspace with a finished run
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """recipe.toml (tiny, text data), the data, a finished 2-step run in run/, a tokenizer without an
    end-of-document id, and assorted bad files."""
    ws = tmp_path_factory.mktemp("ws")
    data = _text_data(ws)
    raw = tiny_raw(run={"steps": 2, "eval_every": 0}, data=data, model={"vocab_size": 300})
    (ws / "recipe.toml").write_text(tomli_w.dumps(raw))
    train_raw(raw, ws / "run", progress=False)
    lines = Path(data["paths"][0]).read_text().splitlines()
    for name, eos in (("noeos", -1), ("good", 1)):
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(ws / name), vocab_size=300,
                                       model_type="bpe", eos_id=eos, bos_id=-1, byte_fallback=True, minloglevel=2)
    (ws / "empty.txt").write_text("\n\n  \n")
    (ws / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (ws / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (ws / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "no end\n')
    (ws / "null.jsonl").write_text('{"text": "fine"}\n{"text": null}\n')
    (ws / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (ws / "garbage.model").write_bytes(b"not a sentencepiece model")
    (ws / "bad.json").write_text("{zero: 2")
    (ws / "stage1.json").write_text('{"zero_optimization": {"stage": 1}}')
    (ws / "adir").mkdir()
    (ws / "empty.toml").write_text("")
    (ws / "binary.toml").write_bytes(b"\x00\x01\x02\xff")
    (ws / "invalid.toml").write_text("[run]\nsteps = \n")
    (ws / "dupkey.toml").write_text("[run]\nsteps = 3\nsteps = 4\n[model]\n")
    return ws


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _damage(run: Path, how: str) -> None:
    ck = run / "checkpoints" / "step_00000002"
    if how == "truncate":
        data = (ck / "__0_0.distcp").read_bytes()
        (ck / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    elif how == "flip":
        data = bytearray((ck / "state.json").read_bytes())
        data[len(data) // 2] ^= 0x01
        (ck / "state.json").write_bytes(bytes(data))
    elif how == "manifest":
        manifest = json.loads((ck / "manifest.json").read_text())
        manifest["files"]["__0_0.distcp"]["sha256"] = "0" * 64
        (ck / "manifest.json").write_text(json.dumps(manifest))
    elif how in ("files", "unlisted", "path", "step"):
        manifest = json.loads((ck / "manifest.json").read_text())
        if how == "files":
            manifest["files"] = [1]
        elif how == "unlisted":
            del manifest["files"][".metadata"]
        elif how == "path":
            manifest["files"]["../../recipe.toml"] = {"bytes": 1, "sha256": "0" * 64}
        else:
            manifest["step"] = 7
        (ck / "manifest.json").write_text(json.dumps(manifest))
    elif how == "shape":        # tensors of another model under a recipe that claims this one
        for recipe in (ck / "recipe.toml", run / "recipe.toml"):
            recipe.write_text(recipe.read_text().replace("seq_len = 16", "seq_len = 32"))
        _rehash(ck)
    elif how == "pickle":
        class Evil:
            def __reduce__(self):
                return (print, ("pwned",))
        (ck / ".metadata").write_bytes(pickle.dumps(Evil()))
        _rehash(ck)


def _rehash(ck: Path) -> None:
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["files"] = {n: f for n, f in manifest["files"].items() if (ck / n).exists()}
    for name in manifest["files"]:
        data = (ck / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ck / "manifest.json").write_text(json.dumps(manifest))


R = "recipe.toml"
RUN = ["run", R, "--out", "run", "--overwrite"]       # a failed run must not touch the previous one


def S(*sets):
    return [a for s in sets for a in ("--set", s)]


CASES = [
    # ---- recipes: tables, keys, types
    ("unknown table", RUN + S("bogus.x=1"), "unknown table [bogus]; valid: run, model"),
    ("unknown key", RUN + S("run.stepz=3"), "unknown key 'stepz'; valid:"),
    ("str for int", RUN + S("run.steps=ten"), "key 'steps' must be int, got str 'ten'"),
    ("float for int", RUN + S("run.steps=1.5"), "key 'steps' must be int, got float 1.5"),
    ("bool for int", RUN + S("run.steps=true"), "key 'steps' must be int, got bool True"),
    ("str for bool", RUN + S("model.residual=yes"), "key 'residual' must be bool"),
    ("list for str", RUN + S("run.name=[1]"), "key 'name' must be str"),
    ("negative steps", RUN + S("run.steps=-5"), "key 'steps' must be greater than 0, got -5"),
    ("zero log_every", RUN + S("run.log_every=0"), "key 'log_every' must be greater than 0"),
    ("eval at start without validation", RUN + S("run.eval_batches=0", "run.eval_at_start=true"),
     "eval_at_start = true needs eval_batches > 0"),
    ("negative save_every", RUN + S("run.save_every=-1"), "key 'save_every' must be greater than or equal to 0"),
    ("device tpu", RUN + S("run.device=tpu"), "key 'device' is 'tpu'; valid: auto, cpu, cuda"),
    ("negative lr", RUN + S("optim.lr=-0.001"), "key 'lr' must be greater than 0"),
    ("min_lr above lr", RUN + S("optim.lr=0.001", "optim.min_lr=0.01"), "min_lr=0.01 is larger than lr=0.001"),
    ("beta1 >= 1", RUN + S("optim.beta1=1.5"), "key 'beta1' must be less than 1"),
    ("zero eps", RUN + S("optim.eps=0"), "key 'eps' must be greater than 0"),
    ("nan clip", RUN + S("optim.clip=nan"), "key 'clip' must be a finite number, got nan"),
    ("infinite lr", RUN + S("optim.lr=inf"), "key 'lr' must be a finite number, got inf"),
    ("infinite capacity", RUN + S("model.capacity_factor=inf"), "key 'capacity_factor' must be a finite number"),
    ("run name with a path", RUN + S('run.name="../x"'), "key 'name' must match pattern"),
    ("empty run name", RUN + S('run.name=""'), "key 'name' must match pattern"),
    # ---- recipes: model shapes
    ("heads not dividing hidden", RUN + S("model.heads=3"), "hidden=32 is not divisible by heads=3"),
    ("zero heads", RUN + S("model.heads=0"), "key 'heads' must be greater than 0, got 0"),
    ("zero layers", RUN + S("model.layers=0"), "key 'layers' must be greater than 0"),
    ("zero vocab", RUN + S("model.vocab_size=0"), "key 'vocab_size' must be greater than 0"),
    ("negative seq_len", RUN + S("model.seq_len=-1"), "key 'seq_len' must be greater than 0"),
    ("experts list too long", RUN + S("model.experts=[2, 2, 2]"), "experts lists 3 counts but layers=2"),
    ("zero experts in list", RUN + S("model.experts=[2, 0]"), "key 'experts'[1] must be greater than 0"),
    ("experts wrong type", RUN + S("model.experts=many"), "key 'experts' must be int | list[int]"),
    ("top_k above experts", RUN + S("model.top_k=3"), "top_k=3 is larger than the expert count 2"),
    ("zero top_k", RUN + S("model.top_k=0"), "key 'top_k' must be greater than 0"),
    ("zero capacity factor", RUN + S("model.capacity_factor=0"), "key 'capacity_factor' must be greater than 0"),
    ("negative capacity factor", RUN + S("model.capacity_factor=-1.0"), "key 'capacity_factor' must be greater"),
    ("zero eval capacity", RUN + S("model.eval_capacity_factor=0"), "key 'eval_capacity_factor' must be greater"),
    ("drop policy", RUN + S("model.drop_policy=tail"), "key 'drop_policy' is 'tail'; valid: random, position, probs"),
    ("activation", RUN + S("model.activation=swish"), "key 'activation' is 'swish'; valid: gelu, gelu_tanh, relu"),
    ("dropout 1.5", RUN + S("model.dropout=1.5"), "key 'dropout' must be less than 1"),
    ("unknown model", RUN + S("model.name=llama"), "unknown model 'llama'; valid: gpt_moe"),
    ("import path not a plugin", RUN + S("model.name=os:getcwd"), "model 'os:getcwd' is not a model plugin class"),
    ("empty import path", RUN + S("data.name=:"), "cannot import data ':'"),
    ("huge vocabulary", RUN + S("model.vocab_size=4611686018427387904"), "cannot be built with these sizes"),
    # ---- recipes: plugins
    ("unknown router", RUN + S("router.name=nope"), "unknown router 'nope'; valid:"),
    ("router unknown key", RUN + S("router.margin=0.5"), "unknown key 'margin'; valid: gate_weights, jitter, name"),
    ("router choice", RUN + S("router.gate_weights=max"), "key 'gate_weights' is 'max'; valid: prob, one"),
    ("router range", RUN + S("router.jitter=-0.1"), "key 'jitter' must be greater than or equal to 0"),
    ("top1 with top_k 2", RUN + S("model.top_k=2"), "router 'top1' routes each token to one expert"),
    ("unknown parallel", RUN + S("parallel.name=deepspeedd"), "unknown parallel 'deepspeedd'; valid:"),
    ("precision", RUN + S("parallel.precision=int8"), "key 'precision' is 'int8'; valid: fp32, bf16, fp16"),
    ("zero micro_batch", RUN + S("parallel.micro_batch=0"), "key 'micro_batch' must be greater than 0"),
    ("negative grad_accum", RUN + S("parallel.grad_accum=-1"), "key 'grad_accum' must be greater than 0"),
    ("unknown loss", RUN + S("loss.aux=0.1"), "unknown loss term 'aux'; valid:"),
    ("zero lm weight", RUN + S("loss.lm=0.0"), "the lm term needs a positive weight"),
    ("nan loss weight", RUN + S("loss.z_loss=nan"), "key 'z_loss' must be a finite number"),
    ("kernel backend", RUN + S("kernels.backend=fast"), "backend 'fast' is not installed; valid: auto, reference"),
    ("unknown data source", RUN + S("data.name=web"), "unknown data 'web'; valid:"),
    ("val_fraction", RUN + S("data.val_fraction=1.5"), "key 'val_fraction' must be less than 1"),
    ("data unknown key", RUN + S("data.path=x"), "unknown key 'path'; valid:"),
    ("too much memory", RUN + S("model.hidden=8192", "model.heads=64", "model.experts=512", "model.layers=16"),
     "stopped before allocating"),
    # ---- recipes: files
    ("missing recipe", ["run", "nope.toml"], "recipe 'nope.toml' not found"),
    ("empty recipe", ["run", "empty.toml"], "a recipe needs at least the tables [run], [model]"),
    ("recipe is a directory", ["run", "adir"], "is a directory, not a TOML file"),
    ("binary recipe", ["run", "binary.toml"], "is not a UTF-8 text file"),
    ("invalid TOML", ["run", "invalid.toml"], "invalid.toml:2: invalid TOML in key 'steps' of [run]"),
    ("duplicate TOML key", ["run", "dupkey.toml"], "dupkey.toml:3: invalid TOML in key 'steps'"),
    ("--set without key", RUN + S("steps=3"), "is not table.key=value"),
    ("--set not a table", RUN + S("loss.lm.x=3"), "unknown loss term 'lm.x'"),
    # ---- data
    ("empty corpus", RUN + S('data.paths=["empty.txt"]'), "0 distinct non-empty documents"),
    ("non-UTF-8 text", RUN + S('data.paths=["latin1.txt"]'), "latin1.txt: not UTF-8"),
    ("binary data", RUN + S('data.paths=["binary.txt"]'), "binary.txt: contains NUL bytes; it looks binary"),
    ("broken JSONL line", RUN + S('data.paths=["broken.jsonl"]'), "broken.jsonl:2: not a JSON object"),
    ("JSONL text not a string", RUN + S('data.paths=["null.jsonl"]'), "null.jsonl:2: field 'text' is NoneType"),
    ("non-UTF-8 JSONL line", RUN + S('data.paths=["latin1.jsonl"]'), "latin1.jsonl:2: not UTF-8"),
    ("data path is a directory", RUN + S('data.paths=["adir"]'), "paths are directories, not files: adir"),
    ("data path missing", RUN + S('data.paths=["nope.txt"]'), "paths not found: nope.txt"),
    ("text without paths", RUN + S("data.paths=[]"), "needs paths = [...]"),
    # ---- tokenizers
    ("tokenizer missing", RUN + S("data.tokenizer=nope.model"), "tokenizer 'nope.model' does not exist"),
    ("tokenizer is a directory", RUN + S("data.tokenizer=adir"), "tokenizer 'adir' is a directory"),
    ("tokenizer garbage", RUN + S("data.tokenizer=garbage.model"), "garbage.model is not a sentencepiece model"),
    ("vocabulary too small", RUN + S("data.tokenizer=good.model", "model.vocab_size=400"),
     "has 300 pieces but [model] vocab_size=400"),
    ("no end-of-document id", RUN + S("data.tokenizer=noeos.model"), "has no end-of-document id"),
    # ---- checkpoints
    ("resume without checkpoint", ["run", R, "--out", "fresh", "--resume"], "no complete checkpoint under fresh"),
    ("truncated checkpoint", ["run", R, "--out", "run", "--resume"], "does not match its manifest", "truncate"),
    ("flipped bytes", ["run", R, "--out", "run", "--resume"], "does not match its manifest", "flip"),
    ("manifest mismatch", ["run", R, "--out", "run", "--resume"], "does not match its manifest", "manifest"),
    ("wrong model shape", ["run", R, "--out", "run", "--resume"] + S("model.seq_len=32", "run.steps=3"),
     "Size mismatch between saved torch.Size([16, 32]) and current: torch.Size([32, 32])", "shape"),
    ("pickle carrying code", ["run", R, "--out", "run", "--resume"] + S("run.steps=3"), "builtins.print is not allowed",
     "pickle"),
    ("changed recipe on resume", ["run", R, "--out", "run", "--resume"] + S("model.hidden=64"),
     "recipe differs from"),
    ("resume and overwrite", ["run", R, "--out", "run", "--resume", "--overwrite"], "give one of them"),
    ("inspect missing", ["ckpt", "inspect", "nope"], "nope does not exist"),
    ("inspect non-checkpoint", ["ckpt", "inspect", "adir"], "neither a checkpoint"),
    # ---- the run directory
    ("existing run without --resume", ["run", R, "--out", "run"], "already holds a run"),
    ("--out is a file", ["run", R, "--out", "empty.txt"], "--out empty.txt is a file, not a directory"),
    ("--out under a file", ["run", R, "--out", "empty.txt/x"], "empty.txt is not a writable directory"),
    ("--out would overwrite the recipe", ["run", R, "--out", "."], "would overwrite the recipe recipe.toml"),
    ("resume a finished run", ["run", R, "--out", "run", "--resume"], "already complete at step 2"),
    ("resume with fewer steps", ["run", R, "--out", "run", "--resume"] + S("run.steps=1"),
     "already complete at step 2 ([run] steps = 1)"),
    ("manifest files not a table", ["run", R, "--out", "run", "--resume"], "manifest.json is malformed", "files"),
    ("manifest without the metadata", ["run", R, "--out", "run", "--resume"], "does not list .metadata", "unlisted"),
    ("manifest names a path", ["run", R, "--out", "run", "--resume"], "manifest.json is malformed", "path"),
    ("manifest step mismatch", ["run", R, "--out", "run", "--resume"], "says step 7", "step"),
    # ---- layouts, refused before any process starts
    ("EP not dividing the world", RUN + ["--nproc", "2"] + S("parallel.name=torch", "parallel.expert_parallel=3"),
     "expert_parallel=3 does not divide the world size 2"),
    ("EP not dividing the experts", RUN + ["--nproc", "4", "--allow-oversubscribe"]
     + S("parallel.name=fsdp", "parallel.expert_parallel=4"), "does not divide the expert count of every MoE layer (2"),
    ("--nproc above the CPU count", RUN + ["--nproc", "4096"] + S("parallel.name=torch"),
     "--nproc 4096 is more than this machine's"),
    ("single with two processes", RUN + ["--nproc", "2"], "parallel strategy 'single' does not support 2 processes"),
    ("EP with one process", RUN + S("parallel.name=torch", "parallel.expert_parallel=2"),
     "expert_parallel=2 does not divide the world size 1"),
    ("CUDA on a CPU machine", RUN + S("run.device=cuda"), "[run] device = 'cuda' but no CUDA device is available"),
    ("DeepSpeed EP without ZeRO", RUN + ["--nproc", "2"] + S("parallel.name=deepspeed", "parallel.expert_parallel=2"),
     "DeepSpeed without ZeRO does not reduce sharded experts exactly"),
    ("MoE with ZeRO-3", RUN + S("parallel.name=deepspeed", "parallel.zero_stage=3"),
     "DeepSpeed does not support MoE layers with ZeRO-3"),
    ("offload without ZeRO", RUN + S("parallel.name=deepspeed", "parallel.offload=true"),
     "DeepSpeed offloads optimizer states only with ZeRO"),
    ("DeepSpeed fp16 on the CPU", RUN + S("parallel.name=deepspeed", "parallel.precision=fp16"),
     "DeepSpeed's CPU accelerator does not support fp16"),
    ("DeepSpeed JSON not JSON", RUN + S("parallel.name=deepspeed", "parallel.config=bad.json"), "is not valid JSON"),
    ("DeepSpeed JSON contradicts a switch", RUN + S("parallel.name=deepspeed", "parallel.config=stage1.json",
                                                      "parallel.zero_stage=2"),
     "contradicts the switches: zero_optimization.stage = 1 (the switches say 2)"),
    ("ZeRO on torch", RUN + S("parallel.name=torch", "parallel.zero_stage=2"),
     "parallel strategy 'torch' does not support zero_stage=2"),
    ("tensor parallel on fsdp", RUN + S("parallel.name=fsdp", "parallel.tensor_parallel=2"),
     "parallel strategy 'fsdp' does not support tensor_parallel=2"),
    ("zero stage 4", RUN + S("parallel.zero_stage=4"), "key 'zero_stage' is 4; valid: 0, 1, 2, 3"),
    ("zero stage true", RUN + S("parallel.zero_stage=true"), "key 'zero_stage' is True; valid: 0, 1, 2, 3"),
    ("unknown preset", RUN + S("parallel.preset=nope"), "unknown preset 'nope'; valid:"),
    ("preset of another strategy", RUN + S("parallel.name=torch", "parallel.preset=deepspeed_zero2"),
     "preset 'deepspeed_zero2' is for strategy 'deepspeed', not 'torch'"),
    # ---- routers
    ("unknown router option", RUN + S("router.name=hash", "router.variantt=random"),
     "[router] (name = 'hash'): unknown key 'variantt'; valid: name, variant"),
    ("unknown hash variant", RUN + S("router.name=hash", "router.variant=trigram"),
     "key 'variant' is 'trigram'; valid: random, frequency, bigram"),
    ("rre without domains", RUN + S("router.name=rre"), "router 'rre' routes by domain and no domains are declared"),
    ("rre groups leave out a domain", RUN + S("router.name=rre", 'data.domains=["corpus", "news"]',
                                              "router.groups={corpus = 1}"),
     "leaves out the domains ['news']"),
    ("rre groups name an undeclared domain", RUN + S("router.name=rre", 'data.domains=["corpus"]',
                                                     "router.groups={corpus = 1, sport = 1}"),
     "names undeclared domains ['sport']"),
    ("rre groups ask for too many experts", RUN + S("router.name=rre", 'data.domains=["corpus"]',
                                                    "router.groups={corpus = 3}"),
     "asks for 3 experts in all, which exceeds the layer's 2"),
    ("data in an undeclared domain", RUN + S('data.domains=["news"]'), "documents of domains not in [data] domains: corpus"),
    ("top_k above the experts", RUN + S("model.top_k=3", "router.name=topk"), "top_k=3 is larger than the expert count 2"),
    ("hash with top_k 2", RUN + S("router.name=hash", "model.top_k=2"), "router 'hash' sends each token to one expert"),
    ("expert choice dropless", RUN + S("router.name=expert_choice", "model.dropless=true"),
     "router 'expert_choice' needs a capacity"),
    ("extract from a top-1 run", ["extract", "run", "--domains", "sport", "--out", "sub"],
     "extract needs 'rre'"),
    # ---- CLI misuse: typer's usage message
    ("bare rapid", [], "Usage: rapid"),
    ("unknown command", ["nosuchcmd"], "No such command 'nosuchcmd'"),
    ("run without recipe", ["run"], "Missing argument 'RECIPE'"),
    ("unknown option", ["run", R, "--stepz", "5"], "No such option: --stepz"),
    ("plan --dp 0", ["plan", R, "--dp", "0"], "Invalid value for '--dp'"),
    ("plan --dp abc", ["plan", R, "--dp", "abc"], "Invalid value for '--dp'"),
    ("ckpt without subcommand", ["ckpt"], "Usage: rapid ckpt"),
]


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, workspace, tmp_path, capsys, monkeypatch):
    name, argv, needle, *damage = case
    if name == "CUDA on a CPU machine" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)
    if damage:
        _damage(ws / "run", damage[0])
    monkeypatch.chdir(ws)
    before = _snapshot(ws)
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err + out
    assert needle in " ".join((err + out).split()), err + out
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if errors:
        assert len(errors) == 1 and needle in " ".join(errors[0].split()), err   # the one line says it all
    else:
        assert "Usage:" in err + out                                            # typer's usage message
    assert _snapshot(ws) == before, "a failed command changed files"


# ------------------------------------------------------------------ properties of recipes and --set
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.integers(min_value=-10**6, max_value=10**6))
def test_steps_property(builtin_registry, tmp_path, steps):
    path = tmp_path / "r.toml"
    path.write_text("[run]\n[model]\n")
    if steps > 0:
        assert load_recipe(path, [f"run.steps={steps}"], builtin_registry).run.steps == steps
    else:
        with pytest.raises(UserError, match=f"--set run.steps={steps}: .* must be greater than 0"):
            load_recipe(path, [f"run.steps={steps}"], builtin_registry)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40))
def test_any_override_is_accepted_or_a_user_error(builtin_registry, tmp_path, text):
    """Whatever follows --set, the answer is a recipe or a UserError, never another exception."""
    path = tmp_path / "r.toml"
    path.write_text("[run]\n[model]\n")
    try:
        load_recipe(path, [text], builtin_registry)
    except UserError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(table="model", key="hidden", value=1)            # a cross-field rule (hidden % heads)
@example(table="optim", key="lr", value=7.25e-246)        # min_lr > lr
@example(table="model", key="name", value=0)
@given(table=st.sampled_from(["run", "model", "optim", "parallel", "router"]),
       key=st.sampled_from(["steps", "hidden", "lr", "micro_batch", "jitter", "seed", "dropless", "name"]),
       value=st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.booleans(), st.text(max_size=5),
                       st.lists(st.integers(-2, 4), max_size=3)))
def test_typed_overrides_round_trip(builtin_registry, tmp_path, table, key, value):
    """An override that is accepted is stored as given (int -> float aside) and survives a TOML round
    trip of the resolved recipe; one that is refused is a UserError naming --set."""
    path = tmp_path / "r.toml"
    path.write_text("[run]\n[model]\n")
    text = f"{table}.{key}={tomli_w.dumps({'v': value})[4:].strip()}"
    try:
        r = load_recipe(path, [text], builtin_registry)
    except UserError as exc:
        assert str(exc).startswith(f"--set {text}"), str(exc)
        return
    out = tmp_path / "resolved.toml"
    out.write_text(r.to_toml())
    assert load_recipe(out, registry=builtin_registry).to_dict() == r.to_dict()
    table_, key_, parsed = parse_override(text)
    assert r.to_dict()[table_][key_] == parsed
