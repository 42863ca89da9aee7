"""GPT pretraining samples over an ``IndexedDataset``, with Megatron-LM's exact index semantics.

For a split holding documents ``documents`` (sequence ids of the indexed dataset), and
``num_samples`` requested samples of ``seq_length`` tokens:

1. ``num_epochs``: the fewest passes over the split whose tokens yield ``num_samples`` samples
   (each sample reads ``seq_length + 1`` tokens, consecutive samples overlapping by one).
2. ``doc_idx`` [num_epochs * len(documents)]: the documents repeated per epoch and shuffled
   with ``numpy.random.RandomState(seed)``; when the last epoch contributes under 80 % of an
   epoch's samples it is shuffled separately so its few samples do not crowd one region.
3. ``sample_idx`` [num_samples_total + 1, 2] from ``build_sample_idx`` (see sample_index.py).
4. ``shuffle_idx`` [num_samples_total]: a permutation of the samples (the separate last
   epoch's samples are permuted among themselves and placed after the others).

These match Megatron-LM's GPTDataset bit for bit, so a run reads the same tokens in the same
order as Megatron on the same ``.bin/.idx`` files, seed, split and sample counts.
"""

from __future__ import annotations

import numpy as np
import torch

from moecore.data.indexed_dataset import DataFileError, IndexedDataset
from moecore.data.sample_index import build_sample_idx


def gpt_sample_from_text(text: np.ndarray, eod_token: int, eod_mask_loss: bool) -> dict:
    """Training item from ``seq_length + 1`` consecutive tokens.

    Returns ``tokens`` int64 [S] (text[:-1]), ``labels`` int64 [S] (text[1:]), ``loss_mask``
    float32 [S] and ``position_ids`` int64 [S]. With ``eod_mask_loss`` the loss is masked
    where the *input* token is EOD (Megatron's rule): predicting the first token of the next,
    unrelated document from an EOD is not learnable, while predicting EOD itself is kept.
    """
    text = torch.from_numpy(np.array(text, dtype=np.int64))  # copy: the source is a read-only mmap
    tokens, labels = text[:-1].contiguous(), text[1:].contiguous()
    loss_mask = torch.ones(tokens.shape[0], dtype=torch.float32)
    if eod_mask_loss:
        loss_mask[tokens == eod_token] = 0.0
    position_ids = torch.arange(tokens.shape[0], dtype=torch.int64)
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": position_ids,
    }


