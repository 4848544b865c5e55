"""What makes a chat or preference record trainable, beyond its types: checked by
``dist-llama-prepare --format chat|preference`` for every record (exit 2 naming file and line, or
with ``--skip-bad`` the record left out and listed in ``skipped.jsonl``).

- The turns of a conversation: an optional system message first, then user and assistant strictly
  alternating from a user turn (both templates: Llama 2's ``[INST]`` blocks need it, and a Llama 3
  chat in another order, an assistant first or two users in a row, is not what the model is served).
- A preference pair's responses: neither empty (after the strip the template applies) and not the
  same, which would make a pair with no preference in it (DPO's loss is then a constant, its
  gradient only noise from the reference).
"""

from __future__ import annotations

__all__ = ["check_turns", "check_record"]


def check_turns(messages: list) -> None:
    """ValueError unless: system (optional) first, then user, assistant, user, ... (roles already checked)."""
    turns = [m["role"] for m in messages]
    if "system" in turns[1:]:
        raise ValueError(f"message {turns.index('system', 1)}: a system message may only come first")
    body = turns[1:] if turns[0] == "system" else turns
    for k, role in enumerate(body):
        if role != ("user" if k % 2 == 0 else "assistant"):
            where = k + (len(turns) - len(body))
            raise ValueError(f"message {where} is {role!r}: turns must alternate user, assistant, ... from a user "
                             f"turn (after an optional system message); got {turns}")


def check_record(obj: dict, fmt: str) -> None:
    """The record-level checks of one JSON record (ValueError naming the problem)."""
    if fmt == "chat":
        if "messages" in obj and not isinstance(obj["messages"], list):
            raise ValueError(f"'messages' must be a list of {{role, content}} messages, got "
                             f"{type(obj['messages']).__name__}")
        return
    # preference records: data/preference.py checks the responses
