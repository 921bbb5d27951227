"""``DocumentSource``: the base of data sources that yield documents. Documents -> dedup + hash split
-> sentencepiece BPE tokenizer -> one token stream per split, with end-of-document tokens.

Everything derived from a data source (tokenizer, encoded splits) is cached under
``$RAPID_CACHE`` (default ``~/.cache/rapid``) in one directory per key: the source's fingerprint, the
content of a user tokenizer and the settings that shape the result. The directory is written under a
temporary name and renamed into place, and its arrays are loaded without pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from typing import Annotated, Iterator

import numpy as np
import sentencepiece as spm
from pydantic import Field

from rapid.errors import UserError
from rapid.types import Corpus, DataSource, NonNegative

CORPUS_FORMAT = 2  # 2: dedup + hash split, tokenizer stored with the arrays, user tokenizer keyed by sha256
_ARRAYS = ("train_tokens", "train_domains", "val_tokens", "val_domains")


def cache_dir() -> Path:
    return Path(os.environ.get("RAPID_CACHE") or Path.home() / ".cache" / "rapid")


@dataclass
class Document:
    text: str
    domain: str = "default"


@dataclass
class DataConfig:
    """The ``[data]`` keys of every ``DocumentSource``; sources subclass it to add their own."""
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.02  # documents held out for validation
    tokenizer: str = ""               # path to a sentencepiece model; "" trains one (cached)
    character_coverage: Annotated[float, Field(gt=0, le=1)] = 0.9995  # rarer characters fall back to bytes
    max_documents: NonNegative = 0    # 0 = all
    dedup: bool = True                # drop exact copies (same NFKC, whitespace-collapsed text)
    domains: list[str] = field(default_factory=list)  # domain ids in this order ([] = the data's, sorted)
    keep_domains: list[str] = field(default_factory=list)  # train on these only, ids in this order ([] = all)

    def __post_init__(self):
        unknown = [d for d in self.keep_domains if self.domains and d not in self.domains]
        if unknown or len(set(self.keep_domains)) < len(self.keep_domains):
            raise ValueError(f"keep_domains {self.keep_domains} must name different declared domains "
                             f"({', '.join(self.domains)})")


class DocumentSource(DataSource):
    """A data source that yields documents; ``corpus`` tokenizes them (cached)."""
    Config = DataConfig

    def documents(self) -> Iterator[Document]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A string that changes whenever ``documents()`` would (used as a cache key)."""
        raise NotImplementedError

    def corpus(self, vocab_size: int) -> Corpus:
        return keep_domains(prepare_corpus(self, vocab_size), self.config.keep_domains)

    def cached_bytes(self, vocab_size: int) -> int | None:
        """Bytes the prepared corpus takes in memory (its arrays), or None before it is prepared."""
        root = corpus_cache(self, vocab_size)[0]
        if not (root / "meta.json").exists():
            return None
        return sum((root / f"{n}.npy").stat().st_size for n in _ARRAYS)


