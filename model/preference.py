"""Preference tuning's loss (DPO, IPO) on an encoder-decoder: each answer's summed log-probability, with the prompt
encoded once for both answers of a pair, and the loss, rewards and accuracy of the pairs.

The terms follow the DPO paper (Rafailov et al. 2023): with policy log-probabilities pi_c, pi_r of the chosen and
rejected answer (sums over the answer's tokens) and the starting model's ref_c, ref_r, the rewards are
beta (pi_c - ref_c) and beta (pi_r - ref_r), their difference is the margin, and the loss of a pair is
-log sigmoid(margin), or with label smoothing e: -(1 - e) log sigmoid(margin) - e log sigmoid(-margin). IPO (Azar et
al. 2023) squares instead: (margin / beta - 1 / (2 beta))^2. An optional cross-entropy on the chosen answer, per
token (as RPO adds it), keeps the model writing the chosen answers.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput

from data_pipeline.batch import LABEL_PAD
from model.loss import key_mask

# The figures of a pair that are logged and evaluated, summed over pairs like the loss, in this order.
PREFERENCE_STATS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logp",
                    "rejected_logp")


def answer_logps(model, input_ids, attention_mask, labels, bare_model=None) -> torch.Tensor:
    """The summed token log-probability of each answer: `labels` holds 2B answers (the B chosen ones, then the B
    rejected ones, -100 where padded) to the B prompts of `input_ids`. The encoder runs once per prompt; the decoder
    reads its output twice. `attention_mask` None: no prompt is padded. `bare_model`: the unwrapped model when
    `model` is a DDP wrapper (the encoder is called on it; DDP's hooks reduce its gradients all the same)."""
    bare = bare_model or model
    encoded = bare.get_encoder()(input_ids=input_ids, attention_mask=key_mask(attention_mask)).last_hidden_state
    both = BaseModelOutput(last_hidden_state=torch.cat([encoded, encoded]))
    mask = None if attention_mask is None else key_mask(torch.cat([attention_mask, attention_mask]))
    decoder_input_ids = bare.prepare_decoder_input_ids_from_labels(labels=labels)
    logits = model(encoder_outputs=both, attention_mask=mask, decoder_input_ids=decoder_input_ids,
                   use_cache=False).logits
    token_losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=LABEL_PAD,
                                   reduction="none")
    return -token_losses.view(labels.shape).sum(dim=1)


@dataclass(frozen=True)
class PreferenceLoss:
    beta: float = 0.1
    kind: str = "sigmoid"  # or "ipo"
    label_smoothing: float = 0.0
    sft_weight: float = 0.0

    @classmethod
    def of(cls, cfg) -> "PreferenceLoss":
        return cls(cfg.dpo_beta, cfg.dpo_loss, cfg.dpo_label_smoothing, cfg.dpo_sft_weight)

    def per_pair(self, policy: torch.Tensor, reference: torch.Tensor, chosen_tokens: torch.Tensor):
        """Each pair's loss (B,) and its PREFERENCE_STATS (B, 6), from (B, 2) log-probabilities of (chosen,
        rejected) under the policy and the reference model."""
        chosen_ratio, rejected_ratio = (policy - reference).unbind(dim=1)
        margin = self.beta * (chosen_ratio - rejected_ratio)
        if self.kind == "ipo":
            loss = (margin / self.beta - 1 / (2 * self.beta)) ** 2
        else:
            loss = -(1 - self.label_smoothing) * F.logsigmoid(margin) - self.label_smoothing * F.logsigmoid(-margin)
        if self.sft_weight:
            loss = loss - self.sft_weight * policy[:, 0] / chosen_tokens.clamp(min=1)
        chosen_reward, rejected_reward = (self.beta * chosen_ratio).detach(), (self.beta * rejected_ratio).detach()
        stats = torch.stack([(chosen_reward > rejected_reward).float(), chosen_reward - rejected_reward,
                             chosen_reward, rejected_reward, policy[:, 0].detach(), policy[:, 1].detach()], dim=1)
        return loss, stats


def preference_loss_sum(model, batch, attention_mask, loss: PreferenceLoss, bare_model=None):
    """The summed loss of a batch of pairs (a `PreferenceMicroBatch` on the device) and its summed
    PREFERENCE_STATS: both add up across micro-batches and ranks like token losses. A pair of weight 0 (a stand-in)
    counts for nothing. `attention_mask`: the prompts' mask as the model gets it (None: no prompt is padded)."""
    policy = answer_logps(model, batch.input_ids, attention_mask, batch.labels, bare_model).view(2, -1).T
    losses, stats = loss.per_pair(policy, batch.reference, batch.chosen_tokens)
    return (losses * batch.weights).sum(), (stats * batch.weights[:, None]).sum(dim=0)
