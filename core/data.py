"""Documents -> sentencepiece BPE tokenizer -> packed token stream -> deterministic batches.

Everything derived from a data source (tokenizer, encoded splits) is cached under
``$RAPID_CACHE`` (default ``~/.cache/rapid``), keyed by the source's fingerprint and the settings
that shape it; cache files are written atomically and loaded without pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from rapid.errors import UserError
from rapid.types import Batch, DataSource

CORPUS_FORMAT = 1


def cache_dir() -> Path:
    return Path(os.environ.get("RAPID_CACHE") or Path.home() / ".cache" / "rapid")


@dataclass
class Corpus:
    tokenizer_path: Path
    eod_id: int
    domains: list[str]
    train_tokens: np.ndarray   # int32 stream, documents separated by eod
    train_domains: np.ndarray  # int16 domain id of each token
    val_tokens: np.ndarray
    val_domains: np.ndarray

    def tokenizer(self) -> spm.SentencePieceProcessor:
        return spm.SentencePieceProcessor(model_file=str(self.tokenizer_path))


def _train_tokenizer(texts: list[str], vocab_size: int, coverage: float, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        corpus = Path(tmp) / "train.txt"
        corpus.write_text("\n".join(t.replace("\n", " ") for t in texts), encoding="utf-8")
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus), model_prefix=str(Path(tmp) / "spm"), vocab_size=vocab_size,
                model_type="bpe", character_coverage=coverage, byte_fallback=True,
                unk_id=0, bos_id=-1, eos_id=1, pad_id=-1,   # eos doubles as the end-of-document token
                input_sentence_size=200_000, shuffle_input_sentence=True, num_threads=os.cpu_count() or 1,
                max_sentence_length=16384, minloglevel=2)
        except RuntimeError as exc:
            raise UserError(f"sentencepiece could not train a {vocab_size}-token BPE vocabulary: {exc}",
                            hint="raise [model] vocab_size or lower [data] character_coverage") from None
        os.replace(Path(tmp) / "spm.model", target)


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def prepare_corpus(source: DataSource, vocab_size: int) -> Corpus:
    cfg = source.config
    key_src = json.dumps({"format": CORPUS_FORMAT, "source": source.fingerprint(), "vocab": vocab_size,
                          "val_fraction": cfg.val_fraction, "max_documents": cfg.max_documents,
                          "tokenizer": cfg.tokenizer, "coverage": cfg.character_coverage}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    root = cache_dir() / "corpus" / key
    meta_path = root / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        arrays = {n: np.load(root / f"{n}.npy", allow_pickle=False)
                  for n in ("train_tokens", "train_domains", "val_tokens", "val_domains")}
        return Corpus(Path(meta["tokenizer"]), meta["eod_id"], meta["domains"], **arrays)

    docs = [d for d in source.documents() if d.text.strip()]
    if cfg.max_documents:
        docs = docs[: cfg.max_documents]
    if len(docs) < 2:
        raise UserError(f"data source yielded {len(docs)} non-empty documents; need at least 2")
    order = list(range(len(docs)))
    random.Random(0).shuffle(order)  # the split does not depend on the run seed
    n_val = max(1, math.ceil(len(docs) * cfg.val_fraction))
    val_docs, train_docs = [docs[i] for i in order[:n_val]], [docs[i] for i in order[n_val:]]

    if cfg.tokenizer:
        tok_path = Path(cfg.tokenizer)
        if not tok_path.exists():
            raise UserError(f"[data] tokenizer {cfg.tokenizer!r} does not exist", hint='use "" to train one')
    else:
        tok_path = cache_dir() / "tokenizers" / f"{key}.model"
        if not tok_path.exists():
            _train_tokenizer([d.text for d in train_docs], vocab_size, cfg.character_coverage, tok_path)
    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    if sp.get_piece_size() != vocab_size:
        raise UserError(f"tokenizer {tok_path} has {sp.get_piece_size()} pieces but [model] vocab_size={vocab_size}")
    eod = sp.eos_id() if sp.eos_id() >= 0 else sp.get_piece_size() - 1
    domains = sorted({d.domain for d in docs})
    dom_id = {d: i for i, d in enumerate(domains)}

    def encode(split):
        ids = sp.encode([d.text for d in split])
        tokens = np.fromiter((t for seq in ids for t in (*seq, eod)), dtype=np.int32)
        doms = np.repeat(np.array([dom_id[d.domain] for d in split], dtype=np.int16), [len(s) + 1 for s in ids])
        return tokens, doms

    (train_tokens, train_domains), (val_tokens, val_domains) = encode(train_docs), encode(val_docs)
    tmp_root = root.with_name(root.name + f".tmp{os.getpid()}")
    tmp_root.mkdir(parents=True, exist_ok=True)
    for name, arr in (("train_tokens", train_tokens), ("train_domains", train_domains),
                      ("val_tokens", val_tokens), ("val_domains", val_domains)):
        _save_npy(tmp_root / f"{name}.npy", arr)
    (tmp_root / "meta.json").write_text(json.dumps(
        {"tokenizer": str(tok_path), "eod_id": eod, "domains": domains, "source": key_src}))
    try:
        os.replace(tmp_root, root)
    except OSError:  # another process finished first; theirs is identical
        shutil.rmtree(tmp_root, ignore_errors=True)
    return Corpus(tok_path, eod, domains, train_tokens, train_domains, val_tokens, val_domains)


class PackedSequences:
    """Non-overlapping windows of ``seq_len + 1`` tokens over a document stream."""

    def __init__(self, tokens: np.ndarray, domains: np.ndarray, seq_len: int, what: str):
        self.tokens, self.domains, self.seq_len = torch.from_numpy(tokens.astype(np.int64)), \
            torch.from_numpy(domains.astype(np.int64)), seq_len
        self.count = (len(tokens) - 1) // seq_len
        if self.count < 1:
            raise UserError(f"{what} split has {len(tokens)} tokens, fewer than seq_len+1={seq_len + 1}",
                            hint="lower [model] seq_len or [data] val_fraction, or add text")

    def batch(self, indices: torch.Tensor) -> Batch:
        offsets = indices[:, None] * self.seq_len + torch.arange(self.seq_len + 1)
        window = self.tokens[offsets]
        return Batch(window[:, :-1], window[:, 1:], self.domains[offsets[:, :-1]])


class BatchIterator:
    """Seeded epoch-wise shuffles over packed sequences. ``position`` (micro-batches served) is the
    whole state: restoring it continues the exact same stream."""

    def __init__(self, seqs: PackedSequences, micro_batch: int, seed: int):
        if seqs.count < micro_batch:
            raise UserError(f"train split has {seqs.count} sequences, fewer than micro_batch={micro_batch}")
        self.seqs, self.micro_batch, self.seed = seqs, micro_batch, seed
        self.per_epoch = seqs.count // micro_batch
        self.position = 0
        self._epoch, self._perm = -1, None

    def next(self) -> Batch:
        epoch, i = divmod(self.position, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.seqs.count, generator=gen)
        self.position += 1
        return self.seqs.batch(self._perm[i * self.micro_batch:(i + 1) * self.micro_batch])

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def val_batches(seqs: PackedSequences, micro_batch: int, count: int) -> list[Batch]:
    """The first ``count`` micro-batches of the validation split (fewer if it is small)."""
    idx = torch.arange(min(seqs.count, micro_batch * count))
    return [seqs.batch(chunk) for chunk in idx.split(micro_batch)]
