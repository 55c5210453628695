"""The chat template: how a conversation becomes the one prompt the model reads (chat, serve, and the prompts of
a multi-turn SFT file, which must be built by the same function to teach the model this format).

    [system text + "\\n"]                       every system message, in order, one line each
    "用户：" + user turn + "\\n"                 each earlier turn ...
    "助手：" + assistant turn + "\\n"            ... and its answer
    the new user message                       as it is: a first turn is the bare message

A conversation of one message is therefore exactly the prompt a single-turn model was trained on (`generate
--prompt` gives the same answer). When the prompt is longer than max_seq_len tokens, whole turns are left out,
the oldest first; the system lines and the new message always stay (PromptTooLong when even they do not fit).
"""
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
SPEAKER = {"user": "用户：", "assistant": "助手："}


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class FittedPrompt:
    text: str
    ids: list[int]
    dropped_messages: int  # earlier messages left out to fit


class PromptTooLong(ValueError):
    """Even the system lines and the last message alone are longer than the limit."""

    def __init__(self, tokens: int, limit: int):
        self.tokens, self.limit = tokens, limit
        super().__init__(f"the last message (with the system lines) is {tokens} tokens; the model reads at most "
                         f"{limit}")


def render(messages: list[Message]) -> str:
    """The prompt for answering the last message (a user message) after the others, by the template above."""
    system = "".join(m.content + "\n" for m in messages if m.role == "system")
    turns = [m for m in messages if m.role != "system"]
    history = "".join(SPEAKER[m.role] + m.content + "\n" for m in turns[:-1])
    return system + history + (turns[-1].content if turns else "")


def sft_rows(messages: list[Message]) -> list[tuple[str, str]]:
    """The (prompt, response) rows a multi-turn conversation gives an SFT file: one per assistant answer, its
    prompt everything before it by `render`."""
    return [(render(messages[:index]), message.content) for index, message in enumerate(messages)
            if message.role == "assistant" and index > 0]


def turn_starts(turns: list[Message]) -> list[int]:
    """Where each earlier turn (a user message and the answers after it) begins among the non-system messages."""
    return [index for index, m in enumerate(turns[:-1]) if index == 0 or m.role == "user"]


def fit_prompt(messages: list[Message], tokenizer, max_seq_len: int) -> FittedPrompt:
    """The rendered prompt of at most `max_seq_len` tokens ([EOS] included) that keeps the most recent turns."""
    system = [m for m in messages if m.role == "system"]
    turns = [m for m in messages if m.role != "system"]
    for start in turn_starts(turns) + [len(turns) - 1]:
        text = render(system + turns[start:])
        ids = tokenizer(text)["input_ids"]
        if len(ids) <= max_seq_len:
            return FittedPrompt(text, ids, start)
    raise PromptTooLong(len(ids), max_seq_len)
