"""The training job: schedules, train state, the epoch split across workers, worker-count invariance."""

import numpy as np
import pytest
import torch

from magface.config import Config
from magface.train.schedule import build_scheduler, lr_factor
from magface.train.state import load_train_state, restore_train_state, save_train_state

IMAGE = 16


def tiny_config(tmp_path, name, **sections):
    """A config for an 8-class, 16x16 run of the small CNN; `sections` override whole-section keys."""
    d = {
        "data": {"num_classes": 8, "image_size": IMAGE, "flip": False, "shuffle": "none"},
        "model": {"backbone": "small", "embedding_size": 16, "backbone_kwargs": {"width": 4}},
        "loss": {"s": 16.0, "lambda_g": 35.0},
        "optim": {"lr": 0.1, "schedule": "step", "milestones": [100]},
        "train": {"name": name, "storage_path": str(tmp_path / "runs"), "epochs": 1, "batch_size": 4,
                  "max_failures": 0},
        "scaling": {"num_workers": 1},
        "tracking": {"enabled": False, "log_every": 1},
    }
    for section, values in sections.items():
        d[section] = {**d[section], **values}
    return Config.from_dict(d)


def random_rows(n, num_classes=8, seed=0):
    rng = np.random.default_rng(seed)
    return [{"key": i, "label": int(rng.integers(num_classes)),
             "image": rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8)} for i in range(n)]


# ------------------------------------------------------------------------------------------ schedules
def test_paper_step_schedule():
    kw = dict(steps_per_epoch=100, epochs=25, schedule="step", milestones=[10, 18, 22], gamma=0.1)
    assert [lr_factor(e * 100, **kw) for e in (0, 9, 10, 17, 18, 21, 22, 24)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert lr_factor(999, **kw) == 1 and lr_factor(1000, **kw) == pytest.approx(0.1)


def test_warmup_then_polynomial():
    kw = dict(steps_per_epoch=10, epochs=5, schedule="poly", warmup_epochs=1, power=2.0)
    assert [lr_factor(s, **kw) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    # after warmup: (1 - (step - 10) / 40)^2
    for s in (10, 20, 30, 49):
        assert lr_factor(s, **kw) == pytest.approx((1 - (s - 10) / 40) ** 2)


def test_scheduler_state_resumes_at_the_same_lr(tmp_path):
    cfg = tiny_config(tmp_path, "sched", optim={"schedule": "poly", "warmup_epochs": 1.0})
    p = torch.nn.Parameter(torch.zeros(2))

    def make():
        opt = torch.optim.SGD([p], lr=cfg.optim.lr, momentum=0.9)
        return opt, build_scheduler(opt, cfg.optim, steps_per_epoch=5, epochs=3)

    opt, sched = make()
    for _ in range(7):
        opt.step()
        sched.step()
    opt2, sched2 = make()
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    assert sched.get_last_lr()[0] == pytest.approx(0.1 * (1 - 2 / 10) ** 2)


# ------------------------------------------------------------------------------------------ train state
def test_train_state_round_trip(tmp_path):
    """Rank 1 of 3 round trip; other worker counts and the older format: tests/test_elastic.py."""
    from magface.losses import LossConfig
    from magface.sharded_fc import ShardedClassifier

    def make(rank):
        clf = ShardedClassifier(8, 10, LossConfig(s=16.0), rank=rank, world_size=3)
        opt = torch.optim.SGD(clf.parameters(), lr=0.1, momentum=0.9)
        return clf, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)

    saved = [make(rank) for rank in range(3)]
    for rank, (clf, opt, sched) in enumerate(saved):
        clf.weight.grad = torch.ones_like(clf.weight)
        opt.step()
        sched.step()
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        save_train_state(tmp_path, rank=rank, world_size=3, classifier=clf, optimizer=opt, scheduler=sched,
                         scaler=scaler, epoch=2, step=17)
    # no temporary left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "classifier_rows_000000000_000000004.pt", "classifier_rows_000000004_000000007.pt",
        "classifier_rows_000000007_000000010.pt", "train_state.pt"]

    clf, opt, sched = saved[1]
    clf2, opt2, sched2 = make(1)
    scaler2 = torch.amp.GradScaler("cpu")
    state = load_train_state(tmp_path, rank=1, world_size=3)
    assert restore_train_state(state, classifier=clf2, optimizer=opt2, scheduler=sched2, scaler=scaler2) == (2, 17)
    assert torch.equal(clf2.weight, clf.weight)
    assert torch.equal(opt2.state[clf2.weight]["momentum_buffer"], opt.state[clf.weight]["momentum_buffer"])
    assert sched2.get_last_lr() == sched.get_last_lr() and scaler2.get_scale() == 1024.0
    with pytest.raises(FileNotFoundError, match="no train state"):
        load_train_state(tmp_path / "missing", rank=0, world_size=3)


