"""Synthetic faces with a known quality q in [0, 1], deterministic from a seed.

Real face data cannot be downloaded everywhere, so the default demo data is generated here: identities
that differ by face shape, feature geometry and skin texture (not by colour), rendered with pose jitter
on random backgrounds and degraded by q (resolution, blur, contrast, occlusion). `generate` writes

- `train/train.rec|.idx|property` in insightface's MS1MV2 layout, `train/quality.csv` (key,label,quality);
- `verify/synth.bin` (insightface `.bin`) and `verify/synth_quality.csv` (index,identity,quality);
- `ijb/SYNTH/...` in insightface's IJB layout (loose crops + 5 landmarks, templates of several media)
  `ijb/SYNTH/meta/synth_quality.csv` (image_name,identity,quality) and
  `ijb/SYNTH/meta/synth_template_quality.csv` (template_id,identity,n_images,q_mean,q_min,q_max);
- `manifest.json` last, so `is_complete` tells a finished dataset from a partial one.

`python -m magface.data.synthetic --out DIR` does the same from the command line.
"""

from magface.data.synthetic.render import Identity, Pose, make_identities, render_face
from magface.data.synthetic.writers import GENERATOR_VERSION, SyntheticDataset, generate, is_complete, load_manifest

__all__ = ["GENERATOR_VERSION", "Identity", "Pose", "SyntheticDataset", "generate", "is_complete", "load_manifest",
           "make_identities", "render_face"]
