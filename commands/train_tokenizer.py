"""`train_tokenizer`: the byte-level BPE of `model.tokenizer`, trained on a sample of a file's text columns."""
import os

from commands.options import TokenizerFlags
from config import resolve_path, split_paths
from utils.errors import UserError


def train_tokenizer_command(flags: TokenizerFlags) -> None:
    from data_pipeline.span_corruption import sentinels_of
    from model.tokenizer import train_tokenizer

    from data_pipeline.parquet import expand_paths

    files = expand_paths([resolve_path(path) for path in split_paths(flags.train_file)])  # a prepared dir: its train
    tokenizer_dir = resolve_path(flags.tokenizer_dir)
    if os.path.isdir(tokenizer_dir) and os.listdir(tokenizer_dir) and not flags.overwrite:
        # The new tokenizer replaces the whole directory: a tokenizer a model was trained with would be lost.
        held = "a tokenizer" if os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")) else "files"
        raise UserError(f"--tokenizer_dir={flags.tokenizer_dir} holds {held} already: give a new directory, or "
                        "--overwrite=True to replace it (models trained with the old tokenizer do not work with "
                        "the new one)")
    tokenizer = train_tokenizer(files, tokenizer_dir, vocab_size=flags.vocab_size, max_rows=flags.max_rows or None,
                                text_column=flags.text_column or None)
    sentinels = f", {len(sentinels_of(tokenizer))} of them sentinels" if flags.text_column else ""
    print(f"tokenizer with {len(tokenizer)} tokens{sentinels} saved to {tokenizer_dir}")
    if len(tokenizer) < flags.vocab_size:
        print(f"note: {len(tokenizer)} tokens, fewer than --vocab_size={flags.vocab_size}: the text sampled has no "
              "more pairs to merge (more rows, --max_rows=0, give more; the model's embedding follows the tokenizer)")
