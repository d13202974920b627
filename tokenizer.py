"""The tokenizer every ROT5 script shares: a base vocabulary plus the special tokens T5/UL2 need.

Layout of the ids (Mistral, 32,000 SentencePiece pieces, ids 0..31999 with </s> = 2 as eos):

    32000          <pad>            padding, and the decoder start token (the T5 convention)
    32001..32003   [R] [X] [S]      UL2 mode tokens (Tay et al. 2022, sec. 3.1.2)
    32004..32255   <extra_id_0..>   sentinels that stand for the masked spans of span corruption

Sentinels fill the vocabulary up to a multiple of 128, which keeps the embedding and output matmuls
tensor-core friendly, with at least MIN_SENTINELS of them: the most spans the UL2 mixture makes is
round(0.5 * L / 3) for X-denoising (mean span 3, rate 0.5), i.e. 128 spans for a 766-token window.

"hf:SOURCE" is the vocabulary of a Hugging Face model (a hub id such as HuggingFaceTB/SmolLM2-135M, or a
directory), read from its tokenizer.json with the `tokenizers` library, eos and bos as its tokenizer_config.json
names them: the layout above with the source's n ids in place of Mistral's 32,000, so that a Llama-family model
adapted into ROT5 (hf_llama.py) keeps its embedding rows and gains pad, the mode tokens and the sentinels after
them (SmolLM2: 49,152 + 256 = 49,408 ids). Text is encoded without the source's own bos / eos.

"t5:SOURCE" is T5's own vocabulary, to fine-tune Hugging Face T5 / T5 v1.1 / FLAN-T5 models (checkpoint.py):
the spiece.model of SOURCE (a hub id such as google/flan-t5-base, a directory that holds it, or the file).
Its layout is T5's (HF T5Tokenizer), not the one above:

    0, 1, 2        <pad> </s> <unk>   pad is the decoder start token; no UL2 mode tokens
    3..n-1         SentencePiece pieces (n = 32,000 for T5)
    n..n+99        <extra_id_99> .. <extra_id_0>   100 sentinels at the top, in reverse order
    n+100..        unused rows up to a multiple of 128 (T5's 32,128), never generated
"""
from __future__ import annotations

import json
import os
import re
from functools import lru_cache

MIN_SENTINELS = 250
T5_SENTINELS = 100
SENTINEL_RE = re.compile(r"<extra_id_(\d+)>")


