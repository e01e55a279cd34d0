"""The sentencepiece wrapper, on a tiny model trained here from the text the repo ships."""
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from fastllama import Tokenizer

CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("spm") / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(CORPUS), model_prefix=str(prefix), vocab_size=300, model_type="bpe",
        character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
    )
    return prefix.with_suffix(".model")


def test_encode_decode_round_trip(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    text = "The keeper counted the flashes of the lighthouse."
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id == 1 and tok.eos_id not in ids
    assert tok.decode(ids) == text
    assert tok.encode(text, bos=False, eos=True)[-1] == tok.eos_id
    assert tok.vocab_size == 300 and tok.pad_id == -1
    assert tok.decode(ids + [-1, -1]) == text  # its own "no pad" id -1 is dropped, as pad is
    assert tok.decode(torch.tensor(ids[1])) == tok.decode(ids[1:2])  # a 0-d tensor


def test_directory_path_and_errors(tokenizer_path, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    assert Tokenizer(tmp_path).encode("sea", bos=False)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    with pytest.raises(TypeError, match="str"):
        Tokenizer(tmp_path).encode(123)


def test_ids_outside_the_vocabulary_are_dropped(tokenizer_path):
    # a checkpoint's vocabulary padded past its tokenizer's: sampling such an id crashed the CLI
    tok = Tokenizer(tokenizer_path)
    ids = tok.encode("The sea", bos=False)
    assert tok.decode(ids + [300, 511]) == tok.decode(ids) == "The sea"
    with pytest.raises(ValueError, match="one sequence"):
        tok.decode(torch.tensor([ids]))
