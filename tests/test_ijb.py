"""IJB pipeline: alignment, protocol parsing (errors name file and line), template scoring edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from magface.evaluation.alignment import (ARCFACE_TEMPLATE_112, LandmarkError, align_face, reference_landmarks,
                                          umeyama, warp_affine)
from magface.evaluation.ijb import BadImageError, ProtocolError, find_ijb_dir, load_face, read_protocol


# ------------------------------------------------------------------------------------------- alignment
def _similarity(scale, angle, tx, ty):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty], [0, 0, 1.0]])


@pytest.mark.parametrize("scale,angle,tx,ty", [(1.0, 0.0, 0.0, 0.0), (2.3, 0.4, -15.0, 7.5), (0.6, -2.8, 40, 3)])
def test_umeyama_recovers_known_similarity(scale, angle, tx, ty):
    t = _similarity(scale, angle, tx, ty)
    src = ARCFACE_TEMPLATE_112 * 1.7 + 5
    dst = (np.c_[src, np.ones(5)] @ t.T)[:, :2]
    np.testing.assert_allclose(umeyama(src, dst), t, atol=1e-9)


def test_umeyama_least_squares_beats_perturbations():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(5, 2)) * 30
    dst = src @ np.array([[0.9, -0.3], [0.3, 0.9]]).T + rng.normal(size=(5, 2)) * 2 + 10
    t = umeyama(src, dst)

    def cost(m):
        return ((np.c_[src, np.ones(5)] @ m[:2].T - dst) ** 2).sum()

    base = cost(t)
    for _ in range(50):  # any nearby similarity fits worse
        a, b, tx, ty = rng.normal(size=4) * 1e-3
        p = t.copy()
        p[:2, :2] += [[a, -b], [b, a]]
        p[:2, 2] += [tx, ty]
        assert cost(p) >= base - 1e-9


def test_reference_landmarks_scale_with_size():
    np.testing.assert_allclose(reference_landmarks(112), ARCFACE_TEMPLATE_112)
    np.testing.assert_allclose(reference_landmarks(224), ARCFACE_TEMPLATE_112 * 2)
    np.testing.assert_allclose(reference_landmarks(56), ARCFACE_TEMPLATE_112 / 2)
    # insightface's 128 crop: template shifted right by 8 px
    np.testing.assert_allclose(reference_landmarks(128), ARCFACE_TEMPLATE_112 + [8, 0])


def test_warp_affine_matches_direct_bilinear_sampling():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    # integer translation: an exact shift, black where the source is outside
    out = warp_affine(img, _similarity(1, 0, 3, 2), (40, 50))
    np.testing.assert_array_equal(out[2:, 3:], img[:-2, :-3])
    assert (out[:2] == 0).all() and (out[:, :3] == 0).all()
    # half-pixel translation: the mean of two neighbours, rounded
    out = warp_affine(img, _similarity(1, 0, -0.5, 0), (40, 49))
    expect = np.rint((img[:, :-1].astype(float) + img[:, 1:]) / 2)
    np.testing.assert_array_equal(out, expect.astype(np.uint8))
    # a general similarity, checked at random output pixels with an explicit bilinear formula
    t = _similarity(1.3, 0.3, -4, 2)
    out = warp_affine(img, t, (30, 30))
    inv = np.linalg.inv(t)
    for y, x in rng.integers(5, 25, size=(20, 2)):
        sx, sy = (inv @ [x, y, 1])[:2]
        x0, y0 = int(np.floor(sx)), int(np.floor(sy))
        fx, fy = sx - x0, sy - y0
        if not (0 <= x0 < 49 and 0 <= y0 < 39):
            continue
        p = img.astype(float)
        v = (p[y0, x0] * (1 - fx) * (1 - fy) + p[y0, x0 + 1] * fx * (1 - fy)
             + p[y0 + 1, x0] * (1 - fx) * fy + p[y0 + 1, x0 + 1] * fx * fy)
        np.testing.assert_allclose(out[y, x], np.rint(v), atol=1)


def test_align_face_undoes_a_known_similarity():
    # a smooth 112x112 "face" so bilinear resampling error stays small
    yy, xx = np.mgrid[0:112, 0:112]
    face = np.stack([128 + 100 * np.sin(xx / 9.0), 128 + 100 * np.cos(yy / 11.0), (xx + yy)], -1)
    face = np.clip(face, 0, 255).astype(np.uint8)
    t = _similarity(1.6, 0.35, 60, 20)
    big = warp_affine(face, t, (260, 250))
    lm = (np.c_[ARCFACE_TEMPLATE_112, np.ones(5)] @ t.T)[:, :2]
    out = align_face(big, lm, 112)
    err = np.abs(out[8:-8, 8:-8].astype(int) - face[8:-8, 8:-8].astype(int))
    assert err.mean() < 2.0 and np.percentile(err, 99) < 8
    # 56 px output: the same crop at half resolution
    small = align_face(big, lm, 56)
    assert small.shape == (56, 56, 3)
    assert np.abs(small[4:-4, 4:-4].astype(int) - face[8:-8:2, 8:-8:2].astype(int)).mean() < 6
    with pytest.raises(LandmarkError, match=r"face.jpg: landmarks are not finite"):
        bad = lm.copy()
        bad[1] = [np.nan, 50]
        align_face(big, bad, 112, where="face.jpg")


def test_warp_and_alignment_match_opencv_within_one_grey_level():
    """cv2.warpAffine (bilinear, default BORDER_CONSTANT black) is what every reference alignment uses; near and
    past the border it blends the edge pixel with black. Landmarks outside the image are aligned the same way."""
    cv2 = pytest.importorskip("cv2")
    from magface.evaluation.alignment import landmarks_outside

    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, size=(90, 80, 3), dtype=np.uint8)
    worst = 0
    for k in range(40):
        lm = rng.uniform(-25, 105, size=(5, 2)) if k % 2 else ARCFACE_TEMPLATE_112 * 0.6 + rng.normal(0, 3, (5, 2))
        m = umeyama(lm, reference_landmarks(112))
        ours = align_face(img, lm, 112)
        ref = cv2.warpAffine(img, m[:2], (112, 112), flags=cv2.INTER_LINEAR, borderValue=0.0)
        worst = max(worst, int(np.abs(ours.astype(int) - ref).max()))
    assert worst <= 1
    assert landmarks_outside(np.array([[-3, 5]] * 5), img.shape)
    assert not landmarks_outside(np.array([[0, 0], [79, 89], [5, 5], [6, 6], [7, 7]]), img.shape)


# ------------------------------------------------------------------------------------------- protocol files
def _write_set(root, name="toy", n_templates=4, images_per_template=3, pairs=None, lines_5pts=None):
    from magface.data.codec import encode_jpeg

    set_dir = root / name.upper()
    (set_dir / "meta").mkdir(parents=True)
    (set_dir / "loose_crop").mkdir()
    tid_lines, lmk_lines = [], []
    rng = np.random.default_rng(0)
    k = 0
    for t in range(1, n_templates + 1):
        for j in range(images_per_template):
            k += 1
            img = f"{k}.jpg"
            (set_dir / "loose_crop" / img).write_bytes(encode_jpeg(rng.integers(0, 255, (150, 140, 3), np.uint8)))
            tid_lines.append(f"{img} {t} {100 * t + j // 2}")
            lm = ARCFACE_TEMPLATE_112 + 15
            lmk_lines.append(img + " " + " ".join(f"{v:.3f}" for v in lm.ravel()) + " 0.9")
    if pairs is None:
        pairs = [f"{a} {b} {int(a == b)}" for a in range(1, n_templates + 1) for b in range(a, n_templates + 1)]
    (set_dir / "meta" / f"{name}_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
    (set_dir / "meta" / f"{name}_name_5pts_score.txt").write_text("\n".join(lines_5pts or lmk_lines) + "\n")
    (set_dir / "meta" / f"{name}_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    return set_dir


def test_read_protocol_parses_layout(tmp_path):
    set_dir = _write_set(tmp_path)
    assert find_ijb_dir(tmp_path, "toy") == set_dir
    p = read_protocol(set_dir)
    assert p.name == "toy" and len(p.images) == 12 and p.images[4] == "5.jpg"
    assert p.template_ids.tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert p.media_ids[:3].tolist() == [100, 100, 101]
    np.testing.assert_allclose(p.landmarks[0], ARCFACE_TEMPLATE_112 + 15, atol=1e-3)
    assert p.faceness.dtype == np.float32 and np.allclose(p.faceness, 0.9)
    assert p.pairs.shape == (10, 2) and p.labels.sum() == 4


def test_missing_protocol_file_is_named(tmp_path):
    set_dir = _write_set(tmp_path)
    (set_dir / "meta" / "toy_template_pair_label.txt").unlink()
    with pytest.raises(ProtocolError, match=r"missing protocol file .*toy_template_pair_label.txt"):
        read_protocol(set_dir)
    with pytest.raises(FileNotFoundError, match="IJBQ"):
        find_ijb_dir(tmp_path, "ijbq")


def test_pair_with_unknown_template_names_file_and_line(tmp_path):
    set_dir = _write_set(tmp_path, pairs=["1 2 0", "2 3 0", "3 77 0", "1 1 1"])
    with pytest.raises(ProtocolError, match=r"toy_template_pair_label.txt:3: template 77 is not in"):
        read_protocol(set_dir)


@pytest.mark.parametrize("bad_line,match", [
    ("1 x 0", r"toy_template_pair_label.txt:2: field 2 should be an integer, got 'x'"),
    ("1 2", r"toy_template_pair_label.txt:2: expected 3 fields"),
    ("1 2 5", r"toy_template_pair_label.txt:2: label must be 0 or 1, got 5"),
])
def test_malformed_pair_line_is_named(tmp_path, bad_line, match):
    set_dir = _write_set(tmp_path, pairs=["1 2 0", bad_line, "1 1 1"])
    with pytest.raises(ProtocolError, match=match):
        read_protocol(set_dir)


def test_protocol_files_accept_the_reference_readers_whitespace(tmp_path):
    """Trailing blanks (the real IJB release has them), runs of blanks and tabs read as the references read them."""
    set_dir = _write_set(tmp_path, pairs=["1 2 0 ", "1  3\t0", " 2 2 1  "])
    p = read_protocol(set_dir)
    np.testing.assert_array_equal(p.pairs, [[1, 2], [1, 3], [2, 2]])
    np.testing.assert_array_equal(p.labels, [0, 0, 1])


def test_nan_landmark_is_named_with_file_and_line(tmp_path):
    lm = " ".join(["50"] * 10)
    lines = [f"{k}.jpg {lm} 0.9" for k in range(1, 13)]
    lines[4] = f"5.jpg 50 50 nan 50 50 50 50 50 50 50 0.9"
    set_dir = _write_set(tmp_path, lines_5pts=lines)
    with pytest.raises(ProtocolError, match=r"toy_name_5pts_score.txt:5: landmarks are not finite"):
        read_protocol(set_dir)


def test_landmark_file_must_match_face_list(tmp_path):
    lm = " ".join(["50"] * 10)
    lines = [f"{k}.jpg {lm} 0.9" for k in range(1, 13)]
    lines[6] = f"99.jpg {lm} 0.9"
    set_dir = _write_set(tmp_path, lines_5pts=lines)
    with pytest.raises(ProtocolError, match=r"toy_name_5pts_score.txt:7: image '99.jpg' but .*toy_face_tid_mid.txt:7"):
        read_protocol(set_dir)


def test_load_face_errors_name_the_file(tmp_path):
    set_dir = _write_set(tmp_path)
    p = read_protocol(set_dir)
    (p.image_dir / "2.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(BadImageError, match=r"2.jpg \(.*toy_name_5pts_score.txt:2\): cannot read image"):
        load_face(None, str(p.image_dir / "2.jpg"), p.landmarks[1], 112, p.where(1))
    far = p.landmarks[0].copy()
    far[3] = [500, 20]
    info = {}  # outside the image: aligned anyway (as eval_ijbc.py does), and reported so it can be counted
    face = load_face(None, str(p.image_dir / "1.jpg"), far, 112, p.where(0), info)
    assert face.shape == (112, 112, 3) and info == {"landmarks_outside": True}
    ok = load_face(None, str(p.image_dir / "1.jpg"), p.landmarks[0], 112, p.where(0))
    assert ok.shape == (112, 112, 3) and ok.dtype == np.uint8


# ------------------------------------------------------------------------------------------- templates + scores
def _loop_scores(protocol, unit, mags, valid, rule, weights=None):
    """Independent reference: per-template dicts and explicit loops."""
    w = np.ones(len(unit)) if weights is None else weights
    temps = {}
    for t in np.unique(protocol.template_ids[valid]):
        media = {}
        for i in np.flatnonzero((protocol.template_ids == t) & valid):
            x = unit[i] * mags[i] * w[i]
            media.setdefault(protocol.media_ids[i], []).append(x)
        ms = [np.mean(v, axis=0) for v in media.values()]
        if rule == "magface":
            ms = [m / np.linalg.norm(m) for m in ms]
        t_feat = np.mean(ms, axis=0)
        temps[t] = t_feat / np.linalg.norm(t_feat)
    return np.array([temps[a] @ temps[b] if a in temps and b in temps else -1.0 for a, b in protocol.pairs])


def test_ijb_verification_matches_loop_reference_with_failed_images(tmp_path):
    from magface.evaluation.ijb import ijb_verification
    from magface.evaluation.metrics import tar_at_far

    p = read_protocol(_write_set(tmp_path, n_templates=6, images_per_template=4))
    rng = np.random.default_rng(3)
    raw = rng.normal(size=(len(p.images), 16))
    unit = (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)
    mags = rng.uniform(5, 40, len(p.images)).astype(np.float32)
    p.faceness = rng.uniform(0.2, 1.0, len(p.images)).astype(np.float32)
    valid = np.ones(len(p.images), bool)
    valid[[0, 1, 2, 3]] = False  # template 1 loses every image: its pairs score -1
    valid[5] = False  # template 2 keeps 3 of 4
    res = ijb_verification(p, unit, mags, valid, conventions=("magface", "magface_plus"))
    assert res["n_pairs_missing_template"] == 6 and res["n_images_used"] == len(p.images) - 5
    for rule in ("magface", "magface_plus"):
        ref = _loop_scores(p, unit, mags, valid, rule)
        np.testing.assert_allclose(res["scores"][rule], ref, atol=1e-5)
        assert res["tar_at_far"][rule]["nearest"] == tar_at_far(ref.astype(np.float32), p.labels,
                                                               convention="nearest")
    # the two rules differ when magnitudes differ
    assert not np.allclose(res["scores"]["magface"], res["scores"]["magface_plus"])
    # insightface without flip, with faceness: the same failed images leave the same templates out
    from magface.evaluation.ijb import Convention

    res_w = ijb_verification(p, unit, mags, valid, conventions=[Convention("insightface", flip=False)])
    scores = res_w["scores"]["insightface_N1D1F0"]
    assert (scores[~np.isin(p.pairs, p.template_ids[valid]).all(1)] == -1).all()
