"""Which fields of a raw row become the trainer's columns: `prompt` and `response` (seq2seq) or `text` (span
corruption), by flag or by the common names corpora use, including ChatML-style conversations.

A file's mapping is decided once, from its first row (or its parquet schema); a later row that lacks a mapped field
is a bad row of that file, not an error of the run.
"""
from dataclasses import dataclass

from utils.errors import UserError

OUTPUT_COLUMNS = {"seq2seq": ("prompt", "response"), "span_corruption": ("text",)}
# Tried in order when the flag is empty. Alpaca's `instruction` + `input` make one prompt.
ALIASES = {
    "prompt": ("prompt", "instruction", "question", "query", "input", "source", "src", "human"),
    "response": ("response", "output", "answer", "target", "completion", "tgt", "assistant", "chosen"),
    "text": ("text", "content", "document", "passage", "body"),
}
CONVERSATION_FIELDS = ("messages", "conversations", "conversation")
USER_ROLES = {"user", "human", "system", "prompter"}
ASSISTANT_ROLES = {"assistant", "gpt", "bot", "model", "chatgpt"}
FLAG_OF = {"prompt": "--prompt_column", "response": "--response_column", "text": "--text_column"}


@dataclass(frozen=True)
class Mapping:
    """How one file's rows become output values."""

    objective: str
    fields: tuple
    """The source field of each output column, in OUTPUT_COLUMNS order; None with a conversation field."""
    conversation: str | None = None
    alpaca_input: bool = False
    """The prompt is Alpaca's `instruction` followed by its `input`."""

    def needed(self) -> list[str]:
        names = [self.conversation] if self.conversation else [name for name in self.fields if name]
        return names + (["input"] if self.alpaca_input else [])

    def extract(self, fields: dict):
        """The row's output values, or a str saying why it has none."""
        if self.conversation:
            return conversation_pair(fields.get(self.conversation), self.conversation, self.objective)
        values = []
        for name in self.fields:
            value = fields.get(name)
            if value is None:
                return f"no field {name!r}" if name not in fields else f"field {name!r} is null"
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str):
                return f"field {name!r} is a {type(value).__name__}, not text"
            values.append(value)
        if self.alpaca_input and isinstance(fields.get("input"), str) and fields["input"].strip():
            values[0] = f"{values[0]}\n{fields['input']}"
        return tuple(values)


def conversation_pair(turns, name: str, objective: str):
    """A conversation (list of {role, content} or ShareGPT's {from, value}) as (prompt, response): the response
    is the last assistant turn, the prompt every turn before it. For span corruption, the whole conversation."""
    if not isinstance(turns, list) or not turns:
        return f"field {name!r} is not a list of turns"
    texts = []
    for turn in turns:
        if not isinstance(turn, dict):
            return f"field {name!r} holds a turn that is not an object"
        role = str(turn.get("role", turn.get("from", ""))).lower()
        content = turn.get("content", turn.get("value"))
        if not isinstance(content, str):
            return f"field {name!r} holds a turn without text content"
        texts.append((role, content))
    if objective == "span_corruption":
        return ("\n".join(content for _, content in texts),)
    last = max((i for i, (role, _) in enumerate(texts) if role in ASSISTANT_ROLES), default=None)
    if last is None or last == 0:
        return f"field {name!r} has no assistant turn after a user turn"
    return "\n".join(content for _, content in texts[:last]), texts[last][1]


def resolve(names, objective: str, flags, path: str) -> Mapping:
    """The mapping of a file whose rows have the fields `names`; a UserError naming the file and the flag when a
    column cannot be found."""
    names = list(names)
    wanted = {"prompt": flags.prompt_column, "response": flags.response_column, "text": flags.text_column}
    columns = OUTPUT_COLUMNS[objective]
    if not any(wanted[column] for column in columns):
        conversation = next((name for name in CONVERSATION_FIELDS if name in names), None)
        if conversation and not any(alias in names for alias in ALIASES[columns[-1]]):
            return Mapping(objective, (None,) * len(columns), conversation=conversation)
    chosen = []
    for column in columns:
        if wanted[column]:
            if wanted[column] not in names:
                raise UserError(f"{path}: no column {wanted[column]!r} ({FLAG_OF[column]}={wanted[column]}); "
                                f"its columns are {', '.join(map(str, names)) or '(none)'}: pass "
                                f"{FLAG_OF[column]}=ONE_OF_THEM")
            chosen.append(wanted[column])
            continue
        found = next((alias for alias in ALIASES[column] if alias in names and alias not in chosen), None)
        if found is None:
            hint = (" (plain text and single-column files hold documents: use --objective=span_corruption)"
                    if objective == "seq2seq" and column == "prompt" else "")
            raise UserError(f"{path}: no {column} column (tried {', '.join(ALIASES[column])}); its columns are "
                            f"{', '.join(map(str, names)) or '(none)'}: pass {FLAG_OF[column]}=NAME{hint}")
        chosen.append(found)
    alpaca = objective == "seq2seq" and chosen[0] == "instruction" and "input" in names and "input" not in chosen
    return Mapping(objective, tuple(chosen), alpaca_input=alpaca)
