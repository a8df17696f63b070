"""
Training losses.

    loss = lm_loss(logits, batch["labels"], batch["loss_weight"])     # pre-training / SFT, SPEC §6.3
    logps = sequence_logps(logits, labels)                            # MPO: log π(y|x) per row, SPEC §7.1
    loss, stats = mpo_loss(logps_c, logps_r, ref_c, ref_r, nll, running)

Label convention (as in data.py): labels[b, t] is the target of token t, predicted from position t-1, so the loss
pairs logits[:, :-1] with labels[:, 1:]; a weight tensor is aligned with labels and shifted the same way.

Shapes: B batch, T tokens, V vocabulary.
References: InternVL2.5 (arXiv 2412.05271) §4.3 / InternVL3 (arXiv 2504.10479) eq. 7 (token, sample and square
averaging); upstream OpenGVLab/InternVL internvl_chat/internvl/model/internvl_chat/modeling_internvl_chat.py
(forward with loss_weight and loss_reduction_all_gather); MPO: InternVL2.5-MPO (arXiv 2411.10442) §3.2, InternVL3
§2.3, trl DPOTrainer (loss_type "sigmoid" and "bco_pair", rpo_alpha; RunningMoments).
Tests: python -m pytest -q tests/test_data.py tests/test_mpo.py
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE = -100  # label of a token that gets no loss

# -----------------------------------------------------------------------------
# language modelling (next-token cross-entropy)


def loss_weight_sum(labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The denominator lm_loss uses: Σ w over the shifted, supervised positions (a 0-dim fp32 tensor).

    With weights=None every supervised token counts 1 (so this is the number of supervised tokens).
    """
    mask = (labels[:, 1:] != IGNORE).float()  # [B,T-1]
    if weights is not None:
        mask = mask * weights[:, 1:].float()
    return mask.sum()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
            denom: torch.Tensor | float | None = None) -> torch.Tensor:
    """Next-token cross-entropy: logits [B,T,V], labels [B,T] (IGNORE = no loss), weights [B,T] or None -> scalar.

    Without weights: the mean CE over supervised tokens (token averaging).
    With weights (data.loss_weights, per sample): Σ_t w_t·CE_t / Σ_t w_t (SPEC §6.3).
    denom replaces Σ_t w_t: under DDP with loss_reduction_all_gather, pass the per-rank loss_weight_sum averaged
    over ranks (all_reduce AVG). DDP then averages gradients over ranks, so the step minimises
    Σ_all ranks w·CE / Σ_all ranks w, one global weighted mean instead of a mean of per-rank means.
    A batch without any supervised token gives an exact 0 that still has a grad_fn (never NaN), so backward and
    DDP's gradient all-reduce run as usual.
    """
    V = logits.size(-1)
    logits = logits[:, :-1].float()  # [B,T-1,V]: position t predicts token t+1; CE in fp32
    targets = labels[:, 1:]  # [B,T-1]
    ce = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE, reduction="none")
    w = (targets != IGNORE).float()  # [B,T-1]
    if weights is not None:
        w = w * weights[:, 1:].float()
    if denom is None:
        denom = w.sum()
    # ignored positions have ce = 0 and w = 0, so with nothing supervised this is 0 / eps = 0 (no host sync)
    return (ce * w.reshape(-1)).sum() / torch.as_tensor(denom, dtype=torch.float32, device=ce.device).clamp(min=1e-12)


# -----------------------------------------------------------------------------
# Mixed Preference Optimization (SPEC §7.1): "the relative preference between pairs of responses, the absolute
# quality of individual responses, and the process for generating preferred responses" -> three terms.


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π(y|x) of each row: the SUM of next-token log-probs over supervised tokens (the response and its
    <|im_end|>; the prompt is masked exactly as in SFT). logits [B,T,V], labels [B,T] -> [B] fp32."""
    logp = logits[:, :-1].float().log_softmax(-1)  # [B,T-1,V]
    targets = labels[:, 1:]  # [B,T-1]
    mask = targets != IGNORE
    picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)  # [B,T-1]; -100 -> any id, masked below
    return (picked * mask).sum(-1)


class RunningMean:
    """δ of the quality term: the mean of every reward seen so far (trl's RunningMoments, mean part).

    Each batch contributes ONE number, the mean of its chosen and rejected rewards; under DDP the per-rank numbers
    are summed and counted across ranks. The count starts at 1e-24 so the first update sets δ to that batch's mean:
    δ after t batches = (m_1 + ... + m_t) / t, current batch included (the paper calls it a moving average).
    """

    def __init__(self):
        self.mean, self.count = 0.0, 1e-24

    @torch.no_grad()
    def update(self, rewards: torch.Tensor) -> float:
        batch = torch.stack([rewards.float().mean(), torch.ones((), device=rewards.device)])  # [sum of means, n]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch)
        total, n = batch.tolist()
        new_count = self.count + n
        self.mean += (total / n - self.mean) * n / new_count
        self.count = new_count
        return self.mean

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict):
        self.mean, self.count = state["mean"], state["count"]


def mpo_loss(policy_c: torch.Tensor, policy_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
             nll: torch.Tensor, running: RunningMean, beta: float = 0.1,
             weights: tuple[float, float, float] = (0.8, 0.2, 1.0)) -> tuple[torch.Tensor, dict]:
    """MPO for a batch of B pairs: log π_θ and log π_ref of the chosen (c) and rejected (r) responses, each [B];
    nll = token-mean cross-entropy of the chosen responses (a scalar, lm_loss). -> (loss, stats)

        r = β (log π_θ(y|x) - log π_ref(y|x))                       implicit reward
        L_p = -log σ(r_c - r_r)                                     preference: DPO, sigmoid
        L_q = -log σ(r_c - δ) - log σ(-(r_r - δ))                   quality: BCO, δ = running mean reward
        L   = mean_B(w_p L_p + w_q L_q) + w_g L_g,  L_g = nll       generation: SFT on the chosen (rpo_alpha)
    """
    w_p, w_q, w_g = weights
    r_c = beta * (policy_c.float() - ref_c.float())  # [B]
    r_r = beta * (policy_r.float() - ref_r.float())  # [B]
    loss_p = -F.logsigmoid(r_c - r_r)
    delta = running.update(torch.cat([r_c, r_r]).detach()) if w_q else running.mean  # δ includes this batch
    loss_q = -F.logsigmoid(r_c - delta) - F.logsigmoid(-(r_r - delta))
    loss = (w_p * loss_p + w_q * loss_q).mean() + w_g * nll
    stats = {"reward_chosen": r_c.mean().item(), "reward_rejected": r_r.mean().item(),
             "margin": (r_c - r_r).mean().item(), "accuracy": (r_c > r_r).float().mean().item(), "delta": delta,
             "loss_pref": loss_p.mean().item(), "loss_quality": loss_q.mean().item(), "nll": float(nll)}
    return loss, stats
