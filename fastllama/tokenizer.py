"""A thin wrapper over a sentencepiece model: ``Tokenizer(path).encode(text)``."""
from __future__ import annotations

from pathlib import Path

__all__ = ["Tokenizer"]


class Tokenizer:
    """Sentencepiece tokenizer with Llama's BOS/EOS handling.

    Args:
        path: a ``tokenizer.model`` file, or a directory that contains one.
    """

    def __init__(self, path):
        import sentencepiece as spm

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"no sentencepiece model at {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        """The pad id, or -1 when the model defines none."""
        return self.sp.pad_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text``, with BOS first and EOS last when asked (and defined)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self.sp.encode(text)
        if bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos and self.eos_id >= 0:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids) -> str:
        """Text of ``ids`` (a list or 1-D tensor); BOS/EOS/pad are dropped, and so are ids
        outside the vocabulary (a model's vocabulary padded past the tokenizer's, -1 pads)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):  # a 0-d tensor
            ids = [ids]
        if ids and isinstance(ids[0], list):
            raise ValueError(f"decode takes one sequence of ids; got {len(ids)} sequences (decode each row)")
        pad, n = self.pad_id, self.vocab_size  # (sentencepiece raises on ids outside [0, n))
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < n and int(i) != pad])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
