"""The cleaning rules, applied in a fixed order to every field of a row, each with its own count.

Rewriting rules (count: rows they changed): Unicode normalisation, invisible and control characters removed,
whitespace collapsed, Traditional -> Simplified Chinese. Dropping rules (count: rows they dropped), in order: empty,
too short, too long, too little CJK. A row is counted by the first rule that drops it.
"""
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from utils.errors import UserError

REWRITING_RULES = ("normalization", "remove_invisible", "collapse_whitespace", "traditional_to_simplified")
DROPPING_RULES = ("empty", "too_short", "too_long", "low_cjk_share")
# Control characters except tab and newlines (whitespace, which the next rule handles), and the invisible format
# characters scraped text carries: soft hyphen, zero-width space/joiners, direction marks, word joiner, BOM.
INVISIBLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e"
                       "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb]")
HORIZONTAL_SPACE = re.compile(r"[^\S\n]+")
SPACE_AROUND_NEWLINE = re.compile(r" ?\n ?")
BLANK_LINES = re.compile(r"\n{3,}")
CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
WHITESPACE = re.compile(r"\s+")


@dataclass
class CleaningCounts:
    changed: Counter = field(default_factory=Counter)
    """Rows each rewriting rule changed."""
    dropped: Counter = field(default_factory=Counter)
    """Rows each dropping rule dropped."""

    def as_dict(self) -> dict:
        return {"changed": {rule: self.changed[rule] for rule in REWRITING_RULES},
                "dropped": {rule: self.dropped[rule] for rule in DROPPING_RULES}}


def collapse_whitespace(text: str) -> str:
    """Runs of spaces/tabs become one space, lines lose their edge spaces, 3+ newlines become a blank line."""
    text = HORIZONTAL_SPACE.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n"))
    return BLANK_LINES.sub("\n\n", SPACE_AROUND_NEWLINE.sub("\n", text)).strip()


def cjk_share(text: str) -> float:
    """CJK ideographs among the characters that are not whitespace."""
    visible = len(WHITESPACE.sub("", text))
    return len(CJK.findall(text)) / visible if visible else 0.0


def traditional_to_simplified():
    """OpenCC's Traditional -> Simplified converter (`t2s`)."""
    try:
        import opencc
    except ImportError:
        raise UserError("--traditional_to_simplified=True needs OpenCC: pip install opencc") from None
    return opencc.OpenCC("t2s").convert


class Cleaner:
    """The rules the flags turn on, applied to rows of text fields."""

    def __init__(self, flags):
        self.flags = flags
        self.counts = CleaningCounts()
        rewrites = []
        if flags.normalization != "none":
            form = flags.normalization
            rewrites.append(("normalization", lambda text: unicodedata.normalize(form, text)))
        if flags.remove_invisible:
            rewrites.append(("remove_invisible", lambda text: INVISIBLE.sub("", text)))
        if flags.collapse_whitespace:
            rewrites.append(("collapse_whitespace", collapse_whitespace))
        if flags.traditional_to_simplified:
            rewrites.append(("traditional_to_simplified", traditional_to_simplified()))
        self.rewrites = rewrites

    def clean(self, values: tuple) -> tuple | None:
        """The cleaned row, or None when a dropping rule drops it (and counts it)."""
        for rule, rewrite in self.rewrites:
            rewritten = tuple(rewrite(value) for value in values)
            if rewritten != values:
                self.counts.changed[rule] += 1
                values = rewritten
        reason = self.drop_reason(values)
        if reason:
            self.counts.dropped[reason] += 1
            return None
        return values

    def drop_reason(self, values: tuple) -> str | None:
        flags = self.flags
        if not all(value.strip() for value in values):
            return "empty"
        length = sum(map(len, values))
        if length < flags.min_chars:
            return "too_short"
        if length > flags.max_chars:
            return "too_long"
        if flags.min_cjk_share > 0 and cjk_share("".join(values)) < flags.min_cjk_share:
            return "low_cjk_share"
        return None
