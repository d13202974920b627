"""Fixtures shared by the test files."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import plot  # noqa: E402
import prepare  # noqa: E402
from model import ROT5  # noqa: E402

TEST_VAL_STORIES = 64  # validation stories of the sample that train.py runs in tests evaluate on


@pytest.fixture(scope="module")
def short_val_sample(tmp_path_factory) -> str:
    """While the module runs, `prepare.py sample` (prepare.SAMPLE_DIR) reads the real stories.txt and
    instruct.txt but only the first TEST_VAL_STORIES of the 966 genuine validation stories: every train.py run
    ends by evaluating the whole validation split (UL2 and continuation losses), which on all 966 takes about a
    minute per run on one core. Returns the directory standing in for data/sample/."""
    d = tmp_path_factory.mktemp("sample_source")
    for name in ("stories.txt", "instruct.txt"):
        os.symlink(os.path.join(prepare.SAMPLE_DIR, name), d / name)
    sep = prepare.EOT.decode()
    with open(os.path.join(prepare.SAMPLE_DIR, "valid.txt"), encoding="utf-8") as f:
        stories = [r.strip() for r in f.read().split(sep) if r.strip()]
    (d / "valid.txt").write_text("".join(f"{r}\n{sep}\n" for r in stories[:TEST_VAL_STORIES]), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare, "SAMPLE_DIR", str(d))
        yield str(d)


DRAW_CURVES = plot.Tracker.draw


@pytest.fixture(scope="session", autouse=True)
def curves_only_where_tested():
    """train.py and finetune.py redraw curves.png at every evaluation: ~0.3-0.6 s of matplotlib each, which a
    real run spends once per thousands of steps but the suite's many tiny runs would spend every few steps
    (~1 min in all). Drawing is off for the session; the tests of the curves turn it on (real_curves)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plot.Tracker, "draw", lambda self: None)
        yield


@pytest.fixture
def real_curves(monkeypatch):
    monkeypatch.setattr(plot.Tracker, "draw", DRAW_CURVES)


class NaNLosses:
    """Which training forward passes (1-based, counted from the last reset) return a NaN loss."""

    def __init__(self):
        self.calls, self.at = 0, set()

    def reset(self, at) -> None:
        self.calls, self.at = 0, set(at)


@pytest.fixture
def nan_losses(monkeypatch) -> NaNLosses:
    """Poison ROT5's loss on chosen training forwards (eval and generation forwards are not counted), as a
    bf16 overflow or a corrupt batch would: `nan_losses.reset({3})` makes the 3rd one NaN."""
    state, forward = NaNLosses(), ROT5.forward

    def nan_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            state.calls += 1
            if state.calls in state.at:
                return out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(ROT5, "forward", nan_forward)
    return state


# -- Hugging Face T5 stand-ins (offline): T5's tokenizer layout and save_pretrained directories ------------

STORIES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample", "stories.txt")
T5_STANDIN_PIECES = 800  # T5's spiece.model has 32,000; a small vocabulary trains in a second


@pytest.fixture(scope="session")
def t5_spiece(tmp_path_factory) -> str:
    """A stand-in for T5's spiece.model: SentencePiece (unigram, as T5's) trained on the bundled real stories
    with T5's special ids, pad 0, eos 1, unk 2, no bos. Path of the model file."""
    import sentencepiece as spm

    with open(STORIES, encoding="utf-8") as f:
        stories = [s.strip() for s in f.read().split("<|endoftext|>") if s.strip()]
    prefix = str(tmp_path_factory.mktemp("spiece") / "spiece")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(stories), model_prefix=prefix, vocab_size=T5_STANDIN_PIECES,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   input_sentence_size=len(stories), num_threads=1, minloglevel=2)
    return prefix + ".model"


