"""Synthetic faces: determinism, the insightface layouts read back through the real readers, landmarks that
sit on the drawn features, and a quality q that removes identity information without adding energy."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from magface.data.binfile import load_bin
from magface.data.codec import decode_jpeg
from magface.data.synthetic import generate, is_complete, load_manifest, make_identities, render_face
from magface.data.synthetic.render import ARCFACE_TEMPLATE_112, Pose
from magface.data.synthetic.writers import _identity
from magface.recordio import MXIndexedRecordIO, unpack

SMALL = dict(num_train_ids=5, images_per_id=4, num_eval_ids=6, eval_images_per_id=8, bin_pairs=10,
             ijb_templates_per_id=2, ijb_media_per_template=2)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synth") / "a", seed=0, workers=1, **SMALL)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _luma(img):
    return img.astype(np.float64) @ [0.299, 0.587, 0.114]


def _darkest(img, lmk, point):
    """Darkest luma within 2 px of `point`, relative to the skin around the landmarks' centre."""
    y = _luma(img)
    cx, cy = np.rint(lmk.mean(0)).astype(int)
    xi, yi = np.rint(point).astype(int)
    return y[yi - 2:yi + 3, xi - 2:xi + 3].min() - np.median(y[cy - 5:cy + 6, cx - 5:cx + 6])


def test_same_seed_same_bytes_for_any_worker_count_and_other_seed_differs(small, tmp_path):
    two = generate(tmp_path / "b", seed=0, workers=2, **SMALL)
    a, b = _files(small.root), _files(two.root)
    assert a.keys() == b.keys() and len(a) > 20
    assert [k for k in a if a[k] != b[k]] == []
    ma, mb = load_manifest(small.root), load_manifest(two.root)
    assert ma["files"] == mb["files"] and ma["params"] == mb["params"]
    other = generate(tmp_path / "c", seed=1, workers=1, **SMALL)
    c = _files(other.root)
    assert c["train/train.rec"] != a["train/train.rec"]
    assert c["verify/synth.bin"] != a["verify/synth.bin"]


def test_ms1mv2_layout_follows_mxnet_golden_conventions(small, golden_dir):
    n_ids, per_id = SMALL["num_train_ids"], SMALL["images_per_id"]
    n = n_ids * per_id
    with MXIndexedRecordIO(golden_dir / "ms1m_layout" / "train.idx", golden_dir / "ms1m_layout" / "train.rec",
                           "r") as gold:
        g0, _ = unpack(gold.read_idx(0))
        g_img, _ = unpack(gold.read_idx(1))
        g_id, _ = unpack(gold.read_idx(int(g0.label[0])))
        gold_keys = list(gold.keys)
    assert gold_keys == list(range(int(g0.label[1])))  # golden: keys 0..end-1, in file order

    with MXIndexedRecordIO(small.train_idx, small.train_rec, "r") as rec:
        assert rec.keys == list(range(n + n_ids + 1))
        h0, payload = unpack(rec.read_idx(0))
        assert (h0.flag, h0.id, h0.id2, payload) == (g0.flag, g0.id, g0.id2, b"")
        assert h0.label.tolist() == [n + 1, n + 1 + n_ids]
        labels = {}
        for key in range(1, n + 1):
            h, jpeg = unpack(rec.read_idx(key))
            assert (h.flag, h.id, h.id2) == (g_img.flag, key, g_img.id2)
            assert decode_jpeg(jpeg).shape == (112, 112, 3)
            labels[key] = int(h.label)
        ranges = []
        for i in range(n_ids):
            h, payload = unpack(rec.read_idx(n + 1 + i))
            assert (h.flag, h.id2, payload) == (g_id.flag, g_id.id2, b"") and h.id == n + 1 + i
            ranges.append([int(v) for v in h.label])
    assert g_id.id == int(g0.label[0])  # the golden identity records carry their own key as id, as ours do
    assert ranges == [[1 + i * per_id, 1 + (i + 1) * per_id] for i in range(n_ids)]
    assert all(labels[k] == i for i, (s, e) in enumerate(ranges) for k in range(s, e))
    assert small.train_property.read_text() == f"{n_ids},112,112"
    rows = _csv(small.train_quality)
    assert [(int(r["key"]), int(r["label"])) for r in rows] == sorted(labels.items())
    assert all(0.0 <= float(r["quality"]) <= 1.0 for r in rows)