def num_epochs_for(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs whose tokens give ``num_samples`` samples (Megatron's ``_num_epochs``)."""
    if tokens_per_epoch < 1:
        raise ValueError("the split's documents hold no tokens; cannot build samples from them")
    tokens_needed = num_samples * seq_length + 1
    return max(1, -(-tokens_needed // tokens_per_epoch))


def build_doc_idx(
    documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_last_epoch: bool
) -> np.ndarray:
    """Documents repeated ``num_epochs`` times and shuffled: int32 [num_epochs * len(documents)]."""
    if not separate_last_epoch or num_epochs == 1:
        doc_idx = np.mgrid[0:num_epochs, 0 : len(documents)][1]
        doc_idx[:] = documents
        doc_idx = doc_idx.reshape(-1).astype(np.int32)
        rng.shuffle(doc_idx)
        return doc_idx
    first = build_doc_idx(documents, num_epochs - 1, rng, False)
    last = build_doc_idx(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_shuffle_idx(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """Permutation [total_size]: the first ``num_samples`` and the rest shuffled separately."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(0, num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_gpt_indices(
    sizes: np.ndarray, documents: np.ndarray, num_samples: int, seq_length: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc_idx, sample_idx, shuffle_idx) exactly as Megatron's GPTDataset builds them.

    Args:
        sizes: int32 [num_sequences], tokens of every sequence of the indexed dataset.
        documents: int [n], the sequence ids of this split.
        num_samples: samples requested (the result may hold more: whole epochs are built).
        seq_length: tokens per sample input.
        seed: seed of the ``numpy.random.RandomState`` that shuffles documents and samples.
    """
    tokens_per_epoch = int(np.sum(sizes[documents], dtype=np.int64))
    num_epochs = num_epochs_for(tokens_per_epoch, seq_length, num_samples)
    separate_last_epoch = False
    if num_epochs > 1:
        samples_per_epoch = (tokens_per_epoch - 1) // seq_length
        samples_before_last = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        samples_from_last = num_samples - samples_before_last
        # Megatron's rule: a last epoch used for under 80 % of its samples is shuffled apart.
        separate_last_epoch = samples_from_last < int(0.80 * samples_per_epoch)
    rng = np.random.RandomState(seed=seed)
    doc_idx = build_doc_idx(documents, num_epochs, rng, separate_last_epoch)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch)
    total = sample_idx.shape[0] - 1
    first = samples_before_last if separate_last_epoch else total
    shuffle_idx = build_shuffle_idx(first, total, rng)
    return doc_idx, sample_idx, shuffle_idx


class GPTDataset(torch.utils.data.Dataset):
    """Samples of ``seq_length`` tokens (+1 label) from the documents of one split.

    Item ``i`` is a dict ``{"tokens", "labels": int64 [S], "loss_mask": float32 [S],
    "position_ids": int64 [S]}``. ``len()`` covers every sample of the built epochs (>=
    ``num_samples``); an empty ``documents`` or ``num_samples == 0`` gives an empty dataset.

    With ``vocab_size`` every sample's ids are checked as it is read and an id outside
    ``[0, vocab_size)`` raises ``DataFileError`` naming the ``.bin`` and the document: the model
    never sees it. Cost, measured on a 1 GiB uint16 ``.bin`` at S = 4096: one max over the
    sample, ~6 us of an item's ~230 us (~3 %); a one-time full scan would take 0.4 s per GiB
    from page cache (minutes per start for a TB corpus read from disk), hence per sample.
    """

    def __init__(
        self,
        indexed_dataset: IndexedDataset,
        documents: np.ndarray,
        num_samples: int,
        seq_length: int,
        seed: int,
        eod_token: int,
        eod_mask_loss: bool = False,
        name: str = "",
        vocab_size: int | None = None,
    ) -> None:
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        documents = np.asarray(documents, dtype=np.int64)
        n = len(indexed_dataset)
        if documents.size and (documents.min() < 0 or documents.max() >= n):
            raise ValueError(
                f"documents hold ids in [{documents.min()}, {documents.max()}] but the indexed "
                f"dataset has {n} sequences"
            )
        self.indexed_dataset = indexed_dataset
        self.documents = documents
        self.num_samples = int(num_samples)
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.eod_token = int(eod_token)
        self.eod_mask_loss = bool(eod_mask_loss)
        self.name = name
        self.vocab_size = vocab_size
        if documents.size == 0 or num_samples == 0:
            self.doc_idx = np.zeros(0, dtype=np.int32)
            self.sample_idx = np.zeros((1, 2), dtype=np.int64)
            self.shuffle_idx = np.zeros(0, dtype=np.uint32)
        else:
            self.doc_idx, self.sample_idx, self.shuffle_idx = build_gpt_indices(
                indexed_dataset.sequence_lengths, documents, num_samples, seq_length, seed
            )

    def __len__(self) -> int:
        return self.sample_idx.shape[0] - 1

    def _parts(self, idx: int) -> list[tuple[int, np.ndarray]]:
        """(sequence id, tokens) pieces of (shuffled) sample ``idx``, in order."""
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples")
        idx = int(self.shuffle_idx[idx])
        doc_beg, offset_beg = (int(v) for v in self.sample_idx[idx])
        doc_end, offset_end = (int(v) for v in self.sample_idx[idx + 1])
        ds, seqs = self.indexed_dataset, [int(s) for s in self.doc_idx[doc_beg : doc_end + 1]]
        if doc_beg == doc_end:
            return [(seqs[0], ds.get(seqs[0], offset_beg, offset_end - offset_beg + 1))]
        parts = [(seqs[0], ds.get(seqs[0], offset_beg))]
        parts += [(s, ds.get(s)) for s in seqs[1:-1]]
        parts.append((seqs[-1], ds.get(seqs[-1], 0, offset_end + 1)))
        return parts

    def get_text(self, idx: int) -> np.ndarray:
        """The ``seq_length + 1`` raw tokens of (shuffled) sample ``idx``."""
        parts = self._parts(idx)
        text = np.asarray(parts[0][1]) if len(parts) == 1 else np.concatenate(
            [p for _, p in parts])
        if self.vocab_size is not None and text.size and (text.max() >= self.vocab_size or (
                text.dtype.kind != "u" and text.min() < 0)):
            raise DataFileError(self._bad_id_message(idx, parts))
        return text

    def _bad_id_message(self, idx: int, parts: list[tuple[int, np.ndarray]]) -> str:
        ds, v = self.indexed_dataset, self.vocab_size
        seq, tokens = next((s, t) for s, t in parts if t.max() >= v or t.min() < 0)
        pos = int(np.flatnonzero((tokens >= v) | (tokens < 0))[0])
        return (f"{ds.bin_path}: document {ds.document_of(seq)} (sequence {seq}, read for "
                f"sample {idx}) holds token id {int(tokens[pos])}, outside the tokenizer's "
                f"vocabulary [0, {v}); the data was tokenized with another tokenizer: rebuild "
                "it with tools/preprocess_data.py and the training tokenizer")

    def __getitem__(self, idx: int) -> dict:
        return gpt_sample_from_text(self.get_text(idx), self.eod_token, self.eod_mask_loss)
