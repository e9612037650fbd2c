"""The sharded classifier against a single-process full FC on the global batch (float64, gloo, 1-3 processes)."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from magface.losses import LossConfig, cosine_logits, per_sample_loss, regulariser
from magface.sharded_fc import ShardedClassifier, shard_range

D, C = 16, 23
CASES = [
    {"cfg": {"kind": "magface"}, "sample_rate": 1.0},
    {"cfg": {"kind": "magface", "easy_margin": True}, "sample_rate": 0.5},
    {"cfg": {"kind": "arcface", "m": 0.5}, "sample_rate": 1.0},
]


def make_batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, D, generator=g, dtype=torch.float64)
    feats = feats / feats.norm(dim=1, keepdim=True) * (torch.rand(n, 1, generator=g, dtype=torch.float64) * 120 + 5)
    labels = torch.randint(0, C, (n,), generator=g)
    labels[:3] = torch.tensor([0, C - 1, C // 2])  # classes at the shard edges
    weight = torch.randn(C, D, generator=g, dtype=torch.float64)
    # pull some features towards their class centre so that some are classified correctly
    feats[::2] += 3 * weight[labels[::2]] / weight[labels[::2]].norm(dim=1, keepdim=True) * feats[::2].norm(dim=1, keepdim=True)
    return feats, labels, weight


def run_shard(rank, world, feats, labels, weight, counts, case):
    """One rank's step; returns what the test compares (feature gradient divided back by W)."""
    start_row = sum(counts[:rank])
    f = feats[start_row : start_row + counts[rank]].clone().requires_grad_(True)
    clf = ShardedClassifier(D, C, LossConfig(**case["cfg"]), rank, world, sample_rate=case["sample_rate"], seed=7)
    clf.double()
    with torch.no_grad():
        clf.weight.copy_(weight[clf.class_start : clf.class_end])
    used = torch.arange(clf.class_start, clf.class_end)
    if case["sample_rate"] < 1:
        state = clf.generator.get_state()
        owned = (labels >= clf.class_start) & (labels < clf.class_end)
        index, _ = clf._sample(torch.where(owned, labels - clf.class_start, -1))
        clf.generator.set_state(state)  # the forward below draws the same sample
        used = used[index]
    loss, metrics = clf(f, labels[start_row : start_row + counts[rank]])
    loss.backward()
    return {
        "loss": loss.detach(), "metrics": metrics, "feat_grad": f.grad / world, "weight_grad": clf.weight.grad,
        "start": clf.class_start, "end": clf.class_end, "used": used,
    }