def test_bin_reads_back_with_balanced_pairs_and_matching_quality_rows(small):
    images, issame = load_bin(small.verify_bin)
    pairs = SMALL["bin_pairs"]
    assert len(images) == 2 * pairs and issame.sum() == pairs // 2
    assert all(decode_jpeg(b).shape == (112, 112, 3) for b in images)
    rows = _csv(small.verify_quality)
    assert [int(r["index"]) for r in rows] == list(range(2 * pairs))
    ids = np.array([int(r["identity"]) for r in rows])
    assert ((ids[0::2] == ids[1::2]) == issame).all()


def test_ijb_layout_parses_and_landmarks_sit_on_the_faces(small):
    from magface.evaluation.alignment import ARCFACE_TEMPLATE_112 as template
    from magface.evaluation.ijb import read_protocol

    assert ARCFACE_TEMPLATE_112 is template  # one template for rendering and alignment

    proto = read_protocol(small.ijb_dir)
    n_ids, t, m = SMALL["num_eval_ids"], SMALL["ijb_templates_per_id"], SMALL["ijb_media_per_template"]
    frames = SMALL["eval_images_per_id"] // (t * m)
    assert len(proto.images) == n_ids * t * m * frames
    assert len(np.unique(proto.template_ids)) == n_ids * t and len(np.unique(proto.media_ids)) == n_ids * t * m
    # several media per template, each media several frames
    for tid in np.unique(proto.template_ids):
        mids, counts = np.unique(proto.media_ids[proto.template_ids == tid], return_counts=True)
        assert len(mids) == m and (counts == frames).all()
    owner = {int(r["image_name"].split(".")[0]): int(r["identity"]) for r in _csv(small.ijb_quality)}
    tid_owner = {int(tid): owner[int(im.split(".")[0])] for im, tid in zip(proto.images, proto.template_ids)}
    assert all((tid_owner[a] == tid_owner[b]) == bool(lab) for (a, b), lab in zip(proto.pairs, proto.labels))
    assert proto.labels.sum() == n_ids * t * (t - 1) // 2 and (proto.labels == 0).sum() > 0

    quality = {r["image_name"]: float(r["quality"]) for r in _csv(small.ijb_quality)}
    assert set(quality) == set(proto.images)
    eye, cheek = [], []
    for i, image in enumerate(proto.images):
        img = decode_jpeg((proto.image_dir / image).read_bytes())
        h, w = img.shape[:2]
        assert 150 <= h <= 180 and h == w
        lmk = proto.landmarks[i]
        assert (lmk > 0).all() and (lmk[:, 0] < w).all() and (lmk[:, 1] < h).all()
        if quality[image] < 0.6:
            continue  # irises are blurred away
        # the eye landmarks hit the dark irises; 14 px lower (the cheeks) is skin
        eye.append(np.mean([_darkest(img, lmk, p) for p in lmk[:2]]))
        cheek.append(np.mean([_darkest(img, lmk, p + [0, 14]) for p in lmk[:2]]))
    assert len(eye) >= 5 and np.median(eye) < -25 and np.median(cheek) > -15, (eye, cheek)