class Tokenizer:
    """encode/decode text; special ids as attributes. Picklable (worker processes rebuild the model).
    model_file: the SentencePiece model to read instead of the one the name locates (a mistral or t5: name):
    the copy an export directory carries (checkpoint.py), so that it needs nothing else to be read."""

    def __init__(self, name: str, model_file: str | None = None):
        self.name = name
        if model_file is not None and name == "gpt2":
            raise ValueError("the gpt2 tokenizer is tiktoken's, read by name: it takes no model file")
        if name == "mistral":
            import sentencepiece as spm

            self.model_file = model_file or mistral_model_file()
            self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
            self.base_vocab_size = self._sp.get_piece_size()
            self.eos_id, self.bos_id = self._sp.eos_id(), self._sp.bos_id()
        elif name.startswith("hf:"):
            from tokenizers import Tokenizer as HFTokenizer

            source = name[3:]  # a local one by its absolute path, as t5: names
            self.name = "hf:" + os.path.abspath(source) if os.path.exists(source) and not model_file else name
            self.model_file = model_file or hf_tokenizer_file(source)
            try:
                self._hf = HFTokenizer.from_file(self.model_file)
            except Exception as e:  # noqa: BLE001 - not JSON, not a tokenizer: the same fix
                raise ValueError(f"{self.model_file} is not a tokenizers tokenizer.json ({type(e).__name__}: "
                                 f"{(str(e).splitlines() or [''])[0][:120]})") from None
            self.base_vocab_size = max(self._hf.get_vocab(with_added_tokens=True).values()) + 1
            self.eos_id, self.bos_id = hf_special_ids(self._hf, self.model_file)
        elif name.startswith("t5:"):
            import sentencepiece as spm

            source = name[3:]  # a local one by its absolute path: the name goes into checkpoints and meta.json
            self.name = "t5:" + os.path.abspath(source) if os.path.exists(source) and not model_file else name
            self.model_file = model_file or t5_model_file(source)
            self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
            self.base_vocab_size = self._sp.get_piece_size()
            self.eos_id, self.bos_id = self._sp.eos_id(), None
            if (self._sp.pad_id(), self.eos_id) != (0, 1):
                raise ValueError(f"{self.model_file} is not T5's SentencePiece model: T5's has pad 0 and eos 1, "
                                 f"this one pad {self._sp.pad_id()} and eos {self.eos_id}")
        elif name == "gpt2":
            # tiktoken downloads the GPT-2 BPE file once (to TIKTOKEN_CACHE_DIR) and then works offline.
            import tiktoken

            self._bpe = tiktoken.get_encoding("gpt2")
            self.model_file = "tiktoken:gpt2"
            self.base_vocab_size = self._bpe.n_vocab
            self.eos_id, self.bos_id = self._bpe.eot_token, None
        else:
            raise ValueError(f"unknown tokenizer {name!r}: use 'mistral', 'gpt2', 't5:HUB_ID_OR_DIR' or 'hf:HUB_ID_OR_DIR'")
        n = self.base_vocab_size
        if name.startswith("t5:"):
            self.pad_id, self.mode_ids = 0, {}
            self.vocab_size = -(-(n + T5_SENTINELS) // 128) * 128
            self.sentinel_ids = [n + T5_SENTINELS - 1 - k for k in range(T5_SENTINELS)]
        else:
            self.pad_id = n
            self.mode_ids = {"R": n + 1, "X": n + 2, "S": n + 3}
            first_sentinel = n + 4
            self.vocab_size = -(-(first_sentinel + MIN_SENTINELS) // 128) * 128
            self.sentinel_ids = list(range(first_sentinel, self.vocab_size))
        special = {self.pad_id, *self.mode_ids.values(), *self.sentinel_ids}
        self.unused_ids = [i for i in range(n, self.vocab_size) if i not in special]  # T5's 32100..32127
        self._special_names = {self.pad_id: "<pad>", **{i: f"[{m}]" for m, i in self.mode_ids.items()}}
        self._special_names.update({s: f"<extra_id_{k}>" for k, s in enumerate(self.sentinel_ids)})

    def non_text_ids(self, sentinels: bool = True) -> list[int]:
        """Ids that a story or a summary never contains: pad, the mode tokens, unused ids and, unless
        sentinels=False (filling gaps, where the decoder writes them), the sentinels. For
        generate(suppress_tokens=...)."""
        return [self.pad_id, *self.mode_ids.values(), *self.unused_ids, *(self.sentinel_ids if sentinels else [])]

    def mode_prefix(self, mode: str) -> list[int]:
        """The UL2 mode token ("R", "X" or "S") that starts an input, as a list: [] for T5's own vocabulary,
        which has none (T5 was pre-trained without them; its inputs start with the text or a task prefix)."""
        return [self.mode_ids[mode]] if self.mode_ids else []

    def __getstate__(self):
        return {"name": self.name, "model_file": self.model_file if self.name != "gpt2" else None}

    def __setstate__(self, state):
        self.__init__(state["name"], state.get("model_file"))

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
        if self.name.startswith("hf:"):  # as t5: a new text (its leading space is kept, so no word-start is added)
            return self._encode_batch([text])[0]
        if self.name.startswith("t5:"):  # as HF T5Tokenizer (legacy): text after a sentinel is a new text
            return self._sp.encode(text)
        # SentencePiece prefixes every text with a word-start space; encode after a newline and cut it off.
        return self._sp.encode("\n" + text)[2:]

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.name.startswith("hf:"):
            return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]
        if self.name != "gpt2":
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
            if 0 <= i < self.base_vocab_size and i not in (self.eos_id, self.pad_id):
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
        if self.name.startswith("hf:"):  # (the source's own special tokens, bos or unk, are not text)
            text, piece = self._hf.decode(ids, skip_special_tokens=True), self._hf.id_to_token(ids[0]) or ""
        else:
            text, piece = self._sp.decode(ids), self._sp.id_to_piece(ids[0])
        # SentencePiece (and a tokenizer.json converted from one) drops the word-start space of a run's first
        # piece; keep it after a special token.
        if not first and piece.startswith("\u2581"):
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


def t5_model_file(source: str) -> str:
    """T5's spiece.model: `source` itself, in the directory `source`, or of the hub model `source` (downloaded
    with huggingface_hub into its cache; offline, a file already there is used)."""
    return model_file(source, "spiece.model", "T5's tokenizer",
                      "copy it there from the model's hub repository, or save it with T5Tokenizer.save_pretrained")


def hf_tokenizer_file(source: str) -> str:
    """The tokenizer.json of an HF model: `source` itself, in the directory `source`, or of the hub model `source`
    (downloaded with huggingface_hub into its cache, with the tokenizer_config.json beside it)."""
    return model_file(source, "tokenizer.json", "a `tokenizers` fast tokenizer",
                      "save the model's tokenizer there with AutoTokenizer.from_pretrained(...).save_pretrained(DIR)",
                      also=("tokenizer_config.json",))


def model_file(source: str, name: str, what: str, fix: str, also: tuple[str, ...] = ()) -> str:
    """The file `name` of a model: `source` itself, `name` in the directory `source` (or one line with `fix`), or
    downloaded from the hub model `source` with the files `also` beside it. ValueError, one line, on failure."""
    if os.path.isfile(source):
        return source
    if os.path.isdir(source):
        path = os.path.join(source, name)
        if not os.path.isfile(path):
            raise ValueError(f"{source} has no {name} ({what}): {fix}")
        return path
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id=source, filename=name)
        for other in also:
            hf_hub_download(repo_id=source, filename=other)
        return path
    except Exception as e:  # noqa: BLE001 - offline, DNS, 404, auth: one line, the same fix
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(f"could not download {name} of {source!r} from the Hugging Face hub "
                         f"({type(e).__name__}: {first}); offline, use a local directory that holds it") from None


def hf_special_ids(tok, tokenizer_json: str) -> tuple[int, int | None]:
    """(eos id, bos id or None) of a tokenizer.json, as the tokenizer_config.json beside it names them (HF's
    save_pretrained writes both; tokenizer.json itself does not say which of its special tokens ends a text)."""
    path = os.path.join(os.path.dirname(tokenizer_json), "tokenizer_config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing: it names the tokenizer's eos (and bos) token; save the tokenizer with "
                         "AutoTokenizer.from_pretrained(...).save_pretrained(DIR), which writes both files")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    ids = []
    for key in ("eos_token", "bos_token"):
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token  # older files: an AddedToken dict
        ids.append(None if token is None else tok.token_to_id(token))
        if token is not None and ids[-1] is None:
            raise ValueError(f"{path} names {key} {token!r}, which is not in {tokenizer_json}: not the same tokenizer")
    if ids[0] is None:
        raise ValueError(f"{path} names no eos_token: ROT5 ends every text with one; set it there")
    return ids[0], ids[1]


@lru_cache(maxsize=None)
def get_tokenizer(name: str = "mistral") -> Tokenizer:
    return Tokenizer(name)
