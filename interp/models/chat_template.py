"""Chat templates: Jinja rendered as transformers renders it, in jinja2's sandbox.

    text = chat_template.render(template, [{"role": "user", "content": "Hi"}],
                                add_generation_prompt=True, bos_token="<s>")

Same environment settings (`trim_blocks`, `lstrip_blocks`, loop controls) and helpers
(`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII) as
`transformers.utils.chat_template_utils`, so a checkpoint's template gives the same text.
"""

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any


def render(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    **variables,
) -> str:
    """Renders a conversation.

    Args:
        template: The Jinja chat template.
        messages: [{'role': ..., 'content': ...}, ...]; keys whose value is None are dropped
            (as transformers does: templates test for a missing key, not for None).
        add_generation_prompt: End with the header of an assistant turn.
        **variables: More template variables (`bos_token`, `eos_token`, `tools`, ...).

    Returns:
        The rendered text.
    """
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    return _compile(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **variables
    )


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    """The compiled template, in the sandbox and with the helpers transformers gives it."""
    try:
        import jinja2  # noqa: PLC0415 (only chat templates need it)
        import jinja2.ext  # noqa: PLC0415
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415
    except ImportError as e:
        raise ImportError("Chat templates need jinja2: pip install 'jinja2>=3.1'.") from e

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which a prompt must keep as they are.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(format):
        return datetime.datetime.now().strftime(format)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    return environment.from_string(template)
