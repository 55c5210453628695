"""Near-duplicate detection, step 3: candidate pairs verified on their signatures, then clustered.

A candidate pair is an edge when its estimated Jaccard (the share of equal MinHash values) reaches
--dedup_threshold: LSH only proposes pairs, this removes the proposals below the threshold. The connected
components of the edges are the duplicate clusters (union-find's result, computed by scipy's
`connected_components`); each keeps its first row in input order and drops the others.
"""
from dataclasses import dataclass

import numpy as np

from preparation.candidates import PAIR_PARTITIONS, pair_file
from preparation.minhash import estimated_jaccard
from preparation.signature_phase import read_signatures

VERIFY_BATCH_PAIRS = 50_000  # two signatures of 512 bytes each: ~50 MB a batch


@dataclass
class Clusters:
    drop: np.ndarray
    """Per signed row: a near duplicate of an earlier row."""
    representative: np.ndarray
    """Per signed row: the first row of its cluster (itself when alone)."""
    clusters: int
    """Clusters of two rows or more."""
    candidate_pairs: int
    verified_pairs: int


def verified_edges(pair_dir: str, signature_dir: str, num_perm: int, threshold: float, progress
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """The distinct candidate pairs whose estimated Jaccard reaches `threshold`, and how many distinct candidates
    there were."""
    firsts, seconds, candidates = [], [], 0
    for partition in range(PAIR_PARTITIONS):
        packed = np.unique(np.fromfile(pair_file(pair_dir, partition), dtype=np.uint64))
        candidates += len(packed)
        for start in range(0, len(packed), VERIFY_BATCH_PAIRS):
            chunk = packed[start:start + VERIFY_BATCH_PAIRS]
            first = (chunk >> np.uint64(32)).astype(np.int64)
            second = (chunk & np.uint64(0xFFFFFFFF)).astype(np.int64)
            both = read_signatures(signature_dir, num_perm, np.concatenate([first, second]))
            similar = estimated_jaccard(both[:len(chunk)], both[len(chunk):]) >= threshold
            firsts.append(first[similar])
            seconds.append(second[similar])
        progress.update(1)
    return np.concatenate(firsts or [[]]).astype(np.int64), np.concatenate(seconds or [[]]).astype(np.int64), \
        candidates


def cluster(first: np.ndarray, second: np.ndarray, rows: int, candidates: int) -> Clusters:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(first), dtype=np.int8), (first, second)), shape=(rows, rows)).tocsr()
    count, labels = connected_components(graph, directed=False)
    first_of_label = np.full(count, rows, dtype=np.int64)
    np.minimum.at(first_of_label, labels, np.arange(rows))
    representative = first_of_label[labels]
    sizes = np.bincount(labels, minlength=count)
    return Clusters(drop=representative != np.arange(rows), representative=representative,
                    clusters=int(np.count_nonzero(sizes >= 2)), candidate_pairs=candidates,
                    verified_pairs=len(first))
