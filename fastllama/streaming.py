"""Streaming the tokens of :class:`fastllama.generate.Generator` while it decodes.

:class:`TextStreamer` turns each step's token ids into text pieces (a window of context, not the
whole text, decoded per step); ``_HFStreamer`` feeds a transformers streamer as HF's ``generate``
does; ``_HostReader`` brings each step's tokens to the host without stalling the device.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterable, Sequence

import torch

from .reference.model import token_id_set

__all__ = ["TextStreamer"]


class _HFStreamer:
    """A transformers streamer (``BaseStreamer``) called as HF's ``generate`` calls it: ``put``
    of the (B, T) prompt ids first (left-padded with the pad id when given as lists), then of
    each step's (B,) ids, as CPU tensors; ``end`` at the end."""

    stop = ()  # (not None: the Generator does not hand it stop tokens, as it does a TextStreamer)

    def __init__(self, streamer):
        self.streamer = streamer

    @classmethod
    def wrap(cls, streamer, input_ids, prompts, pad: int):
        base = getattr(sys.modules.get("transformers.generation.streamers"), "BaseStreamer", None)
        if streamer is None or base is None or not isinstance(streamer, base):
            return streamer  # (a transformers streamer's class is loaded: its module is imported)
        if not isinstance(input_ids, torch.Tensor):
            longest = max(len(p) for p in prompts)
            input_ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
        streamer.put(input_ids.cpu())
        return cls(streamer)

    def put(self, ids: list[int]) -> None:
        self.streamer.put(torch.tensor(ids))

    def end(self) -> None:
        self.streamer.end()


class TextStreamer:
    """Turns each step's tokens into text pieces of one sequence, for ``generate(streamer=...)``.

    ``put(ids)`` gets the (B,) new token ids of a step; the text they add to sequence
    ``sequence`` is passed to ``on_text`` (held back while it ends in an incomplete UTF-8
    character). Stop tokens end the stream and are not printed; by default
    (``stop_tokens=None``) they are those of the ``generate`` call the streamer is given to.

    ``prompt``: that sequence's prompt ids (a list or 1-D tensor), or the (B, T) prompt given to
    ``generate``, of which row ``sequence`` is taken (a padding token in it decodes as the
    tokenizer decodes it: pass the row without padding if that is text). The pieces then
    continue the prompt's text: a SentencePiece decoder drops the leading space of a text's
    first word, so the generated tokens decoded on their own would lose the space after the
    prompt ("hi" + "read").

    Decoding is incremental: each step decodes only the tokens not yet printed plus the ones
    printed last, as context (what a text's first word would lose), so a step costs the same
    after 100k tokens as after 10. For valid text the pieces add up to the final decode; where
    a tokenizer rewrites text already printed (HF's byte fallback turns a run of bytes that is
    not UTF-8 into U+FFFD, earlier bytes included) the stream keeps what it printed and goes on.
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None = None, sequence: int = 0,
                 stop_tokens: Iterable[int] | None = None, prompt: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.on_text = on_text or (lambda s: print(s, end="", flush=True))
        self.sequence = sequence
        self.stop = None if stop_tokens is None else token_id_set(stop_tokens)
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() == 2:
                prompt = prompt[sequence]
            if prompt.dim() != 1:
                raise ValueError(f"prompt must be token ids (a list, a 1-D tensor, or the (B, T) prompt of "
                                 f"generate), got a tensor of shape {tuple(prompt.shape)}")
            prompt = prompt.tolist()
        self.ids: list[int] = [int(t) for t in prompt]
        # ids[context:printed] were printed last (or end the prompt); ids[printed:] are not yet
        self.printed = len(self.ids)
        self.context = max(0, self.printed - 4)
        self.done = False

    def put(self, ids: Sequence[int]) -> None:
        """Takes one decoding step's tokens (one per sequence; this streamer follows
        ``sequence``) and passes on the text they complete; a stop token ends the stream."""
        if self.done:
            return
        tok = int(ids[self.sequence])
        if tok in (self.stop or ()):
            self.done = True
            return
        self.ids.append(tok)
        self._emit(final=False)

    def end(self) -> None:
        """Flushes text held back (an incomplete multi-byte character) at the end of generation."""
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        # the text the new tokens add to their context's: held back while it ends in an incomplete
        # UTF-8 character (the next token may complete it). The context must start cleanly: not
        # inside a multi-byte character (HF's byte fallback would turn the whole byte run, new
        # bytes too, into U+FFFD) and not with bare whitespace (which a decoder may strip).
        before = self.tokenizer.decode(self.ids[self.context:self.printed])
        for _ in range(16):
            if self.context == 0 or (before and before[0] != "\ufffd" and not before[0].isspace()):
                break
            self.context -= 1
            before = self.tokenizer.decode(self.ids[self.context:self.printed])
        text = self.tokenizer.decode(self.ids[self.context:])
        if len(text) > len(before) and (final or not text.endswith("\ufffd")):
            self.on_text(text[len(before):])
            self.context, self.printed = self.printed, len(self.ids)


class _HostReader:
    """Copies a step's (B,) tokens to pinned host memory without stalling the device: the copy is
    queued, the next step is launched, and only then does the host wait (for the copy alone)."""

    def __init__(self, like: torch.Tensor):
        self.cuda = like.device.type == "cuda"
        self.host = torch.empty(like.shape, dtype=like.dtype, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.start(like)

    def start(self, src: torch.Tensor) -> None:
        self.host.copy_(src, non_blocking=self.cuda)
        if self.cuda:
            self.event.record()

    def read(self) -> list[int]:
        if self.cuda:
            self.event.synchronize()
        return self.host.tolist()
