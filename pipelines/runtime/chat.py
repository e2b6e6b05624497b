"""A checkpoint's chat template (Jinja) turned into the text of a conversation, as transformers renders it.

    text = render_chat(template, [{"role": "user", "content": "Hi"}], bos_token="<s>", eos_token="</s>")

The template comes from tokenizer_config.json (``chat_template``) or chat_template.jinja
(:mod:`llmtrt.pipelines.runtime.tokenizer_files`). It is rendered in Jinja's sandbox with the
helpers transformers gives templates (``raise_exception``, ``strftime_now``, ``tojson``), trimmed
blocks and the loop-control extension, and ``add_generation_prompt`` set so the text ends where the
assistant's reply begins. The text already holds the special tokens the template writes (BOS among
them), so it is encoded without adding any.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from llmtrt.exporter.errors import LlmtrtUserError


def render_chat(template: str, messages: Sequence[dict[str, Any]], *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True, where: str = "chat_template") -> str:
    """The conversation ``messages`` ([{"role", "content"}]) written out by ``template``."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise LlmtrtUserError("--chat needs the jinja2 package to render the chat template; pip install jinja2") from None

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=list(messages), bos_token=bos_token, eos_token=eos_token,
                                                add_generation_prompt=add_generation_prompt)
    except jinja2.exceptions.TemplateError as exc:
        raise LlmtrtUserError(f"{where}: the chat template failed to render ({exc})") from None
