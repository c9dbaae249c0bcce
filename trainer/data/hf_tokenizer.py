"""A Hugging Face model's own tokenizer: ``data.tokenizer=hf:DIR`` (the default with model.init_from).

``DIR/tokenizer.json`` is read by ``tokenizers`` (a JSON description of the tokenizer: no code runs).
``encode`` is the tokenizer's own ``encode(text, add_special_tokens=True)`` — its normalizer,
pre-tokenizer, model and post-processor (which adds BOS where the model's template does), i.e.
what ``AutoTokenizer.from_pretrained(DIR)(text).input_ids`` gives. Documents end with the model's
EOS (``doc_sep``), found in generation_config.json (``eos_token_id``), else tokenizer_config.json
(``eos_token``), else config.json (``eos_token_id``); a list of EOS ids uses the first.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np

PREFIX = "hf:"
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class HfTokenizerError(ValueError):
    """A bad data.tokenizer=hf:DIR; one line naming it."""


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HfTokenizerError(f"data.tokenizer: {path} is not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


class HfTokenizer:
    name = "hf"

    def __init__(self, root: str):
        from tokenizers import Tokenizer

        self.root = Path(root).expanduser()
        file = self.root / "tokenizer.json"
        if not file.is_file():
            raise HfTokenizerError(f"data.tokenizer: hf:{root} has no tokenizer.json (the fast tokenizer file); "
                                   "allowed: hf:DIR of a Hugging Face model, bytes, bpe")
        try:
            self._tk = Tokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 - any parse error of the file is one line
            raise HfTokenizerError(f"data.tokenizer: {file} does not load ({str(e).splitlines()[0][:120]})") from None
        self.vocab_size = self._tk.get_vocab_size(with_added_tokens=True)
        self.identity = f"hf-{self.vocab_size}-{hashlib.sha256(file.read_bytes()).hexdigest()[:16]}"
        self.eos_id = self._special("eos")
        if self.eos_id is None:
            raise HfTokenizerError(f"data.tokenizer: hf:{root} names no EOS token (generation_config.json "
                                   "eos_token_id, tokenizer_config.json eos_token, config.json eos_token_id); "
                                   "documents end with it")
        self.bos_id = self._special("bos")
        self.doc_sep = self.eos_id

    def _special(self, kind: str) -> int | None:
        for source in ("generation_config.json", "config.json"):
            value = _json(self.root / source).get(f"{kind}_token_id")
            value = value[0] if isinstance(value, list) and value else value
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        for source in ("tokenizer_config.json", "special_tokens_map.json"):
            token = _json(self.root / source).get(f"{kind}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and self._tk.token_to_id(token) is not None:
                return self._tk.token_to_id(token)
        return None

    @functools.cached_property
    def byte_lengths(self) -> np.ndarray:
        """[vocab_size] UTF-8 bytes each id decodes to alone (bits-per-byte and the validation split)."""
        texts = self._tk.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)
        return np.array([len(t.encode()) for t in texts], dtype=np.int64)

    def encode(self, data: bytes | str) -> np.ndarray:
        text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
        return np.array(self._tk.encode(text, add_special_tokens=True).ids, dtype=np.uint32)

    def encode_many(self, datas: list[bytes | str]) -> list[np.ndarray]:
        """``encode`` of each, in one batch (the tokenizer's threads share it out)."""
        texts = [d.decode("utf-8", errors="replace") if isinstance(d, bytes) else d for d in datas]
        return [np.array(e.ids, dtype=np.uint32) for e in self._tk.encode_batch(texts, add_special_tokens=True)]

    def decode(self, ids) -> str:
        return self._tk.decode([int(i) for i in np.asarray(ids).tolist()], skip_special_tokens=True)


@functools.lru_cache(maxsize=4)
def load(root: str) -> HfTokenizer:
    return HfTokenizer(root)


def is_hf(name: str) -> bool:
    return name.startswith(PREFIX)


def tokenizer_dir(name: str) -> str:
    return name[len(PREFIX):]