def normalise(text: str) -> str:
    """A document's identity for dedup and the split: NFKC, whitespace runs -> one space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def split_documents(docs: list[Document], val_fraction: float, dedup: bool = True
                    ) -> tuple[list[Document], list[Document], int]:
    """``docs`` -> (train, validation, number of copies dropped).

    With ``dedup`` only the first document with a given normalised text is kept. A document is held
    out iff the sha256 of its normalised text, as a fraction of 2**256, is below ``val_fraction``: the
    split of a document never changes when others are added, and copies never straddle it. Both
    splits are non-empty (the lowest hash is held out, or the highest trained on, if need be), each
    ordered by hash, which mixes domains deterministically. Needs at least two distinct texts.
    """
    hashed, seen = [], set()
    for doc in docs:
        h = int.from_bytes(hashlib.sha256(normalise(doc.text).encode()).digest(), "big")
        if not (dedup and h in seen):
            hashed.append((h, doc))
        seen.add(h)
    if len(seen) < 2:
        raise UserError(f"the [data] source has {len(seen)} distinct non-empty documents; need at least 2",
                        hint="check that the data files contain text")
    cut = min(max(int(val_fraction * 2**256), min(seen) + 1), max(seen))  # hash < cut: validation
    hashed.sort(key=lambda hd: hd[0])
    return [d for h, d in hashed if h >= cut], [d for h, d in hashed if h < cut], len(docs) - len(hashed)


def _train_tokenizer(texts: list[str], vocab_size: int, coverage: float, target: Path) -> None:
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


def _user_tokenizer(name: str) -> Path:
    """The ``[data] tokenizer`` file, which must exist and be a file."""
    path = Path(name)
    if path.is_dir():
        raise UserError(f"[data] tokenizer {name!r} is a directory, not a sentencepiece .model file")
    if not path.is_file():
        raise UserError(f"[data] tokenizer {name!r} does not exist", hint='use "" to train one')
    return path


def _load_tokenizer(path: Path, vocab_size: int) -> tuple[spm.SentencePieceProcessor, int]:
    """The tokenizer at ``path`` and its end-of-document (eos) id, checked against [model] vocab_size."""
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as exc:
        raise UserError(f"tokenizer {path} is not a sentencepiece model ({exc})",
                        hint='point [data] tokenizer at a .model file, or use "" to train one') from None
    if sp.get_piece_size() != vocab_size:
        raise UserError(f"tokenizer {path} has {sp.get_piece_size()} pieces but [model] vocab_size={vocab_size}",
                        hint=f"set [model] vocab_size = {sp.get_piece_size()}")
    if sp.eos_id() < 0:
        raise UserError(f"tokenizer {path} has no end-of-document id (its eos_id is -1)",
                        hint='train it with an eos piece (e.g. --eos_id=1), or use [data] tokenizer = "" to train one')
    return sp, sp.eos_id()


def keep_domains(corpus: Corpus, keep: list[str]) -> Corpus:
    """Only the documents of the domains ``keep``, renumbered to their positions in it (an extracted
    sub-model's data): the tokenizer, the split and the fingerprint stay those of the whole corpus."""
    if not keep:
        return corpus
    unknown = [d for d in keep if d not in corpus.domains]
    if unknown:
        raise UserError(f"[data] keep_domains names {unknown[0]!r}, which is not a domain of the data",
                        hint=f"its domains: {', '.join(corpus.domains)}")
    new_id = np.full(len(corpus.domains), -1, dtype=np.int16)
    new_id[[corpus.domains.index(d) for d in keep]] = np.arange(len(keep))
    arrays = {}
    for split in ("train", "val"):
        ids = new_id[getattr(corpus, f"{split}_domains")]
        arrays[f"{split}_tokens"], arrays[f"{split}_domains"] = getattr(corpus, f"{split}_tokens")[ids >= 0], ids[ids >= 0]
        if not arrays[f"{split}_tokens"].size:
            raise UserError(f"[data] keep_domains = {keep}: the {split} split holds no document of them")
    return dataclasses.replace(corpus, domains=list(keep), **arrays)


def _load_cached(root: Path, tok_path: Path, vocab_size: int) -> Corpus:
    """The corpus cached in ``root``, encoded with ``tok_path`` (checked again here)."""
    meta = json.loads((root / "meta.json").read_text())
    _, eod = _load_tokenizer(tok_path, vocab_size)
    arrays = {n: np.load(root / f"{n}.npy", allow_pickle=False) for n in _ARRAYS}
    return Corpus(tok_path, eod, meta["domains"], **arrays, duplicates_dropped=meta["duplicates_dropped"],
                  fingerprint=root.name)


def corpus_cache(source: DocumentSource, vocab_size: int) -> tuple[Path, Path | None, str]:
    """(the corpus's cache directory, the user's tokenizer or None, the cache key's source text)."""
    cfg = source.config
    user_tok = _user_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    key_src = json.dumps({"format": CORPUS_FORMAT, "source": source.fingerprint(), "vocab": vocab_size,
                          "val_fraction": cfg.val_fraction, "max_documents": cfg.max_documents, "dedup": cfg.dedup,
                          "tokenizer": user_tok and hashlib.sha256(user_tok.read_bytes()).hexdigest(),
                          "domains": list(cfg.domains),
                          "coverage": cfg.character_coverage}, sort_keys=True)
    root = cache_dir() / "corpus" / hashlib.sha256(key_src.encode()).hexdigest()[:32]
    return root, user_tok, key_src


def prepare_corpus(source: DocumentSource, vocab_size: int) -> Corpus:
    """``source``'s documents deduplicated, split (see ``split_documents``) and encoded with the
    ``[data] tokenizer`` or one trained on the training split; from the cache when it has them. The
    tokenizer is checked against ``vocab_size`` on every call."""
    root, user_tok, key_src = corpus_cache(source, vocab_size)
    cfg = source.config
    tok_path = user_tok or root / "tokenizer.model"
    if (root / "meta.json").exists():
        return _load_cached(root, tok_path, vocab_size)

    docs = [d for d in source.documents() if d.text.strip()]
    if cfg.max_documents:
        docs = docs[: cfg.max_documents]
    train_docs, val_docs, dropped = split_documents(docs, cfg.val_fraction, cfg.dedup)
    found = sorted({d.domain for d in train_docs + val_docs})
    domains = list(cfg.domains) or found
    undeclared = [d for d in found if d not in domains]
    if undeclared:
        raise UserError(f"documents of domains not in [data] domains: {', '.join(undeclared[:5])}",
                        hint=f"declared: {', '.join(domains)}; add them (ids follow the declared order)")
    if len(domains) > np.iinfo(np.int16).max:
        raise UserError(f"the [data] source has {len(domains)} domains; at most {np.iinfo(np.int16).max} are supported")
    dom_id = {d: i for i, d in enumerate(domains)}
    tmp_root = root.with_name(root.name + f".tmp{os.getpid()}")
    tmp_root.mkdir(parents=True, exist_ok=True)
    try:
        if user_tok is None:
            _train_tokenizer([d.text for d in train_docs], vocab_size, cfg.character_coverage,
                             tmp_root / "tokenizer.model")
        sp, eod = _load_tokenizer(user_tok or tmp_root / "tokenizer.model", vocab_size)
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            ids = sp.encode([d.text for d in split_docs])
            tokens = np.fromiter((t for seq in ids for t in (*seq, eod)), dtype=np.int32)
            doms = np.repeat(np.array([dom_id[d.domain] for d in split_docs], dtype=np.int16),
                             [len(s) + 1 for s in ids])
            np.save(tmp_root / f"{split}_tokens.npy", tokens)
            np.save(tmp_root / f"{split}_domains.npy", doms)
        (tmp_root / "meta.json").write_text(json.dumps(
            {"domains": domains, "duplicates_dropped": dropped, "train_documents": len(train_docs),
             "val_documents": len(val_docs), "source": key_src}))
        try:
            os.replace(tmp_root, root)
        except OSError:  # another process finished first: use theirs
            pass
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return _load_cached(root, tok_path, vocab_size)
