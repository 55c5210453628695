"""`prepare`: raw corpora (parquet, jsonl, json, csv/tsv, plain text; gz/zst) -> clean, deduplicated, shuffled
train/valid parquet files, in bounded memory whatever the number of rows.

The phases, each resumable on its own (`manifest`): read and clean (`formats`, `columns`, `cleaning`, spilled to
one parquet file by `clean_phase`), exact deduplication (`exact`), MinHash signatures and LSH band keys spilled to
disk (`signatures`), the band keys sorted partition by partition into candidate pairs (`candidates`), the pairs
verified by their estimated Jaccard and clustered (`clusters`), the seeded shuffle and split written in row groups
of 5,000 (`split`), and the report (`report`). `pipeline` runs them in order.
"""
