"""User data layouts: the one reader of the SFT and preference files people bring.

TRL's dataset formats, each *standard* (text) or *conversational* (chat messages):

SFT (``train sft --data FILE``, ``validate --schema sft``):

- ``prompt`` + ``completion``: text, or message lists (the completion is the answer turn);
- ``messages``: a conversation; the loss covers the assistant turns only;
- ``text``: plain text; the loss covers all of it.

Preferences (``import-pairs``, ``train dpo|rm --data FILE``, ``validate --schema preferences``):

- ``prompt`` + ``chosen`` + ``rejected``: text, or message lists (chosen and rejected hold
  the answer turns, or whole conversations that repeat the prompt's turns);
- ``prompt`` as text + ``chosen``/``rejected`` as whole conversations that repeat it
  (Anthropic HH, UltraFeedback-binarized): the turns they share are the prompt;
- ``chosen`` + ``rejected`` only (TRL's implicit prompt): conversations, or texts, that
  share their beginning; the shared part is the prompt (texts are cut at a space).

Every reader takes ``names`` (see :func:`column_names`): the file's column for each role
(``prompt``, ``chosen``, ``rejected``, ``completion``, ``messages``), so that
``--prompt-column question`` reads a ``question`` column as the prompt, alike in every
importer, ``train sft`` and ``validate``; errors name the file's own column.

A cell is text or a non-empty list of ``{"role", "content"}`` messages with text
content; anything else (null, numbers, objects) is refused naming the file, row and
column. Chat messages are rendered with the tokenizer's chat template; an answer's
span is found by rendering the conversation up to it (with the generation prompt) and
with it: a template that does not render conversations as growing prefixes is refused.
"""

from __future__ import annotations

import os

from .config import opt
from .errors import InputError, located

SFT_LAYOUTS = "prompt + completion, messages, or text"
ROLES = ("prompt", "chosen", "rejected", "completion", "messages")
_ROLE_HELP = {"prompt": "the prompt (text or chat messages)", "chosen": "the preferred answer",
              "rejected": "the dispreferred answer", "completion": "the SFT answer",
              "messages": "a conversation (a list of {role, content})"}


def column_opt(role: str):
    """The ``--ROLE-column`` option of a config (the same help in every command)."""
    return opt(role, f"the file's column holding {_ROLE_HELP[role]}")


def column_names(cfg=None) -> dict[str, str]:
    """Role -> the file's column name, from a config's ``ROLE_column`` options (a role it
    has no option for keeps its own name)."""
    return {r: getattr(cfg, f"{r}_column", r) or r for r in ROLES}


# --------------------------------------------------------------------------- cells

def cell(value, file, row, column):
    """A text or a message list, else a one-line refusal naming file, row and column."""
    if value is None:
        raise InputError(located("missing value (null)", file, row, column))
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return messages(value, file, row, column)
    raise InputError(located("expected text or a list of {role, content} messages, got "
                             f"{type(value).__name__}", file, row, column))


def messages(value, file, row, column) -> list[dict]:
    """A conversation: a non-empty list of {role, content} with text values."""
    if not isinstance(value, list) or not value:
        raise InputError(located("expected a non-empty list of {role, content} messages",
                                 file, row, column))
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not {"role", "content"} <= set(m):
            raise InputError(located(f"messages[{i}]: expected a {{role, content}} object",
                                     file, row, column))
        bad = next((k for k in ("role", "content") if not isinstance(m[k], str)), None)
        if bad:
            raise InputError(located(f"messages[{i}].{bad} must be text, got "
                                     f"{type(m[bad]).__name__} {m[bad]!r}", file, row, column))
        extra = sorted(k for k, v in m.items() if k not in ("role", "content") and v is not None)
        if extra:
            raise InputError(located(f"message {i}: key '{extra[0]}' is not supported "
                                     "(messages carry role and content)", file, row, column))
        out.append({"role": m["role"], "content": m["content"]})
    return out