def test_landmarks_are_the_drawn_features():
    rng = np.random.default_rng(3)
    eyes, lips, cheeks = [], [], []
    for ident in make_identities(6, rng):
        # q = 1: sharp, never occluded; the eye landmarks hit the irises, the mouth corners the lip line
        img, lmk = render_face(ident, 1.0, rng)
        assert lmk.dtype == np.float32 and lmk.shape == (5, 2)
        assert np.abs(lmk - ARCFACE_TEMPLATE_112).max() < 12  # the template, up to pose and identity
        eyes += [_darkest(img, lmk, p) for p in lmk[:2]]  # dark irises
        lips += [_darkest(img, lmk, p) for p in lmk[3:]]  # darker lips
        cheeks += [_darkest(img, lmk, p + [0, 14]) for p in lmk[:2]]  # skin (a mole at most)
    assert max(eyes) < -20 and np.median(eyes) < -50 and np.median(lips) < -20 and np.median(cheeks) > -10, \
        (eyes, lips, cheeks)
    with pytest.raises(ValueError, match="q must lie in"):
        render_face(ident, 1.5, rng)


def test_quality_removes_identity_information_without_adding_energy():
    rng = np.random.default_rng(7)
    ids = make_identities(8, rng)
    centre = Pose(scale=1.0, angle=0.0, centre=(56.0, 56.0))

    def feat(img):
        """A crude pixel probe: the face interior's grey levels, high-passed (geometry, not lighting or
        skin tone) and standardised."""
        g = _luma(img)[24:104, 24:88].reshape(40, 2, 32, 2).mean((1, 3))
        pad = np.pad(g, 2, mode="edge")
        local = sum(pad[i:i + 40, j:j + 32] for i in range(5) for j in range(5)) / 25
        h = g - local
        return ((h - h.mean()) / (h.std() + 1e-6)).ravel()

    means = np.stack([np.mean([feat(render_face(ident, 1.0, rng, pose=centre)[0]) for _ in range(3)], 0)
                      for ident in ids])
    acc, hf, energy = {}, {}, {}
    for q in (0.05, 0.25, 1.0):
        hits, hfs, energies = [], [], []
        for label, ident in enumerate(ids):
            for _ in range(4):
                img, _ = render_face(ident, q, rng, pose=centre)
                hits.append(np.argmax(means @ feat(img)) == label)
                y = _luma(img)
                hfs.append(np.abs(np.diff(y, axis=0)).mean() + np.abs(np.diff(y, axis=1)).mean())
                energies.append(y.std())
        acc[q], hf[q], energy[q] = np.mean(hits), np.mean(hfs), np.mean(energies)
    # nearest class mean: near chance (1/8) at q = 0.05, near perfect at q = 1
    assert acc[0.05] <= acc[0.25] <= acc[1.0] and acc[1.0] >= 0.9 and acc[0.05] <= 0.4, acc
    assert hf[0.05] < hf[0.25] < hf[1.0], hf
    assert energy[0.05] < energy[1.0], energy  # degradations do not add input energy


def test_eval_identities_are_disjoint_from_training():
    def params(split, n):
        return np.stack([np.concatenate([_identity(0, split, i).landmarks.ravel(), _identity(0, split, i).face])
                         for i in range(n)])

    train, verify, ijb = params("train", 50), params("verify", 20), params("ijb", 20)
    for other in (verify, ijb):
        d = np.abs(train[:, None] - other[None]).max(-1)
        assert d.min() > 0.1
    assert np.abs(verify[:, None] - ijb[None]).max(-1).min() > 0.1


def test_cache_reuse_and_partial_dirs(small, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in small.root.rglob("*") if p.is_file()}
    again = generate(small.root, seed=0, workers=1, **SMALL)
    assert again == small and {p: p.stat().st_mtime_ns for p in before} == before
    params = load_manifest(small.root)["params"]
    assert is_complete(small.root, params) and not is_complete(small.root, {**params, "seed": 1})
    assert is_complete(small.root, dict(seed=0, **SMALL))  # parameters left out take generate's defaults
    assert not is_complete(small.root, dict(seed=0))

    # a copy with a truncated file, or without its manifest, is not a finished dataset
    part = tmp_path / "part"
    for rel, data in _files(small.root).items():
        (part / rel).parent.mkdir(parents=True, exist_ok=True)
        (part / rel).write_bytes(data)
    assert not is_complete(part, params)
    (part / "manifest.json").write_text(json.dumps(load_manifest(small.root)))
    assert is_complete(part, params)
    rec = part / "train" / "train.rec"
    rec.write_bytes(rec.read_bytes()[:-10])
    assert not is_complete(part, params)


