"""MinHash signatures of character n-grams, and the LSH banding that turns a Jaccard threshold into band keys.

Chinese has no spaces to split words on, so a document's features are its overlapping character n-grams
(shingles). They are hashed here with numpy, a whole batch of documents at once, and rensa (Rust) turns the flat
hash buffer into a matrix of MinHash signatures without one Python object per document — the fastest of the
libraries compared in docs/PREPARE.md.
"""
from dataclasses import dataclass

import numpy as np

from utils.errors import UserError

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)


def mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit reaches every output bit (FNV alone leaves the high bits weak)."""
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def shingle_hashes(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The 64-bit hashes of every character n-gram of every text, flat, and each text's offsets into them (a text
    shorter than n is one shingle: itself). Shingles never cross from one text into the next."""
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    codes = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
    starts = np.cumsum(lengths) - lengths
    remaining = np.repeat(starts + lengths, lengths) - np.arange(len(codes))  # characters left in its text
    padded = np.concatenate([codes, np.zeros(n, dtype=np.uint64)])
    hashes = np.full(len(codes), FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            hashes = np.where(k < remaining, (hashes ^ padded[k:k + len(codes)]) * FNV_PRIME, hashes)
        hashes = mix64(hashes)
    windows = np.maximum(lengths - n + 1, np.minimum(lengths, 1))
    position_in_text = np.arange(len(codes)) - np.repeat(starts, lengths)
    chosen = hashes[position_in_text < np.repeat(windows, lengths)]
    return chosen, np.concatenate([[0], np.cumsum(windows)]).astype(np.uint64)


def signatures(texts: list[str], n: int, num_perm: int, seed: int) -> np.ndarray:
    """(len(texts), num_perm) uint32 MinHash signatures (rensa's RMinHash over the shingle hashes)."""
    try:
        from rensa import RMinHash
    except ImportError:
        raise UserError("--dedup=near needs rensa (Rust MinHash): pip install rensa, or pass --dedup=exact") \
            from None
    hashes, offsets = shingle_hashes(texts, n)
    matrix = RMinHash.digest_matrix_from_flat_token_hashes(hashes, offsets, num_perm, seed)
    return np.array(matrix.to_rows(), dtype=np.uint32).reshape(len(texts), num_perm)


@dataclass(frozen=True)
class Banding:
    """`bands` bands of `rows` signature values: two documents of Jaccard s share at least one band key with
    probability 1 - (1 - s^rows)^bands."""

    bands: int
    rows: int

    def candidate_probability(self, similarity: float) -> float:
        return 1.0 - (1.0 - similarity ** self.rows) ** self.bands

    def keys(self, signature_block: np.ndarray) -> np.ndarray:
        """(len(block), bands) uint64 band keys: a hash of each band's values, salted by the band's number."""
        keys = np.empty((len(signature_block), self.bands), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for band in range(self.bands):
                key = np.full(len(signature_block), FNV_OFFSET ^ np.uint64(band), dtype=np.uint64)
                for column in signature_block[:, band * self.rows:(band + 1) * self.rows].T:
                    key = (key ^ column.astype(np.uint64)) * FNV_PRIME
                keys[:, band] = mix64(key)
        return keys


# Every candidate pair is verified on its signatures, so a false candidate costs a comparison while a missed pair
# is a duplicate left in the data: misses weigh 9 times more than false candidates.
MISS_WEIGHT = 0.9


def optimal_banding(threshold: float, num_perm: int) -> Banding:
    """The bands x rows (bands * rows <= num_perm) minimising the weighted probability mass of missing a pair above
    the threshold and of proposing one below it (at 0.8 and 128 permutations: 14 x 9, which proposes a pair of
    Jaccard 0.8 with probability 0.87, 0.85 with 0.975, 0.9 with 0.999)."""
    grid = np.linspace(0.0, 1.0, 2001)
    below, above = grid[grid <= threshold], grid[grid >= threshold]
    best, best_error = None, np.inf
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            false_positive = np.trapezoid(1 - (1 - below ** rows) ** bands, below)
            false_negative = np.trapezoid((1 - above ** rows) ** bands, above)
            error = (1 - MISS_WEIGHT) * false_positive + MISS_WEIGHT * false_negative
            if error < best_error:
                best, best_error = Banding(bands, rows), error
    return best


def estimated_jaccard(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Row-wise share of equal signature values: MinHash's unbiased estimate of the Jaccard similarity."""
    return (first == second).mean(axis=1)
