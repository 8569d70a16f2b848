"""Splitting a chat prompt into independently tokenized pieces.

The prompt of a RAG question is ``preamble | chunk_1 | ... | chunk_n | suffix``:

- preamble: the chat template up to the start of the first user message
  (BOS, system prompt, user-turn header), cached once per system prompt;
- chunks: each chunk's text, tokenized alone (no special tokens);
- suffix: the question (and any earlier chat turns) to the assistant header.

Each piece is tokenized on its own and the ids are concatenated, so chunk
boundaries never depend on their neighbours.
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from .errors import EmptyInputError

DEFAULT_SYSTEM_PROMPT = (
    "You answer questions using the documents in the user's message. "
    "Reply with a short answer only."
)
_SENTINEL = "\u2063KVPACKET_DOCUMENTS\u2063"


@dataclass(frozen=True)
class ChatTurn:
    """One earlier exchange of a conversation."""

    user: str
    assistant: str


class PromptFormatter:
    """Renders the three prompt pieces with the tokenizer's chat template.

    Chunk token ids are remembered for the last `CHUNK_MEMO` chunks: a served corpus asks for the same chunks'
    ids (their packet keys) question after question, and tokenizing them again is a measurable part of the time
    to first token.

    Args:
        tokenizer: a Hugging Face tokenizer (with or without a chat template).
        system_prompt: system message placed in the cached preamble.
    """

    CHUNK_MEMO = 2048
    """How many chunks' token ids are remembered (a 512-token chunk holds about 2 KB of text and 2 KB of ids)."""

    def __init__(self, tokenizer, system_prompt: str = DEFAULT_SYSTEM_PROMPT):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self._preamble_text = self._render(question="?", history=())[0]
        self._chunk_memo: OrderedDict[str, array] = OrderedDict()
        self._memo_lock = threading.Lock()

    def _render(self, question: str, history: Sequence[ChatTurn]) -> tuple[str, str]:
        first_user = history[0].user if history else question
        if not getattr(self.tokenizer, "chat_template", None):
            lines = [f"{self.system_prompt}\n\n", _SENTINEL, f"Question: {first_user}\nAnswer:"]
            for turn, following in zip(history, [*(t.user for t in history[1:]), question]):
                lines.append(f" {turn.assistant}\nQuestion: {following}\nAnswer:")
            bos = self.tokenizer.bos_token or ""
            text = bos + "".join(lines)
        else:
            messages = [{"role": "system", "content": self.system_prompt},
                        {"role": "user", "content": f"{_SENTINEL}Question: {first_user}"}]
            for turn, following in zip(history, [*(t.user for t in history[1:]), question]):
                messages += [{"role": "assistant", "content": turn.assistant}, {"role": "user", "content": following}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        before, _, after = text.partition(_SENTINEL)
        return before, after

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat_ids(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Token ids of ``(role, content)`` messages rendered with the chat template, assistant header last.

        Roles are ``system``, ``user`` and ``assistant``. Without a chat template a plain ``role: content``
        transcript is used. This is a plain prompt: no cached preamble, no documents.

        Raises:
            EmptyInputError: no message, or an empty last message.
        """
        if not messages or not str(messages[-1][1]).strip():
            raise EmptyInputError("the prompt is empty; pass at least one non-empty message")
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                                      tokenize=False, add_generation_prompt=True)
        else:
            text = (self.tokenizer.bos_token or "") + "".join(f"{r}: {c}\n" for r, c in messages) + "assistant:"
        return self._ids(text)

    def preamble_ids(self) -> list[int]:
        """Token ids of the cached prefix (template start, system prompt, user-turn header)."""
        return self._ids(self._preamble_text)

    def chunk_ids(self, text: str) -> list[int]:
        """Token ids of one document chunk, tokenized alone (a blank line ends it).

        Raises:
            EmptyInputError: the chunk is empty or whitespace.
        """
        if not text or not text.strip():
            raise EmptyInputError("a document chunk is empty; drop empty documents before building packets")
        with self._memo_lock:
            ids = self._chunk_memo.get(text)
            if ids is not None:
                self._chunk_memo.move_to_end(text)
                return ids.tolist()
        ids = array("i", self._ids(text.strip() + "\n\n"))
        with self._memo_lock:
            self._chunk_memo[text] = ids
            if len(self._chunk_memo) > self.CHUNK_MEMO:
                self._chunk_memo.popitem(last=False)
        return ids.tolist()

    def suffix_ids(self, question: str, history: Sequence[ChatTurn] = ()) -> list[int]:
        """Token ids after the chunks: the question, earlier turns, and the assistant header.

        Raises:
            EmptyInputError: the question is empty.
        """
        if not question or not question.strip():
            raise EmptyInputError("the question is empty; pass the text to answer")
        preamble, suffix = self._render(question.strip(), tuple(history))
        if preamble != self._preamble_text:
            raise ValueError("the chat template renders a different preamble per question; it cannot be cached")
        return self._ids(suffix)

    def full_prompt_ids(self, chunks: Sequence[str], question: str, history: Sequence[ChatTurn] = ()) -> list[int]:
        """Concatenated ids of all pieces: what full recompute runs through the model."""
        ids = self.preamble_ids()
        for chunk in chunks:
            ids += self.chunk_ids(chunk)
        return ids + self.suffix_ids(question, history)
