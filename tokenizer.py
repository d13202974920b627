"""The tokenizer every ROT5 script shares: a base vocabulary plus the special tokens T5/UL2 need.

Layout of the ids (Mistral, 32,000 SentencePiece pieces, ids 0..31999 with </s> = 2 as eos):

    32000          <pad>            padding, and the decoder start token (the T5 convention)
    32001..32003   [R] [X] [S]      UL2 mode tokens (Tay et al. 2022, sec. 3.1.2)
    32004..32255   <extra_id_0..>   sentinels that stand for the masked spans of span corruption

Sentinels fill the vocabulary up to a multiple of 128, which keeps the embedding and output matmuls
tensor-core friendly, with at least MIN_SENTINELS of them: the most spans the UL2 mixture makes is
round(0.5 * L / 3) for X-denoising (mean span 3, rate 0.5), i.e. 128 spans for a 766-token window.
"""
from __future__ import annotations

import os
import re
from functools import lru_cache

MIN_SENTINELS = 250
SENTINEL_RE = re.compile(r"<extra_id_(\d+)>")


class Tokenizer:
    """encode/decode text; special ids as attributes. Picklable (worker processes rebuild the model)."""

    def __init__(self, name: str):
        self.name = name
        if name == "mistral":
            import sentencepiece as spm

            self.model_file = mistral_model_file()
            self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
            self.base_vocab_size = self._sp.get_piece_size()
            self.eos_id = self._sp.eos_id()
        elif name == "gpt2":
            # tiktoken downloads the GPT-2 BPE file once (to TIKTOKEN_CACHE_DIR) and then works offline.
            import tiktoken

            self._bpe = tiktoken.get_encoding("gpt2")
            self.model_file = "tiktoken:gpt2"
            self.base_vocab_size = self._bpe.n_vocab
            self.eos_id = self._bpe.eot_token
        else:
            raise ValueError(f"unknown tokenizer {name!r}: use 'mistral' or 'gpt2'")
        n = self.base_vocab_size
        self.pad_id = n
        self.mode_ids = {"R": n + 1, "X": n + 2, "S": n + 3}
        first_sentinel = n + 4
        self.vocab_size = -(-(first_sentinel + MIN_SENTINELS) // 128) * 128
        self.sentinel_ids = list(range(first_sentinel, self.vocab_size))
        self._special_names = {self.pad_id: "<pad>", **{i: f"[{m}]" for m, i in self.mode_ids.items()}}
        self._special_names.update({s: f"<extra_id_{k}>" for k, s in enumerate(self.sentinel_ids)})

    def non_text_ids(self, sentinels: bool = True) -> list[int]:
        """Ids that a story or a summary never contains: pad, the mode tokens and, unless sentinels=False
        (filling gaps, where the decoder writes them), the sentinels. For generate(suppress_tokens=...)."""
        return [self.pad_id, *self.mode_ids.values(), *(self.sentinel_ids if sentinels else [])]

    def __getstate__(self):
        return {"name": self.name}

    def __setstate__(self, state):
        self.__init__(state["name"])

    def encode(self, text: str | list[str], allow_sentinels: bool = False) -> list[int] | list[list[int]]:
        """Text -> ids (no eos). A list of texts is encoded in one call (much faster for SentencePiece).

        allow_sentinels: turn `<extra_id_N>` in the text into sentinel N (to write fill-in-the-gap prompts).
        """
        if not isinstance(text, str):
            return [self.encode(t, allow_sentinels) for t in text] if allow_sentinels else self._encode_batch(text)
        if not allow_sentinels:
            return self._encode_batch([text])[0]
        ids: list[int] = []
        parts = SENTINEL_RE.split(text)
        for k, part in enumerate(parts):
            if k % 2 == 0:
                # A sentinel stands for whole tokens, which carry their own leading space: drop the space
                # before it, and encode what follows it as a continuation, not as the start of a text.
                part = part.rstrip(" ") if k + 1 < len(parts) else part
                if part:
                    ids += self._encode_continuation(part) if k > 0 else self._encode_batch([part])[0]
            else:
                if int(part) >= len(self.sentinel_ids):
                    raise ValueError(f"<extra_id_{part}> does not exist: this tokenizer has "
                                     f"{len(self.sentinel_ids)} sentinels (<extra_id_0> to <extra_id_{len(self.sentinel_ids) - 1}>)")
                ids.append(self.sentinel_ids[int(part)])
        return ids

    def _encode_continuation(self, text: str) -> list[int]:
        if self.name == "gpt2":
            return self._bpe.encode_ordinary(text)
        # SentencePiece prefixes every text with a word-start space; encode after a newline and cut it off.
        return self._sp.encode("\n" + text)[2:]

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.name == "mistral":
            return self._sp.encode(texts)
        return self._bpe.encode_ordinary_batch(texts)

    def decode(self, ids) -> str:
        """ids -> text. Stops at nothing; drops pad and eos; spells sentinels and mode tokens out."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size}): "
                             f"were these ids made with another tokenizer than {self.name!r}?")
        out: list[str] = []
        run: list[int] = []
        for i in ids + [-1]:
            if 0 <= i < self.base_vocab_size and i != self.eos_id:
                run.append(i)
                continue
            if run:
                out.append(self._decode_run(run, first=not out))
                run = []
            if i in self._special_names and i != self.pad_id:
                out.append(self._special_names[i])
        return "".join(out)

    def _decode_run(self, ids: list[int], first: bool) -> str:
        if self.name == "gpt2":
            return self._bpe.decode(ids)
        text = self._sp.decode(ids)
        # SentencePiece drops the word-start space of a run's first piece; keep it after a special token.
        if not first and self._sp.id_to_piece(ids[0]).startswith("\u2581"):
            text = " " + text
        return text


def mistral_model_file() -> str:
    """The Mistral v1 SentencePiece model that ships inside the mistral-common wheel (Apache-2.0)."""
    try:
        import mistral_common
    except ImportError:
        raise SystemExit("the Mistral tokenizer needs the mistral-common package: pip install mistral-common") from None
    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing: this mistral-common version does not ship tokenizer.model.v1; "
                         "pip install 'mistral-common>=1.5'")
    return path


@lru_cache(maxsize=None)
def get_tokenizer(name: str = "mistral") -> Tokenizer:
    return Tokenizer(name)
