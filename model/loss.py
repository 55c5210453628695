"""The training and evaluation loss: summed token cross-entropy and its token count, the quantities that add up
across micro-batches, ranks and evaluation batches (the mean is taken once, over all of them)."""
import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.batch import LABEL_PAD


def token_loss_sum(model, input_ids, attention_mask, labels, bare_model=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy and the number of target tokens.

    `attention_mask` None: no input is padded. `bare_model` is the unwrapped model when `model` is a DDP wrapper
    (which lacks the label-shifting helper).
    """
    decoder_input_ids = (bare_model or model).prepare_decoder_input_ids_from_labels(labels=labels)
    # No key/value cache: it serves generation; in a training forward every decoder layer would concatenate one.
    logits = model(input_ids=input_ids, attention_mask=key_mask(attention_mask), decoder_input_ids=decoder_input_ids,
                   use_cache=False).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=LABEL_PAD, reduction="sum")
    return loss, (labels != LABEL_PAD).sum()


def key_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The padding mask as the (batch, 1, 1, keys) boolean mask attention applies, which transformers takes as it
    is. Given the 2-D mask it would first ask the device whether any token is padded (`mask.all()`), in the encoder
    and again in the cross-attention of every forward: a wait for the device each time, on every micro-batch."""
    return None if attention_mask is None else attention_mask[:, None, None, :].bool()


def padded(sequences: list[list[int]], pad: int) -> torch.Tensor:
    """Token id lists as one right-padded int64 matrix."""
    width = max(len(s) for s in sequences)
    out = np.full((len(sequences), width), pad, dtype=np.int64)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = sequence
    return torch.from_numpy(out)
