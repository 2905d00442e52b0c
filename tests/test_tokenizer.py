"""Byte tokenizer round trips and specials; a `tokenizers` JSON file behind the same interface."""

import hypothesis
import hypothesis.strategies as st
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from r1jax import tokenizer
from r1jax.config import ConfigError

BYTES = tokenizer.ByteTokenizer()


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.text())
def test_bytes_round_trip(text):
  assert BYTES.decode(BYTES.encode(text)) == text


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.lists(st.integers(-2**40, 2**40) | st.integers(0, 300)))
def test_decode_never_raises(ids):
  assert isinstance(BYTES.decode(ids), str)


def test_specials_are_single_ids():
  assert BYTES.vocab_size == 256 + len(tokenizer.SPECIALS)
  ids = {s: BYTES.token_id(s) for s in tokenizer.SPECIALS}
  assert sorted(ids.values()) == list(range(256, BYTES.vocab_size))
  assert (BYTES.pad_id, BYTES.bos_id, BYTES.eos_id) == (256, 257, 258)
  text = "<|user|>2+2?<|assistant|><think>4</think><answer>4</answer><|eos|>"
  assert BYTES.encode(text) == [ids["<|user|>"], *b"2+2?", ids["<|assistant|>"], ids["<think>"], ord("4"),
                                ids["</think>"], ids["<answer>"], ord("4"), ids["</answer>"], BYTES.eos_id]
  assert BYTES.encode("<think") == list(b"<think")  # a partial marker is plain text
  with pytest.raises(KeyError, match="not a special token"):
    BYTES.token_id("<nope>")


def test_load_and_check_vocab():
  tok = tokenizer.load("bytes")
  assert isinstance(tok, tokenizer.ByteTokenizer)
  tokenizer.check_vocab(tok, tok.vocab_size)
  with pytest.raises(ConfigError, match=r"^model.vocab_size=256: tokenizer bytes has 266 ids"):
    tokenizer.check_vocab(tok, 256)
  with pytest.raises(ConfigError, match="no such file"):
    tokenizer.load("/nonexistent/tokenizer.json")


def test_chat_prompt():
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "4"}]
  assert tokenizer.chat_prompt(messages) == ("<|system|>Be brief.<|user|>2+2?<|assistant|>", "4")
  with pytest.raises(ValueError, match="last message must be the assistant's"):
    tokenizer.chat_prompt(messages[:2])
  with pytest.raises(ValueError, match=r"messages\[0\].role='robot'"):
    tokenizer.chat_prompt([{"role": "robot", "content": ""}])


def _train_bpe(path, specials):
  """A byte-level BPE trained in memory: every string round-trips through it."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["hello world", "the cat sat on the mat", "12345=54321"] * 10, trainer)
  tok.save(str(path))
  return str(path)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  path = _train_bpe(tmp_path_factory.mktemp("tok") / "tokenizer.json", ["<s>", "</s>", "<pad>", "<|user|>"])
  return tokenizer.load(path)


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(st.text())
def test_hf_round_trip(hf, text):
  assert hf.decode(hf.encode(text)) == text


def test_hf_specials_and_decode(hf):
  assert isinstance(hf, tokenizer.HFTokenizer)
  assert (hf.bos_id, hf.eos_id, hf.pad_id) == (0, 1, 2)
  assert hf.encode("<|user|>hello") == [hf.token_id("<|user|>"), *hf.encode("hello")]
  assert hf.decode([*hf.encode("hi"), 10**9, -1]) == "hi\ufffd\ufffd"
  tokenizer.check_vocab(hf, 512)


def test_hf_missing_special_names_the_file(tmp_path):
  path = _train_bpe(tmp_path / "nobos.json", ["</s>"])
  with pytest.raises(ConfigError, match=r"nobos.json: no bos token; looked for \["):
    tokenizer.load(path)
  assert tokenizer.HFTokenizer(path, bos="</s>").pad_id == tokenizer.HFTokenizer(path, bos="</s>").eos_id
  with pytest.raises(ConfigError, match="nobos.json: no eos token; looked for"):
    tokenizer.HFTokenizer(path, bos="</s>", eos="<eos>")
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ConfigError, match="bad.json: cannot load"):
    tokenizer.load(str(bad))
