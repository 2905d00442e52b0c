"""A Hugging Face chat template rendered the way transformers renders it (`apply_chat_template(...,
tokenize=False)`): jinja2's immutable sandbox with trim_blocks and lstrip_blocks, the loop-control extension,
`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text, the `{% generation %}` block, and the
tokenizer's special tokens as variables. Where a template reads today's date (`strftime_now`) its text, and so
the prompt, depends on the day it runs."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from r1jax.config import ConfigError


def find(model_dir: Path, tokenizer_config: dict) -> str | None:
  """The template a tokenizer directory holds: `chat_template.jinja`, `chat_template.json`, or the
  tokenizer config's `chat_template` (a string, or named templates of which "default" is used)."""
  if (model_dir / "chat_template.jinja").is_file():
    return (model_dir / "chat_template.jinja").read_text()
  if (model_dir / "chat_template.json").is_file():
    return json.loads((model_dir / "chat_template.json").read_text()).get("chat_template")
  template = tokenizer_config.get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  return template if isinstance(template, str) else None


def _environment():
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's tokens for masks; here it only renders."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env


def render(template: str, messages: list[dict], special_tokens: dict[str, str | None], *,
           add_generation_prompt: bool = True, where: str = "chat template") -> str:
  """The conversation as text; a template error is a one-line ConfigError naming `where`."""
  import jinja2

  try:
    compiled = _environment().from_string(template)
    return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                           documents=None, **special_tokens)
  except jinja2.TemplateError as e:
    raise ConfigError(f"{where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}") from None
