"""Model-parallel classifier: class centres split across workers (Partial-FC-like), any margin head.

With W workers, rank r holds the contiguous class range [start_r, end_r) (sizes differ by at most one).
Each step:
  1. features and labels of the whole global batch are all-gathered (autograd-aware: the gradient of every
     rank's logits w.r.t. a feature row is summed and returned to the rank that owns the row);
  2. each rank computes cos(theta) for its shard only; the margin is applied on the shard owning the label,
     using the un-normalised gathered feature's magnitude, so the gradient through m(a) reaches ||f||
     (normalising features before the head, as Partial FC ports of MagFace do, silently drops it);
  3. the softmax denominator is built from all-reduced row maxima and sums;
  4. lambda_g * g(a) is computed once, by the rank that owns each feature row.
The returned loss is the mean over the global batch, identical on every rank. Local feature gradients are
multiplied by W, so that DDP's averaging over W ranks yields the single-process gradient of the global batch.
The classifier weight must not be wrapped in DDP (each rank owns a different shard).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from magface.losses import LossConfig, cosine_logits, margin_logits, regulariser


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the classes owned by `rank`; the first C % W ranks get one extra class."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class _SumAcrossRanks(torch.autograd.Function):
    """Forward: all-reduce sum. Backward: identity. Every rank computes the same replicated loss from the
    sum but owns only its own summand, so d loss / d summand_r = d loss / d sum on rank r."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