def number(value, file, row, column) -> float | None:
    """An optional number (score, margin)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(located(f"expected a number, got {type(value).__name__} {value!r}", file, row,
                                 column))
    return float(value)


# --------------------------------------------------------------------------- chat rendering

def render(tokenizer, msgs: list[dict], generation_prompt: bool = False, where: tuple = ()) -> str:
    """Chat messages as text through the tokenizer's template (a refused or failing
    template is one line naming ``where``: file, row, column)."""
    from .models import apply_chat_template
    return apply_chat_template(tokenizer, msgs, where, add_generation_prompt=generation_prompt)


def _need_template(tokenizer, file, row, column) -> None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise InputError(located("chat messages need a tokenizer with a chat template"
                                 + (" (--tokenizer MODEL_DIR)" if tokenizer is None else ""),
                                 file, row, column))


def chat_pieces(tokenizer, msgs: list[dict], trained: list[bool], file, row, column):
    """The rendered conversation as (text, trained) pieces: each trained message's span
    (from after the generation prompt to the end of its turn) and the text between.
    Text after the last trained message is left out."""
    _need_template(tokenizer, file, row, column)
    at_cell = (file, row, column)
    full, pieces, at = render(tokenizer, msgs, where=at_cell), [], 0
    for i, keep in enumerate(trained):
        if not keep:
            continue
        head = render(tokenizer, msgs[:i], True, at_cell) if i else ""
        upto = render(tokenizer, msgs[:i + 1], where=at_cell)
        if not (upto.startswith(head) and full.startswith(upto) and len(head) >= at):
            raise InputError(located(f"the chat template does not render message {i} as a "
                                     "continuation of the turns before it, so its tokens "
                                     "cannot be found", file, row, column))
        pieces += [(full[at:len(head)], False), (full[len(head):len(upto)], True)]
        at = len(upto)
    return pieces


def prompt_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Prompt texts to ids with the tokenizer's special tokens (BOS), never doubling a
    BOS that a text (e.g. a rendered chat template) already starts with."""
    bos = tokenizer.bos_token_id
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    return [x[1:] if bos is not None and len(x) > 1 and x[0] == x[1] == bos else x for x in ids]


def encode_prompt(tokenizer, text: str) -> list[int]:
    """One prompt text to ids (see :func:`prompt_ids`)."""
    return prompt_ids(tokenizer, [text])[0]


def end_of_turn(tokenizer, turn_ids: list[int]) -> list[int]:
    """What ends a trained assistant turn: nothing when the template's rendering of the
    turn holds a special token (its end-of-turn, e.g. ``<|im_end|>``, ``<|eot_id|>``);
    else EOS, so that a model fine-tuned on conversations learns to stop."""
    if tokenizer.eos_token_id is None or set(turn_ids) & set(tokenizer.all_special_ids):
        return []
    return [tokenizer.eos_token_id]


def encode_pieces(tokenizer, pieces: list[tuple[str, bool]], file, row, column):
    """(prompt ids, response ids, response loss mask) of rendered pieces: the prompt is
    everything before the first trained piece. Each trained piece (an assistant turn as
    the template renders it) ends with :func:`end_of_turn`, trained too."""
    first = next(i for i, (_, keep) in enumerate(pieces) if keep)
    prompt = encode_prompt(tokenizer, "".join(t for t, _ in pieces[:first]))
    if not prompt:
        raise InputError(located("nothing before the first trained turn: the model needs at "
                                 "least one prompt token", file, row, column))
    ids, mask = [], []
    for text, keep in pieces[first:]:
        part = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if keep:
            part = part + end_of_turn(tokenizer, part)
        ids += part
        mask += [int(keep)] * len(part)
    return prompt, ids, mask


# --------------------------------------------------------------------------- SFT

def sft_layout(columns, file, names: dict | None = None) -> str:
    """Which SFT layout a file's columns hold: prompt_completion, messages or text."""
    n = names or column_names()
    if n["prompt"] in columns and n["completion"] in columns:
        return "prompt_completion"
    if n["messages"] in columns:
        return "messages"
    if "text" in columns:
        return "text"
    raise InputError(located(f"no SFT columns: expected {n['prompt']} + {n['completion']}, "
                             f"{n['messages']}, or text (choose with --prompt-column, "
                             "--completion-column, --messages-column); "
                             f"found {', '.join(columns) or 'none'}", file))


def sft_examples(rows: list[dict], columns, file, names: dict | None = None) -> list[dict]:
    """Every row checked and reduced to its layout's fields (no tokenizer needed)."""
    names = names or column_names()
    layout = sft_layout(columns, file, names)
    prompt_column, completion_column = names["prompt"], names["completion"]
    out = []
    for i, r in enumerate(rows):
        if layout == "prompt_completion":
            p = cell(r.get(prompt_column), file, i, prompt_column)
            c = cell(r.get(completion_column), file, i, completion_column)
            if isinstance(p, str) != isinstance(c, str):
                raise InputError(located("prompt and completion must both be text or both be "
                                         "chat messages", file, i, completion_column))
            if isinstance(c, str) and not c:
                raise InputError(located("empty completion", file, i, completion_column))
            out.append({"prompt": p, "completion": c})
        elif layout == "messages":
            m = messages(r.get(names["messages"]), file, i, names["messages"])
            if not any(x["role"] == "assistant" for x in m):
                raise InputError(located("no assistant turn to train on", file, i, names["messages"]))
            out.append({"messages": m})
        else:
            t = cell(r.get("text"), file, i, "text")
            if not isinstance(t, str) or not t:
                raise InputError(located("expected non-empty text", file, i, "text"))
            out.append({"text": t})
    return out


