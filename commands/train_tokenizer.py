"""`train_tokenizer`: the byte-level BPE of `model.tokenizer`, trained on a sample of a file's text columns."""
from config import TokenizerFlags, resolve_path, split_paths


def train_tokenizer_command(flags: TokenizerFlags) -> None:
    from data_pipeline.span_corruption import sentinels_of
    from model.tokenizer import train_tokenizer

    files = [resolve_path(path) for path in split_paths(flags.train_file)]
    tokenizer_dir = resolve_path(flags.tokenizer_dir)
    tokenizer = train_tokenizer(files, tokenizer_dir, vocab_size=flags.vocab_size, max_rows=flags.max_rows or None,
                                text_column=flags.text_column or None)
    sentinels = f", {len(sentinels_of(tokenizer))} of them sentinels" if flags.text_column else ""
    print(f"tokenizer with {len(tokenizer)} tokens{sentinels} saved to {tokenizer_dir}")