def test_cli_writes_a_dataset(tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run([sys.executable, "-m", "magface.data.synthetic", "--out", str(out), "--num-train-ids", "2",
                          "--images-per-id", "2", "--num-eval-ids", "2", "--eval-images-per-id", "6",
                          "--bin-pairs", "4", "--workers", "1"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["train_images"] == 4 and summary["verify_pairs"] == 4
    assert is_complete(out)


def test_harder_eval_settings_are_deterministic_and_keep_q_per_image_and_template(tmp_path):
    """issue 11's harder benchmark knobs: look-alike evaluation identities and a lower-quality q distribution,
    byte-identical for any worker count, with the known q of every image and every IJB template."""
    hard = dict(SMALL, eval_identity_spread=0.5, eval_q_beta=(1.0, 3.0))
    a = generate(tmp_path / "a", seed=0, workers=1, **hard)
    b = generate(tmp_path / "b", seed=0, workers=2, **hard)
    fa, fb = _files(a.root), _files(b.root)
    assert fa.keys() == fb.keys() and [k for k in fa if fa[k] != fb[k]] == []
    easy = generate(tmp_path / "c", seed=0, workers=1, **SMALL)
    fc = _files(easy.root)
    assert fc["train/train.rec"] == fa["train/train.rec"]  # the knobs touch the evaluation sets only
    assert fc["verify/synth.bin"] != fa["verify/synth.bin"]
    # look-alikes: the evaluation identities' shape parameters lie closer together
    narrow = np.stack([_identity(0, "ijb", i, 0.5).face for i in range(20)])
    wide = np.stack([_identity(0, "ijb", i, 1.0).face for i in range(20)])
    assert np.allclose(narrow - narrow.mean(0), 0.5 * (wide - wide.mean(0)))
    # q per image, and per template the mean/min/max of its images' q
    per_image = {r["image_name"]: (int(r["identity"]), float(r["quality"])) for r in _csv(a.ijb_quality)}
    tid_of = {}
    for line in (a.ijb_dir / "meta" / "synth_face_tid_mid.txt").read_text().split("\n"):
        if line:
            image, tid, _ = line.split()
            tid_of.setdefault(int(tid), []).append(image)
    rows = _csv(a.ijb_template_quality)
    assert len(rows) == len(tid_of) == SMALL["num_eval_ids"] * SMALL["ijb_templates_per_id"]
    for r in rows:
        qs = [per_image[im][1] for im in tid_of[int(r["template_id"])]]
        assert int(r["n_images"]) == len(qs) and {per_image[im][0] for im in tid_of[int(r["template_id"])]} == \
            {int(r["identity"])}
        assert float(r["q_mean"]) == pytest.approx(np.mean(qs), abs=1e-6)
        assert (float(r["q_min"]), float(r["q_max"])) == (min(qs), max(qs))
    # the manifest's impostor count is the protocol's
    pair_file = a.ijb_dir / "meta" / "synth_template_pair_label.txt"
    labels = [int(ln.split()[2]) for ln in pair_file.read_text().split("\n") if ln]
    assert load_manifest(a.root)["counts"]["ijb_impostor_pairs"] == labels.count(0)
    with pytest.raises(ValueError, match="spread"):
        generate(tmp_path / "d", seed=0, workers=1, **dict(SMALL, eval_identity_spread=1.5))


def test_default_eval_sets_are_big_enough_for_far_1e4():
    from magface.data.synthetic.writers import DEFAULTS, _impostor_pairs

    assert DEFAULTS["bin_pairs"] == 6000  # 3,000 genuine, as LFW's protocol
    assert _impostor_pairs(DEFAULTS["num_eval_ids"], DEFAULTS["ijb_templates_per_id"]) >= 100_000