def sft_tokens(tokenizer, example: dict, file, row) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, response ids, response loss mask) of one checked SFT example."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "text" in example:
        ids = encode_prompt(tokenizer, example["text"]) + eos
        return ids[:1], ids[1:], [1] * (len(ids) - 1)
    if "messages" in example:
        m = example["messages"]
        return encode_pieces(tokenizer, chat_pieces(
            tokenizer, m, [x["role"] == "assistant" for x in m], file, row, "messages"),
            file, row, "messages")
    p, c = example["prompt"], example["completion"]
    if isinstance(p, str):
        prompt = encode_prompt(tokenizer, p)
        if not prompt:
            raise InputError(located("prompt encodes to no tokens", file, row, "prompt"))
        response = tokenizer(c, add_special_tokens=False)["input_ids"] + eos
        return prompt, response, [1] * len(response)
    pieces = chat_pieces(tokenizer, p + c, [False] * len(p) + [True] * len(c), file, row, "completion")
    # the completion's messages are one answer: the text between them is trained too
    first = next(i for i, (_, keep) in enumerate(pieces) if keep)
    merged = pieces[:first] + [("".join(t for t, _ in pieces[first:]), True)]
    return encode_pieces(tokenizer, merged, file, row, "completion")


# --------------------------------------------------------------------------- preferences

def _shared_turns(chosen: list[dict], rejected: list[dict], file, row, column="chosen"):
    """Split two conversations at their first differing message, which must be an answer."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise InputError(located("chosen and rejected share no first turns to take as the "
                                 "prompt (add a prompt column)", file, row, column))
    if chosen[n]["role"] != "assistant" or rejected[n]["role"] != "assistant":
        raise InputError(located(f"chosen and rejected differ at message {n}, which is not an "
                                 "assistant turn: not two answers to one prompt", file, row, column))
    return chosen[:n], chosen[n:], rejected[n:]


def _shared_text(chosen: str, rejected: str, file, row, column="chosen"):
    """TRL's implicit prompt for texts: the shared beginning, cut before its last space."""
    n = len(os.path.commonprefix([chosen, rejected]))
    cut = max((i for i, ch in enumerate(chosen[:n]) if ch.isspace()), default=-1)
    prompt = chosen[:cut] if cut > 0 else ""
    if not prompt.strip():
        raise InputError(located("no prompt column, and chosen and rejected share no beginning "
                                 "(up to a space) to take as the prompt", file, row, column))
    return prompt, chosen[cut:], rejected[cut:]


def preference(r: dict, has_prompt: bool, file, row, names: dict | None = None) -> tuple:
    """(prompt, chosen, rejected) of one row, chosen and rejected holding only the answer
    part; each a text or a message list (no tokenizer needed)."""
    n = names or column_names()
    c = cell(r.get(n["chosen"]), file, row, n["chosen"])
    j = cell(r.get(n["rejected"]), file, row, n["rejected"])
    if isinstance(c, str) != isinstance(j, str):
        raise InputError(located("chosen and rejected must both be text or both be chat "
                                 "messages", file, row, n["rejected"]))
    if not has_prompt:
        split = _shared_text if isinstance(c, str) else _shared_turns
        return split(c, j, file, row, n["chosen"])
    p = cell(r.get(n["prompt"]), file, row, n["prompt"])
    if isinstance(c, str):
        return p, c, j
    if isinstance(p, list):
        if c[:len(p)] == p and j[:len(p)] == p and len(c) > len(p) and len(j) > len(p):
            return p, c[len(p):], j[len(p):]   # whole conversations that repeat the prompt
        return p, c, j
    shared, c, j = _shared_turns(c, j, file, row, n["chosen"])  # text prompt, whole conversations
    if not any(m["role"] == "user" and m["content"].strip() == p.strip() for m in shared):
        raise InputError(located("prompt is text but chosen/rejected are conversations whose "
                                 "shared turns do not contain it as a user message", file, row, n["prompt"]))
    return shared, c, j


def preference_texts(tokenizer, prompt, chosen, rejected, file, row) -> tuple[str, str, str]:
    """Prompt, chosen and rejected as the text the policy reads: chat messages through the
    tokenizer's chat template (the answer turns as a continuation of the prompt)."""
    if isinstance(prompt, str):
        prompt_text = prompt
    else:
        _need_template(tokenizer, file, row, "prompt")
        prompt_text = render(tokenizer, prompt, generation_prompt=True,
                             where=(file, row, "prompt"))
    out = [prompt_text]
    for side, answer in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(answer, str):
            out.append(answer)
            continue
        pieces = chat_pieces(tokenizer, prompt + answer, [False] * len(prompt) + [True] * len(answer),
                             file, row, side)   # its first piece is prompt_text
        out.append("".join(t for t, _ in pieces)[len(prompt_text):])
    if not out[0].strip():
        raise InputError(located("empty prompt", file, row, "prompt"))
    return out[0], out[1], out[2]