def _worker(rank, world, port, counts, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        feats, labels, weight = make_batch(sum(counts))
        results = [run_shard(rank, world, feats, labels, weight, counts, case) for case in CASES]
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def reference(feats, labels, weight, case, used):
    """Single-process full FC over the classes `used` (all of them unless sampled), written with losses.py's
    pure per-sample function."""
    cfg = LossConfig(**case["cfg"])
    f = feats.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    remap = torch.full((C,), -1)
    remap[used] = torch.arange(len(used))
    cos = cosine_logits(f, w[used])
    per_sample = per_sample_loss(cos, f.norm(dim=1), remap[labels], cfg)
    loss = per_sample.mean()
    loss.backward()
    reg = cfg.lambda_g * regulariser(f.norm(dim=1), cfg).mean() if cfg.uses_magnitude else torch.tensor(0.0)
    acc = (cos.argmax(dim=1) == remap[labels]).double().mean()
    return loss.detach(), f.grad, w.grad, reg.detach(), acc


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(results, counts):
    feats, labels, weight = make_batch(sum(counts))
    for k, case in enumerate(CASES):
        per_rank = [r[k] for r in results]
        used = torch.cat([r["used"] for r in per_rank])
        assert set(labels.tolist()) <= set(used.tolist())  # positives are always kept
        loss, f_grad, w_grad, reg, acc = reference(feats, labels, weight, case, used)
        for r in per_rank:
            torch.testing.assert_close(r["loss"], loss, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(r["metrics"]["ce"] + r["metrics"]["reg"], loss, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(r["metrics"]["reg"], reg.to(loss.dtype), rtol=1e-12, atol=1e-12)
            assert r["metrics"]["accuracy"].item() == pytest.approx(acc.item())
            assert r["metrics"]["magnitude"].item() == pytest.approx(feats.norm(dim=1).mean().item(), rel=1e-12)
            torch.testing.assert_close(r["weight_grad"], w_grad[r["start"] : r["end"]], rtol=1e-9, atol=1e-12)
        sharded_f_grad = torch.cat([r["feat_grad"] for r in per_rank])
        torch.testing.assert_close(sharded_f_grad, f_grad, rtol=1e-9, atol=1e-12)
        if LossConfig(**case["cfg"]).uses_magnitude:
            check_magnitude_gradient(feats, labels, weight, case, used, sharded_f_grad)
        if case["sample_rate"] < 1:
            assert len(used) < C


def check_magnitude_gradient(feats, labels, weight, case, used, f_grad):
    """The radial part of dL/df must be dL/da with the cosines held fixed (m(a) and g(a) paths), computed
    here directly on a magnitude leaf. Partial-FC ports that normalise f before the head get 0 here."""
    remap = torch.full((C,), -1)
    remap[used] = torch.arange(len(used))
    a = feats.norm(dim=1).requires_grad_(True)
    cos = cosine_logits(feats, weight[used])
    per_sample_loss(cos, a, remap[labels], LossConfig(**case["cfg"])).mean().backward()
    radial = (f_grad * feats).sum(dim=1) / feats.norm(dim=1)
    torch.testing.assert_close(radial, a.grad, rtol=1e-8, atol=1e-12)
    inside = (a > 10) & (a < 110)
    assert (a.grad[inside].abs() > 0).all()


def test_shard_ranges_partition_the_classes():
    for c, w in [(23, 2), (23, 3), (10, 10), (1000, 7)]:
        ranges = [shard_range(c, r, w) for r in range(w)]
        assert ranges[0][0] == 0 and ranges[-1][1] == c
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1


def test_single_process_equals_full_fc_without_torch_distributed():
    assert not dist.is_initialized()
    counts = [12]
    check([[run_shard(0, 1, *make_batch(12), counts, case) for case in CASES]], counts)


@pytest.mark.parametrize("counts", [[6, 6], [5, 4, 3]], ids=["2proc", "3proc-uneven"])
def test_multi_process_equals_single_process_full_fc(counts, tmp_path):
    mp.spawn(_worker, args=(len(counts), free_port(), counts, str(tmp_path)), nprocs=len(counts), join=True)
    check([torch.load(tmp_path / f"rank{r}.pt") for r in range(len(counts))], counts)


def test_class_sampling_is_deterministic_and_keeps_positives():
    labels = torch.tensor([3, 3, 17, 40, 99])
    picks = []
    for _ in range(2):
        clf = ShardedClassifier(8, 100, LossConfig(), sample_rate=0.1, seed=11)
        index, remapped = clf._sample(labels)
        picks.append(index)
        assert {3, 17, 40, 99} <= set(index.tolist()) and len(index) == 10
        assert (index[remapped] == labels).all()
    assert torch.equal(picks[0], picks[1])


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError, match="rank"):
        ShardedClassifier(8, 10, LossConfig(), rank=2, world_size=2)
    with pytest.raises(ValueError, match="sample_rate"):
        ShardedClassifier(8, 10, LossConfig(), sample_rate=0.0)
    with pytest.raises(ValueError, match="lambda_g"):
        ShardedClassifier(8, 10, LossConfig(lambda_g=1.0))


def test_bf16_autocast_keeps_loss_float32_and_close():
    feats, labels, weight = make_batch(12)
    clf = ShardedClassifier(D, C, LossConfig())
    with torch.no_grad():
        clf.weight.copy_(weight.float())
    f = feats.float().requires_grad_(True)
    ref, _ = clf(f, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = clf(f, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(f.grad).all()
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)
