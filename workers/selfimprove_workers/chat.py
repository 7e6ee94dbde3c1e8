"""Multi-turn prompts (judge, self-rating, teacher) rendered for a given tokenizer.

With a chat template (and `task.chatTemplate` on) the messages go through it, as the model was
tuned to read them. A base model without one gets a plain transcript that ends where the
assistant's reply begins; system text, when the template has no system role, is folded into
the first user turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Message = dict[str, str]


def uses_template(tokenizer: Any, enabled: bool = True) -> bool:
    return bool(enabled and tokenizer is not None and getattr(tokenizer, "chat_template", None))


def render_messages(tokenizer: Any, messages: Sequence[Message], *, use_template: bool = True,
                    reply_prefix: str = "") -> str:
    """The prompt text for `messages`; generation continues with the assistant's reply.

    `reply_prefix` starts the reply (e.g. "Score:"), so a base model continues the pattern.
    """
    if uses_template(tokenizer, use_template):
        try:
            text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 — templates that reject a system role raise all sorts
            text = tokenizer.apply_chat_template(_fold_system(messages), tokenize=False,
                                                 add_generation_prompt=True)
        return text + reply_prefix
    parts: list[str] = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"].strip())
        elif m["role"] == "user":
            parts.append("User: " + m["content"].strip())
        else:
            parts.append("Assistant: " + m["content"].strip())
    parts.append("Assistant:" + (" " + reply_prefix if reply_prefix else ""))
    return "\n\n".join(parts)


def _fold_system(messages: Sequence[Message]) -> list[Message]:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if system and rest and rest[0]["role"] == "user":
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    return rest
