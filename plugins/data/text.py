"""``text``: the user's own plain-text or JSONL files.

Plain text: one document per blank-line-separated block (or per line with ``per_line = true``).
JSONL (``*.jsonl``): one document per object, text under ``text_field``, domain under
``domain_field`` when set.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from rapid import hookimpl
from rapid.errors import UserError
from rapid.builtin.data.corpus import DataConfig, Document, DocumentSource


class TextFiles(DocumentSource):
    @dataclass
    class Config(DataConfig):
        paths: list[str] = field(default_factory=list)
        per_line: bool = False
        text_field: str = "text"
        domain_field: str = ""

    def _paths(self) -> list[Path]:
        if not self.config.paths:
            raise UserError("[data] name = 'text' needs paths = [...]")
        paths = [Path(p) for p in self.config.paths]
        dirs = [str(p) for p in paths if p.is_dir()]
        if dirs:
            raise UserError(f"[data] paths are directories, not files: {', '.join(dirs)}",
                            hint="list the files, e.g. with a glob in your shell")
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise UserError(f"[data] paths not found: {', '.join(missing)}")
        return paths

    def documents(self) -> Iterator[Document]:
        for path in self._paths():
            if path.suffix == ".jsonl":
                yield from self._jsonl(path)
                continue
            text = _decode(path.read_bytes(), str(path)).replace("\r\n", "\n").replace("\r", "\n")
            blocks = text.splitlines() if self.config.per_line else text.split("\n\n")
            for block in blocks:
                if block.strip():
                    yield Document(block.strip(), path.stem)

    def _jsonl(self, path: Path) -> Iterator[Document]:
        cfg = self.config
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                line = _decode(raw, f"{path}:{lineno}")
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    text = obj[cfg.text_field]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise UserError(f"{path}:{lineno}: not a JSON object with field {cfg.text_field!r} ({exc})") from None
                if not isinstance(text, str):
                    raise UserError(f"{path}:{lineno}: field {cfg.text_field!r} is {type(text).__name__}, not a string")
                domain = str(obj.get(cfg.domain_field, path.stem)) if cfg.domain_field else path.stem
                yield Document(text, domain)

    def fingerprint(self) -> str:
        """Each file's resolved path (domains come from file names), length and content."""
        h = hashlib.sha256(json.dumps([self.config.per_line, self.config.text_field,
                                       self.config.domain_field]).encode())
        for path in self._paths():
            data = path.read_bytes()
            h.update(f"{path.resolve()}\0{len(data)}\0".encode())
            h.update(data)
        return h.hexdigest()


def _decode(data: bytes, where: str) -> str:
    """UTF-8 text of a file (or a line of one, ``where`` = ``file:line``); a UserError if it is not text."""
    if b"\0" in data:
        raise UserError(f"{where}: contains NUL bytes; it looks binary, not text",
                        hint="[data] paths takes UTF-8 plain-text or JSONL files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})",
                        hint="re-encode it as UTF-8, e.g. iconv -f GBK -t UTF-8") from None


@hookimpl
def rapid_register_data_sources():
    return {"text": TextFiles}
