"""Chat messages -> prompt text, with the model's own chat template (Hugging Face's `chat_template`)."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from llmserve.errors import InvalidRequestError

# Roles every chat template knows; a template may still refuse an order of them (it says why).
CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")


def check_messages(messages: object) -> list[dict[str, str]]:
    """A list of {"role": str, "content": str} messages, or InvalidRequestError naming what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(f"messages[{index}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise InvalidRequestError(f"messages[{index}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise InvalidRequestError(f"messages[{index}].content must be a string, got "
                                      f"{type(content).__name__}")
        checked.append({"role": role, "content": content})
    return checked


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]],
                add_generation_prompt: bool = True) -> str:
    """The prompt for `messages`, as the model was trained to see a conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model has no chat template (tokenizer_config.json 'chat_template' or "
                                  "chat_template.jinja): send a plain prompt (text_input, /v1/completions)")
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja's TemplateError, and raise_exception() calls in templates
        raise InvalidRequestError(f"the model's chat template refused these messages: {exc}") from None
