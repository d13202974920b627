"""The shared tokenizer: id layout of the special tokens, exact round-trips on real stories, sentinel prompts."""
import pickle
from pathlib import Path

import pytest

from tokenizer import get_tokenizer

STORIES = Path(__file__).resolve().parent.parent / "data" / "sample" / "stories.txt"


def real_stories(n: int) -> list[str]:
    records = STORIES.read_text(encoding="utf-8").split("\n<|endoftext|>\n")
    return [r.strip() for r in records[:n]]


def test_special_token_layout():
    tok = get_tokenizer("mistral")
    assert tok.base_vocab_size == 32000 and tok.eos_id == 2
    assert tok.pad_id == 32000
    assert tok.mode_ids == {"R": 32001, "X": 32002, "S": 32003}
    assert tok.sentinel_ids[0] == 32004 and tok.sentinel_ids[-1] == tok.vocab_size - 1
    assert tok.vocab_size == 32256 and tok.vocab_size % 128 == 0
    # X-denoising (mean span 3, rate 0.5) of a 766-token window makes round(383 / 3) = 128 spans
    assert len(tok.sentinel_ids) >= 128


def test_round_trip_on_real_stories():
    tok = get_tokenizer()
    texts = real_stories(200)
    ids = tok.encode(texts)
    assert [tok.decode(i) for i in ids] == texts
    assert tok.encode(texts[0]) == ids[0]
    assert all(0 <= i < tok.base_vocab_size for doc in ids for i in doc)


def test_sentinel_prompt_encodes_gaps_as_whole_tokens():
    tok = get_tokenizer()
    story = real_stories(1)[0]  # "One day, a little girl named Lily found a needle in her room. ..."
    prompt = story.replace("found a needle", "<extra_id_0>", 1)
    ids = tok.encode(prompt, allow_sentinels=True)
    k = ids.index(tok.sentinel_ids[0])
    # the words around the gap are tokenized exactly as in the full story
    full = tok.encode(story)
    assert ids[:k] == full[:k]
    assert ids[k + 1:] == full[-(len(ids) - k - 1):]
    assert tok.decode(ids).startswith("One day, a little girl named Lily<extra_id_0> in her room.")


def test_bad_ids_and_sentinels_are_clear_errors():
    tok = get_tokenizer()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(ValueError, match="252 sentinels"):
        tok.encode("a <extra_id_999> b", allow_sentinels=True)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("t5")


def test_decode_drops_pad_and_eos_and_pickles():
    tok = get_tokenizer()
    ids = tok.encode("Lily was happy.") + [tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(ids) == "Lily was happy."
    assert tok.decode([tok.mode_ids["S"]] + tok.encode("Hi")) == "[S] Hi"
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("Lily was happy.") == ids[:-3]