def _gather_plain(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """All-gather rows when rank r holds counts[r] of them (padded to the largest count; gloo and NCCL need
    equal shapes)."""
    width = max(counts)
    padded = x.new_zeros((width,) + x.shape[1:])
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


class _GatherRows(torch.autograd.Function):
    """All-gather rows of possibly different counts per rank. Backward sums every rank's gradient of the
    gathered tensor and returns this rank's slice, scaled by `grad_scale`."""

    @staticmethod
    def forward(ctx, x, counts, rank, grad_scale):
        ctx.counts, ctx.rank, ctx.grad_scale = counts, rank, grad_scale
        return _gather_plain(x, counts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # never reduce into autograd's buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]] * ctx.grad_scale, None, None, None


def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class ShardedClassifier(nn.Module):
    """This rank's shard of the class centres plus the distributed margin softmax.

    forward(local_features N_r x d (un-normalised), local_labels N_r int64) -> (loss, metrics), where metrics
    holds detached 0-dim tensors (call .item() only when logging): ce, reg (lambda_g * mean g(a); loss = ce +
    reg), accuracy (top-1 of cos(theta) over all (sampled) classes of all shards), magnitude (mean ||f||).

    sample_rate < 1 keeps, per step, every class with a positive in the global batch plus random others up
    to ceil(sample_rate * shard size) (drawn from `generator`, seeded from `seed` and rank when not given);
    unsampled centres get no gradient this step.
    world_size == 1 needs no torch.distributed.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        loss_cfg: LossConfig,
        rank: int = 0,
        world_size: int = 1,
        sample_rate: float = 1.0,
        seed: int = 0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardedClassifier: rank {rank} not in [0, world_size={world_size})")
        if num_classes < world_size:
            raise ValueError(f"ShardedClassifier: num_classes={num_classes} < world_size={world_size}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"ShardedClassifier.sample_rate must be in (0, 1], got {sample_rate}")
        self.loss_cfg = loss_cfg.validate()
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.rank, self.world_size, self.sample_rate = rank, world_size, sample_rate
        self.class_start, self.class_end = shard_range(num_classes, rank, world_size)
        self.weight = nn.Parameter(torch.normal(0, 0.01, (self.class_end - self.class_start, embedding_size)))
        self.generator = generator
        if generator is None and sample_rate < 1:
            self.generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)

    def extra_repr(self) -> str:
        return (
            f"classes [{self.class_start}, {self.class_end}) of {self.num_classes}, rank {self.rank}/"
            f"{self.world_size}, loss={self.loss_cfg.kind}, sample_rate={self.sample_rate}"
        )

    def _sample(self, local_targets: torch.Tensor):
        """Indices of the shard's centres used this step (positives always) and labels remapped to them."""
        n_local = self.weight.shape[0]
        n_keep = min(n_local, math.ceil(self.sample_rate * n_local))
        owned = local_targets >= 0
        score = torch.rand(n_local, generator=self.generator).to(self.weight.device)
        score[local_targets[owned]] = 2.0  # positives outrank any random score
        n_keep = max(n_keep, int((score == 2.0).sum()))
        index = torch.topk(score, n_keep, sorted=False)[1].sort()[0]
        remap = torch.full((n_local,), -1, dtype=torch.long, device=self.weight.device)
        remap[index] = torch.arange(index.numel(), device=index.device)
        labels = torch.where(owned, remap[local_targets.clamp_min(0)], local_targets)
        return index, labels

    def forward(self, local_features: torch.Tensor, local_labels: torch.Tensor, counts: list[int] | None = None):
        """`counts`: every rank's batch size, when the caller knows them (the training loop does); else they
        are all-gathered, costing one collective and one device-to-host read."""
        cfg, w = self.loss_cfg, self.world_size
        distributed = w > 1
        if distributed:
            if counts is None:
                mine = torch.tensor([local_features.shape[0]], device=local_features.device)
                gathered = [torch.zeros_like(mine) for _ in range(w)]
                dist.all_gather(gathered, mine)
                counts = torch.cat(gathered).tolist()
            elif len(counts) != w or counts[self.rank] != local_features.shape[0]:
                raise ValueError(f"ShardedClassifier: counts {counts} do not match world size {w} and this "
                                 f"rank's batch of {local_features.shape[0]}")
            features = _GatherRows.apply(local_features, counts, self.rank, float(w))
            labels = _gather_plain(local_labels, counts)
            local_for_reg = _ScaleGrad.apply(local_features, float(w))
        else:
            features, labels, local_for_reg = local_features, local_labels, local_features
        n_global = features.shape[0]

        owned = (labels >= self.class_start) & (labels < self.class_end)
        local_targets = torch.where(owned, labels - self.class_start, torch.full_like(labels, -1))
        weight = self.weight
        if self.sample_rate < 1:
            index, local_targets = self._sample(local_targets)
            weight = weight[index]

        cos = cosine_logits(features, weight)
        with torch.autocast(device_type=cos.device.type, enabled=False):
            magnitude = _at_least_f32(features).norm(dim=1)
            logits = margin_logits(cos, magnitude, local_targets, cfg)
            rows = torch.arange(n_global, device=logits.device)
            has_target = local_targets >= 0
            target_logit = torch.where(has_target, logits[rows, local_targets.clamp_min(0)], 0.0)
            with torch.no_grad():
                maxima = torch.stack([
                    logits.max(dim=1)[0],
                    cos.detach().max(dim=1)[0],
                    torch.where(has_target, cos.detach()[rows, local_targets.clamp_min(0)], -2.0),
                ])
                if distributed:  # one collective for the three row maxima
                    dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
                row_max, cos_max, cos_target = maxima
            sum_exp = (logits - row_max[:, None]).exp().sum(dim=1)
            g_local = regulariser(_at_least_f32(local_for_reg).norm(dim=1), cfg).sum().reshape(1)
            if distributed:  # one collective for the three sums
                sum_exp, target_logit, g_local = _SumAcrossRanks.apply(
                    torch.cat([sum_exp, target_logit, g_local])
                ).split([n_global, n_global, 1])
            ce = (row_max + sum_exp.log() - target_logit).mean()
            reg = cfg.lambda_g * g_local[0] / n_global
            loss = ce + reg
        metrics = {
            "ce": ce.detach(),
            "reg": reg.detach(),
            "accuracy": (cos_target >= cos_max).float().mean(),
            "magnitude": magnitude.detach().mean(),
        }
        return loss, metrics
