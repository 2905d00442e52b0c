"""Problems from JSONL files (rl/problems.py) and Hugging Face tokenizer directories (tokenizer.py,
chat_template.py): prompts rendered exactly as transformers renders them, the stop ids a model declares, the
train/eval split, and a one-line error for each kind of bad input."""

import json

import pytest

from r1jax import config, tokenizer
from r1jax.config import ConfigError
from r1jax.data import DataError
from r1jax.rl import problems, rollouts

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
# A template in the style of Qwen2.5's: a default system turn, loop controls, raise_exception, tojson.
TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{%- endif %}\n"
    "{%- for message in messages %}\n"
    "  {%- if message.role == 'system' %}{% continue %}{% endif %}\n"
    "  {%- if message.role not in ['user', 'assistant'] %}{{ raise_exception('unknown role ' + message.role) }}"
    "{% endif %}\n"
    "  {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
    "  {%- if message.meta is defined %}{{ message.meta | tojson }}{% endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{% endif %}")


def save_tokenizer(directory, *, template=TEMPLATE, bos=None, eos="<|im_end|>", generation_eos=None):
  """A small byte-level BPE trained here, saved by transformers as a model's tokenizer directory; with a bos
  token, its post-processor puts BOS before every text (as Llama 3's does)."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["Tom has 3 apples and buys 4 more. How many apples does he have? \\boxed{7}",
                           "system user assistant You are helpful. Reason step by step."] * 20, trainer)
  if bos is not None:
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                              pad_token="<|endoftext|>", chat_template=template)
  fast.save_pretrained(directory)
  if generation_eos is not None:
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
  return directory


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return save_tokenizer(tmp_path_factory.mktemp("tok"), generation_eos=[2, 0])


CONVERSATIONS = [
    [{"role": "user", "content": "Tom has 3 apples."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How many? 两个"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_renders_as_transformers_does(tok_dir, messages):
  ours = tokenizer.load(str(tok_dir))
  theirs = transformers.AutoTokenizer.from_pretrained(tok_dir)
  text = tokenizer.render_chat(ours, messages)
  assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  expected = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
  assert tokenizer.prompt_ids(ours, text) == list(getattr(expected, "input_ids", expected))


def test_tokenizer_directory_specials_and_stop_ids(tok_dir, tmp_path):
  tok = tokenizer.load(str(tok_dir))
  assert tok.bos_id is None and not tok.add_bos  # like Qwen2: no BOS
  assert tok.eos_id == tok.token_id("<|im_end|>") and tok.eos_ids == (tok.eos_id, 0)  # generation_config adds 0
  assert tokenizer.completion_text(tok, [*tok.encode("7"), tok.eos_id]) == "7"
  assert tokenizer.finished(tok, [5, 0]) and not tokenizer.finished(tok, [5, 6])
  for bos in (None, "<s>"):  # a plain prompt gets BOS exactly when transformers' tokenizer(text) adds it
    directory = save_tokenizer(tmp_path / f"bos{bos is not None}", bos=bos)
    tok, theirs = tokenizer.load(str(directory)), transformers.AutoTokenizer.from_pretrained(directory)
    assert tokenizer.prompt_ids(tok, "Tom has") == theirs("Tom has")["input_ids"]
  assert tok.add_bos and tokenizer.prompt_ids(tok, "<s>Tom has") == theirs("Tom has")["input_ids"]  # one BOS
  with pytest.raises(ConfigError, match=r"no chat_template to render messages"):
    tokenizer.render_chat(tokenizer.load(str(save_tokenizer(tmp_path / "plain", template=None))), CONVERSATIONS[0])
  with pytest.raises(ConfigError, match=r"^x.jsonl:3: TemplateError: unknown role tool$"):
    tokenizer.render_chat(tokenizer.load(str(tok_dir)), [{"role": "tool", "content": "1"}], where="x.jsonl:3")


def write_jsonl(path, records):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return str(path)


def problem_cfg(tok_dir, path, *overrides):
  return config.load("configs/tiny.yaml", [f"data.problems={path}", f"data.tokenizer={tok_dir}",
                                           "model.vocab_size=512", "train.seq_len=64", "sampler.max_new_tokens=16",
                                           *overrides])


def test_problems_file_renders_splits_and_verifies(tok_dir, tmp_path):
  records = [{"id": i, "prompt": f"Tom has {i} apples and buys 4 more. How many?", "answer": i + 4}
             for i in range(40)]
  records.append({"messages": CONVERSATIONS[1], "answer": "B", "verifier": "choice", "choices": ["x", "y"]})
  cfg = problem_cfg(tok_dir, write_jsonl(tmp_path / "p.jsonl", records), "data.template=chat", "data.eval_share=0.25")
  split = problems.load(cfg)
  assert len(split["train"]) + len(split["eval"]) == 41 and 4 <= len(split["eval"]) <= 18
  ids = {ex.metadata["id"] for ex in split["eval"]}
  again = problems.load(problem_cfg(tok_dir, write_jsonl(tmp_path / "q.jsonl", records[::-1]), "data.template=chat",
                                    "data.eval_share=0.25"))
  assert {ex.metadata["id"] for ex in again["eval"]} == ids  # the split follows ids, not line order
  theirs = transformers.AutoTokenizer.from_pretrained(tok_dir)
  first = next(ex for ex in split["train"] + split["eval"] if ex.metadata["id"] == 0)
  assert first.prompt == theirs.apply_chat_template([{"role": "user", "content": records[0]["prompt"]}],
                                                    tokenize=False, add_generation_prompt=True)
  assert first.reference == "4" and first.metadata["verifier"] == "math"
  choice = next(ex for ex in split["train"] + split["eval"] if ex.metadata["verifier"] == "choice")
  assert choice.metadata["choices"] == ["x", "y"] and choice.prompt.endswith("<|im_start|>assistant\n")
  examples = rollouts.task_examples(cfg, "train", 5)
  assert len(examples) == 5 and rollouts.task_name(cfg) == "p.jsonl"
  scores = rollouts.score_completions(examples, [f"\\boxed{{{ex.reference}}}" for ex in examples], [3] * 5,
                                      [False] * 5, cfg)
  assert scores["accuracy"].tolist() == [1.0] * 5
  held_out = write_jsonl(tmp_path / "e.jsonl", records[:3])
  split = problems.load(problem_cfg(tok_dir, tmp_path / "p.jsonl", f"data.eval_problems={held_out}"))
  assert len(split["train"]) == 41 and len(split["eval"]) == 3


BAD = [
    ({"prompt": "2+2?"}, r"p.jsonl:2: no 'answer'"),
    (b"\xff\xfe{}", r"p.jsonl:2: not UTF-8 \(byte 0\)"),
    ({"prompt": "2+2?", "answer": 4, "verifier": "maths"}, r"p.jsonl:2: unknown verifier 'maths'"),
    ({"prompt": "2+2?", "answer": True}, r"p.jsonl:2: 'answer' must be a string or a number, got bool"),
    ({"prompt": "2+2?", "messages": [], "answer": 1}, r"p.jsonl:2: needs exactly one of 'prompt' or 'messages'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "answer": 1},
     r"p.jsonl:2: the last message must be the user's"),
    ({"prompt": "x" * 500, "answer": 1},
     r"p.jsonl:2: the prompt is \d+ tokens; with sampler.max_new_tokens=16 at most"),
    ({"id": 1, "prompt": "again", "answer": 1}, r"p.jsonl:2: duplicate id 1 \(first on line 1\)"),
    ("", r"p.jsonl:2: empty line"),
    ("[1, 2]", r"p.jsonl:2: expected a JSON object, got list"),
]


@pytest.mark.parametrize("line,error", BAD)
def test_bad_problem_lines_are_one_line_errors(tok_dir, tmp_path, line, error):
  path = tmp_path / "p.jsonl"
  good = json.dumps({"id": 1, "prompt": "2+2?", "answer": 4}).encode()
  path.write_bytes(good + b"\n" + (line if isinstance(line, bytes) else
                                   (line if isinstance(line, str) else json.dumps(line)).encode()) + b"\n" + good
                   .replace(b'"id": 1', b'"id": 3') + b"\n")
  with pytest.raises(DataError, match=error) as e:
    problems.load(problem_cfg(tok_dir, path))
  assert "\n" not in str(e.value)
  cfg = problem_cfg(tok_dir, path, "data.skip_bad_problems=true")  # asked to skip: left out, counted, reported
  assert len(problems.read(str(path), tokenizer.load(str(tok_dir)), cfg)[0]) == 2


def test_bad_tokenizer_and_problem_settings_are_named(tmp_path, tok_dir):
  from r1jax.rl import pipeline

  with pytest.raises(ConfigError, match=r"^grpo.verifier: unknown verifier 'maths'"):
    pipeline.check_grpo(config.load("configs/tiny.yaml", ["grpo.verifier=maths"]))
  with pytest.raises(ConfigError, match=r"^grpo.language='klingon': known languages en, "):
    pipeline.check_grpo(config.load("configs/tiny.yaml", ["grpo.language=klingon"]))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ConfigError, match=r"no tokenizer.json in this directory"):
    tokenizer.load(str(tmp_path / "empty"))
  with pytest.raises(ConfigError, match=r"^grpo.task=reverse: unknown template 'chat'; known: short, r1zero, raw"):
    rollouts.task_examples(config.load("configs/tiny.yaml", ["data.template=chat"]), "train", 2)
  with pytest.raises(ConfigError, match=r"no such problems file"):
    problems.load(problem_cfg(tok_dir, tmp_path / "missing.jsonl"))
  only_eval = write_jsonl(tmp_path / "one.jsonl", [{"id": "a", "prompt": "q", "answer": 1}])
  with pytest.raises(ConfigError, match=r"no eval problems; set data.eval_problems"):
    problems.examples(problem_cfg(tok_dir, only_eval, "data.eval_share=0"), "eval", 4)
