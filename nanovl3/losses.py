"""
Training losses.

    loss = lm_loss(logits, batch["labels"], batch["loss_weight"])   # pre-training / SFT
    logps = sequence_logps(logits, labels)                          # MPO: log π(y|x) per row
    loss, stats = mpo_loss(logps_c, logps_r, ref_c, ref_r, nll, running)

labels[b, t] is the target of token t, predicted by the logits at t-1 (as in data.py); `_shifted`,
the one home of that shift, aligns labels and weights with the logits. B batch, T tokens, V vocab.
References: InternVL2.5 (arXiv 2412.05271) "Training Enhancements" (loss reweighting), InternVL3
(arXiv 2504.10479) eq. 7 (token, sample and square averaging); upstream OpenGVLab/InternVL
modeling_internvl_chat.py (forward: loss_weight, loss_reduction_all_gather); MPO: arXiv 2411.10442
§3.2, InternVL3 §2.3, trl DPOTrainer ("sigmoid", "bco_pair", rpo_alpha; RunningMoments).
Tests: python -m pytest -q tests/test_data.py tests/test_mpo.py"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE = -100  # label of a token that gets no loss

# -----------------------------------------------------------------------------
# language modelling (next-token cross-entropy)

def _shifted(labels: torch.Tensor, weights: torch.Tensor | None = None):
    """-> (targets [B,T-1], w [B,T-1] fp32): what each position predicts and its weight (0: none)"""
    targets = labels[:, 1:]
    w = (targets != IGNORE).float()
    if weights is not None:
        w = w * weights[:, 1:].float()
    return targets, w


def _token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [B,T,V], targets [B,T-1] -> CE [B,T-1] fp32, 0 where IGNORE. One cross-entropy over
    all B·T positions, the last padded with IGNORE: slicing logits[:, :-1] would copy [B,T,V]."""
    B, T, V = logits.shape
    padded = F.pad(targets, (0, 1), value=IGNORE)  # [B,T]
    ce = F.cross_entropy(logits.reshape(-1, V).float(), padded.reshape(-1), ignore_index=IGNORE,
                         reduction="none")
    return ce.view(B, T)[:, :-1]


def loss_weight_sum(labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """lm_loss's denominator: Σ w over supervised positions, 0-dim fp32 (a token count if no w)."""
    return _shifted(labels, weights)[1].sum()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
            denom: torch.Tensor | float | None = None) -> torch.Tensor:
    """Next-token cross-entropy: logits [B,T,V], labels [B,T] (IGNORE: no loss), weights [B,T].
    Σ_t w_t·CE_t / Σ_t w_t, w = data.loss_weights per sample; without weights the mean CE over
    supervised tokens. denom replaces Σ_t w_t: under DDP with loss_reduction_all_gather pass the
    per-rank loss_weight_sum averaged over ranks, so DDP's gradient averaging minimises one global
    Σ_all w·CE / Σ_all w. Nothing supervised gives an exact 0 with a grad_fn (never NaN)."""
    targets, w = _shifted(labels, weights)
    ce = _token_ce(logits, targets)
    denom = torch.as_tensor(w.sum() if denom is None else denom, dtype=torch.float, device=w.device)
    return (ce * w).sum() / denom.clamp(min=1e-12)  # nothing supervised: 0 / eps = 0, no host sync


# -----------------------------------------------------------------------------
# Mixed Preference Optimization: InternVL3 §2.3 learns "the relative preference between pairs of
# responses, the absolute quality of individual responses, and the process for generating
# preferred responses" -> three terms.

def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π(y|x) of each row, logits [B,T,V], labels [B,T] -> [B] fp32: the SUM of next-token
    log-probs over supervised tokens (the response and its <|im_end|>; the prompt masked as SFT)."""
    return -_token_ce(logits, _shifted(labels)[0]).sum(-1)


class RunningMean:
    """δ of the quality term: the mean of all rewards so far (trl's RunningMoments, mean part).
    Each batch gives ONE number, the mean of its chosen and rejected rewards (summed and counted
    across DDP ranks); the count starts at 1e-24, so after t batches δ = (m_1 + ... + m_t) / t, the
    current batch included (the paper calls it a moving average)."""

    def __init__(self):
        self.mean, self.count = 0.0, 1e-24

    @torch.no_grad()
    def update(self, rewards: torch.Tensor) -> float:
        mean = rewards.float().mean()
        batch = torch.stack([mean, torch.ones_like(mean)])  # [sum of means, n]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch)
        total, n = batch.tolist()
        self.count += n
        self.mean += (total / n - self.mean) * n / self.count
        return self.mean

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict):
        self.mean, self.count = state["mean"], state["count"]


def mpo_loss(policy_c: torch.Tensor, policy_r: torch.Tensor, ref_c: torch.Tensor,
             ref_r: torch.Tensor, nll: torch.Tensor, running: RunningMean, beta: float = 0.1,
             weights: tuple[float, float, float] = (0.8, 0.2, 1.0)) -> tuple[torch.Tensor, dict]:
    """MPO for B pairs: log π_θ and log π_ref of the chosen (c) and rejected (r) responses, each
    [B]; nll = token-mean cross-entropy of the chosen responses (lm_loss). -> (loss, stats)

        r = β (log π_θ(y|x) - log π_ref(y|x))                  implicit reward
        L_p = -log σ(r_c - r_r)                                preference: DPO, sigmoid
        L_q = -log σ(r_c - δ) - log σ(-(r_r - δ))              quality: BCO, δ = running mean reward
        L   = mean_B(w_p L_p + w_q L_q) + w_g L_g, L_g = nll   generation: SFT (rpo_alpha)"""
    w_p, w_q, w_g = weights
    r_c = beta * (policy_c.float() - ref_c.float())  # [B]
    r_r = beta * (policy_r.float() - ref_r.float())  # [B]
    loss_p = -F.logsigmoid(r_c - r_r)
    delta = running.update(torch.cat([r_c, r_r]).detach()) if w_q else running.mean
    loss_q = -F.logsigmoid(r_c - delta) - F.logsigmoid(-(r_r - delta))
    loss = (w_p * loss_p + w_q * loss_q).mean() + w_g * nll
    stats = {"reward_chosen": r_c.mean().item(), "reward_rejected": r_r.mean().item(),
             "margin": (r_c - r_r).mean().item(), "accuracy": (r_c > r_r).float().mean().item(),
             "delta": delta, "loss_pref": loss_p.mean().item(),
             "loss_quality": loss_q.mean().item(), "nll": float(nll)}
    return loss, stats