def save_hf_t5(path, spiece: str, ffn: str = "relu", seed: int = 0, **config) -> str:
    """A tiny random HF T5 (v1.0: relu, tied; v1.1: gated-gelu, untied lm_head) for the stand-in vocabulary,
    saved with save_pretrained into `path` beside its spiece.model. Returns the directory."""
    import shutil

    import torch
    import transformers

    from tokenizer import Tokenizer

    vocab = Tokenizer("t5:" + spiece).vocab_size  # 800 pieces + 100 sentinels, rounded up to 128: 1024
    torch.manual_seed(seed)
    cfg = transformers.T5Config(**{**dict(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2,
                                          num_decoder_layers=2, feed_forward_proj=ffn,
                                          tie_word_embeddings=ffn == "relu", dropout_rate=0.0, decoder_start_token_id=0),
                                   **config})
    hf = transformers.T5ForConditionalGeneration(cfg)
    if ffn == "gated-gelu":  # transformers 5 ties lm_head even for v1.1 configs; real v1.1 checkpoints don't
        hf.lm_head.weight = torch.nn.Parameter(torch.randn(vocab, cfg.d_model) * cfg.d_model ** -0.5)
    hf.save_pretrained(str(path))
    shutil.copy(spiece, os.path.join(str(path), "spiece.model"))
    return str(path)


@pytest.fixture(scope="session")
def hf_t5_dirs(t5_spiece, tmp_path_factory) -> dict[str, str]:
    """{"relu": v1.0 directory, "gated-gelu": v1.1 directory}, each a save_pretrained T5 with its spiece.model."""
    return {ffn: save_hf_t5(tmp_path_factory.mktemp(f"hf_t5_{ffn}"), t5_spiece, ffn) for ffn in ("relu", "gated-gelu")}


# -- Hugging Face tokenizer.json and Llama / Mistral stand-ins (offline) -------------------------------------

HF_STANDIN_VOCAB = 1000   # a real model's tokenizer.json has 32,000-49,152; a small one trains in a second


@pytest.fixture(scope="session")
def hf_tokenizer_dirs(tmp_path_factory) -> dict[str, str]:
    """Stand-ins for a Hugging Face model's tokenizer.json, trained with the `tokenizers` library on the first 1,500
    bundled real stories and saved by transformers' save_pretrained (tokenizer.json + tokenizer_config.json):
    "metaspace" as Llama / Mistral's (SentencePiece BPE, <unk> <s> </s>), "byte-level" as SmolLM2's (one
    <|endoftext|> that is both bos and eos). {kind: directory}."""
    import transformers
    from tokenizers.implementations import ByteLevelBPETokenizer, SentencePieceBPETokenizer

    with open(STORIES, encoding="utf-8") as f:
        stories = [s.strip() for s in f.read().split("<|endoftext|>") if s.strip()][:1500]
    dirs = {}
    for kind, trainer, specials, bos, eos in (
            ("metaspace", SentencePieceBPETokenizer(), ["<unk>", "<s>", "</s>"], "<s>", "</s>"),
            ("byte-level", ByteLevelBPETokenizer(), ["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>")):
        trainer.train_from_iterator(stories, vocab_size=HF_STANDIN_VOCAB, special_tokens=specials, show_progress=False)
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=trainer._tokenizer, bos_token=bos, eos_token=eos)
        dirs[kind] = str(tmp_path_factory.mktemp(f"tokenizer_{kind}"))
        fast.save_pretrained(dirs[kind])
    return dirs


def save_hf_llama(path, tokenizer_dir: str, kind: str = "llama", seed: int = 0, **config) -> str:
    """A tiny random HF LlamaForCausalLM (or MistralForCausalLM) for a stand-in tokenizer, saved with save_pretrained
    into `path` beside its tokenizer.json. Returns the directory."""
    import shutil

    import torch
    import transformers

    from tokenizer import Tokenizer

    tok = Tokenizer("hf:" + tokenizer_dir)
    torch.manual_seed(seed)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}[kind]
    cfg = cls(**{**dict(vocab_size=tok.base_vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, tie_word_embeddings=kind == "llama"),
                 **config})
    model = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM}[kind](cfg)
    model.save_pretrained(str(path))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(str(path), name))
    return str(path)