# ------------------------------------------------------------------------------------------ Ray runs
def _one_step(tmp_path, name, workers):
    from magface.checkpoint import load_model_file
    from magface.train.trainer import run

    import ray

    cfg = tiny_config(tmp_path, name, model={"freeze_bn": True},
                      optim={"lr": 1.0, "momentum": 0.0, "weight_decay": 0.0, "grad_clip": 0.0},
                      train={"batch_size": 8 // workers}, scaling={"num_workers": workers})
    result = run(cfg, ray.data.from_items(random_rows(8)))
    assert result.error is None and result.metrics["step"] == 1
    model = load_model_file(result.checkpoint_path)
    shards = [load_train_state(result.checkpoint_path, rank=r, world_size=workers)["classifier"]["weight"]
              for r in range(workers)]
    return cfg, model["state_dict"], torch.cat(shards)


@pytest.mark.slow
def test_one_step_is_invariant_to_the_number_of_workers(ray_session, tmp_path):
    """Same global batch of 8: 1 worker x 8 vs 2 workers x 4 (DDP + sharded classifier) -> same update,
    and both equal an independent single-process gradient of the MagFace loss (lr 1, no momentum/decay)."""
    from magface.losses import cosine_logits, per_sample_loss
    from magface.models import get_backbone

    cfg, sd1, w1 = _one_step(tmp_path, "inv1", 1)
    _, sd2, w2 = _one_step(tmp_path, "inv2", 2)

    # Independent reference: the whole batch in one process, frozen BN, loss = mean per-sample MagFace loss.
    torch.manual_seed(cfg.train.seed)
    backbone = get_backbone("small", embedding_size=16, input_size=IMAGE, width=4,
                            trainable_feature_scale=cfg.model.resolved_feature_scale(cfg.loss)).eval()
    w0 = torch.normal(0.0, 0.01, (8, 16), generator=torch.Generator().manual_seed(cfg.train.seed + 7919))
    weight = torch.nn.Parameter(w0.clone())
    rows = random_rows(8)
    images = cfg.data.convention.apply(torch.from_numpy(np.stack([r["image"] for r in rows])))
    labels = torch.tensor([r["label"] for r in rows])
    feats = backbone(images)
    loss = per_sample_loss(cosine_logits(feats, weight), feats.norm(dim=1), labels, cfg.loss).mean()
    loss.backward()
    # lr 1: new = old - grad (parameters the loss does not reach keep their value)
    ref = {k: p.detach() - (p.grad if p.grad is not None else 0) for k, p in backbone.named_parameters()}

    moved = 0
    for k, expected in ref.items():
        assert torch.allclose(sd1[k], expected, rtol=1e-4, atol=1e-6), k
        assert torch.allclose(sd2[k], expected, rtol=1e-4, atol=1e-6), k
        moved += int(not torch.allclose(expected, dict(backbone.named_parameters())[k].detach()))
    assert moved > 0
    assert torch.allclose(w1, weight.detach() - weight.grad, rtol=1e-4, atol=1e-7)
    assert torch.allclose(w2, w1, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(w1, w0)


def write_rec(folder, n, num_classes=8, seed=1):
    """A plain RecordIO shard (every record an image) with its .idx, via the project's MXNet-compatible writer."""
    from magface.recordio import IRHeader, MXIndexedRecordIO, pack_img

    folder.mkdir(parents=True, exist_ok=True)
    rec = MXIndexedRecordIO(str(folder / "train.idx"), str(folder / "train.rec"), "w")
    for r in random_rows(n, num_classes, seed):
        rec.write_idx(r["key"], pack_img(IRHeader(0, float(r["label"]), r["key"], 0), r["image"]))
    rec.close()
    return folder / "train.rec"


@pytest.mark.slow
def test_epochs_reshuffle_and_split_without_loss_or_repeat(ray_session, tmp_path, monkeypatch):
    """The RecordIO pipeline through 2 workers for 2 epochs: each epoch every sample is seen once across the
    workers, except what the equal split and drop-last must drop, and the order changes between epochs.
    MLflow points at a dead port meanwhile: training must warn and carry on."""
    import socket

    from magface.train.trainer import build_dataset, run

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")

    n, workers, batch = 31, 2, 3  # equal split: 15 rows per worker (1 dropped); 5 full batches each, no remainder
    rec = write_rec(tmp_path / "data", n)
    cfg = tiny_config(tmp_path, "split", data={"train": [str(rec)], "shuffle": "full", "flip": True},
                      train={"epochs": 2, "batch_size": batch}, scaling={"num_workers": workers},
                      tracking={"enabled": True})
    keys_dir = tmp_path / "keys"
    result = run(cfg, build_dataset(cfg), keys_log_dir=str(keys_dir))
    assert result.error is None and result.run_id is None  # tracking disabled itself, training went on
    assert result.steps_per_epoch == 5 and result.metrics["step"] == 10
    from pathlib import Path

    from magface.checkpoint import completeness

    assert completeness(result.checkpoint_path) == ("complete", "")  # both ranks' manifests, merged by Ray
    assert sorted(p.name for p in Path(result.checkpoint_path).glob("complete_rank*.json")) == \
        ["complete_rank0.json", "complete_rank1.json"]

    orders = []
    for epoch in range(2):
        per_rank = [np.load(keys_dir / f"keys_epoch{epoch}_rank{r}.npy") for r in range(workers)]
        assert [len(k) for k in per_rank] == [15, 15]
        seen = np.concatenate(per_rank)
        assert len(np.unique(seen)) == len(seen) == 30  # nothing repeated, within or across workers
        assert set(seen.tolist()) <= set(range(n))
        orders.append(per_rank)
    assert any(not np.array_equal(a, b) for a, b in zip(*orders))  # reshuffled between epochs


def test_apply_gradients_unscales_before_clipping_and_calls_the_hook_between():
    """The loop's optimizer step with a GradScaler against the same sequence written out by hand (PyTorch's
    documented AMP recipe): equal parameters afterwards; the hook sees the scaled gradient."""
    from magface.train.loop import apply_gradients

    def setup():
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 3)
        return net, torch.optim.SGD(net.parameters(), lr=0.5), torch.amp.GradScaler("cpu", init_scale=1024.0)

    x = torch.randn(8, 4)
    net, opt, scaler = setup()
    seen = []
    apply_gradients(net(x).pow(2).sum(), opt, scaler, net.parameters(), 0.1,
                    lambda: seen.append(net.weight.grad.abs().max().item()))
    ref, ref_opt, ref_scaler = setup()
    ref_scaler.scale(ref(x).pow(2).sum()).backward()
    scaled = ref.weight.grad.abs().max().item()
    ref_scaler.unscale_(ref_opt)
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    ref_scaler.step(ref_opt)
    ref_scaler.update()
    assert seen == [scaled] and scaled > 100  # still scaled by 1024 when the hook ran
    assert torch.equal(net.weight, ref.weight) and torch.equal(net.bias, ref.bias)
