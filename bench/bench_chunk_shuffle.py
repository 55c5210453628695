"""Documents per optimizer step of span corruption, with chunks visited in the dataset's shuffled order against
consecutive chunks (the order before the chunk shuffle), on book-length documents.

    python bench/bench_chunk_shuffle.py [--book_tokens 20000] [--books 60] [--max_seq_len 192] [--batch_size 32]

Books are built from the shared sample rows (../shared/data/sample_train_3k.parquet): each book is the prompts and
responses of consecutive rows joined until it holds about --book_tokens tokens. One epoch of the real
`PackedTextDataset` is read and every chunk restored from its corrupted input and target (`restore`), so the
figures count what the trainer is fed: the tokens of each step's chunks, attributed to the document they come from
by the [EOS] that ends every document. The consecutive order takes the same chunks in stream order, [k·B, (k+1)·B)
for step k, which is what the dataset yielded before chunks were shuffled within their block.
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SAMPLE = os.path.join(os.path.dirname(REPO), "shared", "data", "sample_train_3k.parquet")


def documents_per_step(dataset, tokenizer, epoch: int = 0) -> dict:
    """Mean distinct documents in a full step, in the dataset's chunk order and in stream order (one rank)."""
    from data_pipeline.span_corruption import restore, sentinels_of
    from data_pipeline.batch import LABEL_PAD

    sentinels = np.array(sentinels_of(tokenizer))
    dataset.set_epoch(epoch)
    visited = []
    for step in dataset:
        for batch in step.micro_batches:
            for inputs, mask, labels in zip(batch.input_ids, batch.attention_mask, batch.labels):
                visited.append(restore(inputs[mask.bool()].numpy(), labels[labels != LABEL_PAD].numpy(), sentinels))
    order = dataset.chunk_order(epoch, 0, dataset.num_samples)
    chunks = [None] * len(visited)
    for chunk, tokens in zip(order, visited):
        chunks[chunk] = np.asarray(tokens)
    # Document of every token: how many documents ended before it in the epoch's stream.
    ends = np.concatenate([tokens == tokenizer.eos_token_id for tokens in chunks])
    document = np.r_[0, np.cumsum(ends)[:-1]]
    bounds = np.r_[0, np.cumsum([len(tokens) for tokens in chunks])]
    size = dataset.spec.batch_size
    full_steps = len(chunks) // size

    def mean_documents(step_chunks) -> float:
        return float(np.mean([len(set(np.concatenate([document[bounds[c]:bounds[c + 1]] for c in step])))
                              for step in step_chunks]))

    return {"shuffled": mean_documents(order[k * size:(k + 1) * size] for k in range(full_steps)),
            "consecutive": mean_documents(range(k * size, (k + 1) * size) for k in range(full_steps)),
            "steps": full_steps, "documents": int(ends.sum()), "chunks": len(chunks)}


def books(prompts, responses, tokenizer, book_tokens: int, count: int) -> list[str]:
    texts = [f"{p}\n{r}" for p, r in zip(prompts, responses) if p and r]
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    result, current, held, i = [], [], 0, 0
    while len(result) < count:
        current.append(texts[i % len(texts)])
        held += lengths[i % len(texts)]
        i += 1
        if held >= book_tokens:
            result.append("\n".join(current))
            current, held = [], 0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--book_tokens", type=int, default=20000)
    parser.add_argument("--books", type=int, default=60)
    parser.add_argument("--max_seq_len", type=int, default=192)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--buffer_size", type=int, default=5000)
    parser.add_argument("--vocab_size", type=int, default=4000)
    args = parser.parse_args()
    if not os.path.isfile(SAMPLE):
        sys.exit(f"{SAMPLE} not found: the books are built from the shared sample rows")

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipeline.packed_text import PackedTextDataset, TextSpec
    from data_pipeline.windows import StreamSpec
    from model.tokenizer import train_tokenizer

    table = pq.read_table(SAMPLE)
    with tempfile.TemporaryDirectory() as tmp:
        # A first tokenizer measures the rows, for books of about --book_tokens tokens.
        tokenizer = train_tokenizer(SAMPLE, os.path.join(tmp, "tokenizer"), vocab_size=args.vocab_size)
        texts = pa.table({"text": books(table["prompt"].to_pylist(), table["response"].to_pylist(), tokenizer,
                                        args.book_tokens, args.books)})
        path = os.path.join(tmp, "books.parquet")
        pq.write_table(texts, path, row_group_size=10)
        tokenizer = train_tokenizer(path, os.path.join(tmp, "text_tokenizer"), vocab_size=args.vocab_size,
                                    text_column="text")
        spec = StreamSpec(path, max_seq_len=args.max_seq_len, batch_size=args.batch_size,
                          buffer_size=args.buffer_size, seed=1)
        dataset = PackedTextDataset(spec, tokenizer, TextSpec(counts_dir=os.path.join(tmp, "counts")))
        figures = documents_per_step(dataset, tokenizer)
    print(f"{args.books} books of ~{args.book_tokens:,} tokens, {figures['chunks']:,} chunks, "
          f"{figures['steps']} steps of {args.batch_size} chunks (max_seq_len {args.max_seq_len})")
    print(f"documents per step: consecutive chunks {figures['consecutive']:.2f}, chunks shuffled within their "
          f"block {figures['shuffled']:.2f} ({figures['shuffled'] / figures['consecutive']:.1f}x)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
