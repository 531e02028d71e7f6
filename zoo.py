"""The model zoo: pretrained weights declared once, for hubconf.py, infer.py, demo.py, evaluate.py and train.py.

Each entry: where the file is (a download address with its sha256 prefix, or a file that ships in `weights/`), what
it is, the configuration it was made with, what it was trained on and under which licence. `load_pretrained(name)`
is the one loading function; `weights_file(name)` finds (downloads once, hash-checks) the file itself.
"""
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import glean
import glean_fast
import stylegan2
import weight_formats
from glean_io import CheckpointError, download, load_file, named, sha256_of


# Face templates: where a face model wants the 5 landmarks of a face (left eye, right eye, nose, left and right mouth
# corner, as seen in the image), as fractions (x, y) of its input frame. faces.py aligns photos to them.
# FFHQ-aligned frames (the official face models): the widely used 5-point template of a 512x512 FFHQ face
# (xinntao/facexlib, "standard 5 landmarks for FFHQ faces with 512 x 512", as GFPGAN uses it), given there with
# pixel centres at integers (cv2.warpAffine); here + 0.5 and / 512.
FFHQ = tuple(((x + 0.5) / 512, (y + 0.5) / 512) for x, y in (
    (192.98138, 239.94708), (318.90277, 240.19360), (256.63416, 314.01935), (201.26117, 371.41043),
    (313.08905, 371.15118)))
# The framing of glean_face_small_8x: measured on the crops it was first fine-tuned on (CelebA 89x109 photos cut at
# the box (left 8, top 23, side 73), +-5% jitter, resized to 64) as the mean MTCNN landmarks of the first 2000
# (1996 with a face; spread 0.010-0.043 per coordinate, largest for the nose), with
# `python faces.py --measure-template ../shared/data/celeba_89x109/images --box 8 23 73`; its last fine-tuning then
# used photos aligned to exactly this template (`faces.py --align`, weights/MODEL_CARD.md). No crop is stored.
CELEBA_64 = ((0.3660, 0.4493), (0.6318, 0.4487), (0.4939, 0.6123), (0.3789, 0.7325), (0.6171, 0.7318))
# The framing of this project's 128 px face models: the FFHQ template zoomed 1.25x about (0.5, 0.58), so that the face
# (brows to chin, cheek to cheek) fills the frame with a margin for the paste-back feather. A model's few input pixels
# are spent on the face, not on hair and background: eye distance 0.307 of the width (FFHQ's 0.246, CELEBA_64's 0.266).
TIGHT = tuple((0.5 + 1.25 * (x - 0.5), 0.58 + 1.25 * (y - 0.58)) for x, y in FFHQ)
TEMPLATES = {"ffhq": FFHQ, "celeba_64": CELEBA_64, "tight": TIGHT}   # by name, for faces.py --align --template


@dataclass(frozen=True)
class Weights:
    url: str              # download address (http(s), file://) or a path relative to this file
    sha256: str           # prefix of the file's sha256, checked after download
    kind: str             # "glean-official" (release layout), "glean" (ours), "stylegan2-official", "stylegan2" (ours)
    config: dict          # GLEANConfig or stylegan2.GeneratorConfig kwargs
    category: str         # what the model was trained on
    license: str          # licence of the weights and of their training data
    pixel_range: str = "RGB in [-1, 1] (x / 127.5 - 1)"
    note: str = ""
    template: tuple = ()  # face models: their face template (see FFHQ above); () for other categories
    window: bool = False  # face models trained with framing jitter: they take a window of a photo's own pixels
    #                       near their template's framing instead of a face warped onto it (photos.model_input)


_MMEDIT = "https://download.openmmlab.com/mmediting"
_APACHE = "weights: Apache-2.0 (OpenMMLab release)"
_SMALL = dict(style_channels=96, num_mlps=2, channel_multiplier=1, channel_base=96)   # the shipped banks, 64 and 128 px
_LFW_GLEAN = dict(out_size=128, rrdb_channels=64, num_rrdbs=3, rrdb_growth_channels=32, decoder_channels=64, **_SMALL)
_LFW = ("weights: Apache-2.0 (this project); data: LFW (Labeled Faces in the Wild), 4,749 people, research use "
        "(the photos belong to their owners); see weights/MODEL_CARD_128.md")
_CELEBA = ("weights: Apache-2.0 (this project); data: CelebA ids 1-10000, non-commercial research purposes only "
           "(CelebA terms); see weights/MODEL_CARD.md")
WEIGHTS = {
    "glean_face_small_8x": Weights(
        "weights/glean_face_small_8x.safetensors", "a3e41255", "glean",
        dict(in_size=8, out_size=64, rrdb_channels=64, num_rrdbs=3, rrdb_growth_channels=32, decoder_channels=64,
             **_SMALL), "faces (CelebA, 64x64, aligned to its template by MTCNN landmarks: face ~60% of the width)",
        _CELEBA,
        note="this project's small GLEAN, 8x (8 -> 64), trained on a 2-core CPU; ships with the code, works offline",
        template=CELEBA_64),
    "glean_face_in16_8x": Weights(
        "weights/glean_face_in16_8x.safetensors", "a4d2e922", "glean", dict(in_size=16, **_LFW_GLEAN),
        "faces (LFW photos, 128x128, aligned to the TIGHT template: the face fills the frame)", _LFW,
        note="this project's GLEAN for faces of real low-resolution photos, 8x (16 -> 128), trained on a 2-core CPU "
             "with real-file degradations (8-bit, mild blur, noise, JPEG); ships with the code, works offline",
        template=TIGHT, window=True),
    "glean_face_in32_4x": Weights(
        "weights/glean_face_in32_4x.safetensors", "db22559a", "glean", dict(in_size=32, **_LFW_GLEAN),
        "faces (LFW photos, 128x128, aligned to the TIGHT template: the face fills the frame)", _LFW,
        note="this project's GLEAN for larger faces of real low-resolution photos, 4x (32 -> 128), trained like "
             "glean_face_in16_8x on the same bank; ships with the code, works offline",
        template=TIGHT, window=True),
    "glean_face_16x": Weights(
        f"{_MMEDIT}/restorers/glean/glean_ffhq_16x_20210527-61a3afad.pth", "61a3afad", "glean-official",
        dict(in_size=64, out_size=1024), "faces (FFHQ)", f"{_APACHE}; data: FFHQ, CC BY-NC-SA 4.0",
        note="official GLEAN, 16x (64 -> 1024), bicubic (MATLAB) degradation", template=FFHQ),
    "glean_face_in128_8x": Weights(
        f"{_MMEDIT}/restorers/glean/glean_in128out1024_4x2_300k_ffhq_celebahq_20210812-acbcb04f.pth", "acbcb04f",
        "glean-official", dict(in_size=128, out_size=1024), "faces (FFHQ + CelebA-HQ)",
        f"{_APACHE}; data: FFHQ (CC BY-NC-SA 4.0), CelebA-HQ (non-commercial research)",
        note="official GLEAN, 8x (128 -> 1024), trained with real-world degradations (blur, noise, JPEG)",
        template=FFHQ),
    "glean_cat_8x": Weights(
        f"{_MMEDIT}/restorers/glean/glean_cat_8x_20210614-d3ac8683.pth", "d3ac8683", "glean-official",
        dict(in_size=32, out_size=256), "cats (LSUN cat)", f"{_APACHE}; data: LSUN, research use",
        note="official GLEAN, 8x (32 -> 256)"),
    "glean_cat_16x": Weights(
        f"{_MMEDIT}/restorers/glean/glean_cat_16x_20210527-68912543.pth", "68912543", "glean-official",
        dict(in_size=16, out_size=256), "cats (LSUN cat)", f"{_APACHE}; data: LSUN, research use",
        note="official GLEAN, 16x (16 -> 256)"),
    "stylegan2_ffhq_1024": Weights(
        f"{_MMEDIT}/stylegan2/official_weights/stylegan2-ffhq-config-f-official_20210327_171224-bce9310c.pth",
        "bce9310c", "stylegan2-official", dict(out_size=1024), "faces (FFHQ)",
        "NVIDIA Source Code License-NC (non-commercial); data: FFHQ, CC BY-NC-SA 4.0",
        note="official StyleGAN2 config-f converted by OpenMMLab: the latent bank of the face models"),
    "stylegan2_cat_256": Weights(
        f"{_MMEDIT}/stylegan2/official_weights/stylegan2-cat-config-f-official_20210327_172444-15bc485b.pth",
        "15bc485b", "stylegan2-official", dict(out_size=256), "cats (LSUN cat)",
        "NVIDIA Source Code License-NC (non-commercial); data: LSUN, research use",
        note="official StyleGAN2 config-f converted by OpenMMLab: the latent bank of the cat models"),
    "stylegan2_celeba_64": Weights(
        "weights/stylegan2_celeba_64.safetensors", "1315473a", "stylegan2", dict(out_size=64, **_SMALL),
        "faces (CelebA, 64x64 centre crops)", _CELEBA,
        note="this project's small StyleGAN2 (64 px), trained with train.py --stage bank: the latent bank of "
             "glean_face_small_8x; ships with the code"),
    "stylegan2_lfw_128": Weights(
        "weights/stylegan2_lfw_128.safetensors", "f89cc4a2", "stylegan2", dict(out_size=128, **_SMALL),
        "faces (LFW photos, 128x128, TIGHT template)", _LFW,
        note="this project's small StyleGAN2 (128 px), grown from stylegan2_celeba_64 with train.py --stage bank "
             "--init: the latent bank of glean_face_in16_8x and glean_face_in32_4x; ships with the code"),
}

DEFAULT_MODEL = "glean_face_small_8x"   # what infer.py, demo.py and torch.hub users get without naming a model


def shipped_file(w: Weights) -> Path:
    """A file that ships with the code, next to this module (a clone, torch.hub, and any pip install: the wheel
    carries weights/ inside its package); hash-checked, so a Git LFS pointer or a damaged copy is named."""
    path = Path(__file__).resolve().parent / w.url
    if not path.is_file():
        raise CheckpointError(f"{w.url} is missing (looked in {path.parent}); reinstall the package or clone the "
                              f"repository again")
    if not sha256_of(path).startswith(w.sha256):
        raise CheckpointError(f"{path} is damaged (sha256 does not start with {w.sha256}); restore it with "
                              f"git checkout -- {w.url} or reinstall the package")
    return path


def weights_file(name_or_path, progress: bool = True) -> Path:
    """A registered weights name -> its local file (downloaded once into the torch.hub cache, hash-checked, or
    shipped with the code); any other string is taken as a path and must exist."""
    if name_or_path in WEIGHTS:
        w = WEIGHTS[name_or_path]
        if "://" not in w.url:
            return shipped_file(w)
        return download(w.url, w.sha256, progress=progress)
    path = Path(name_or_path)
    if not path.is_file():
        raise CheckpointError(f"'{name_or_path}' is neither a registered model ({', '.join(WEIGHTS)}) "
                              f"nor an existing file")
    return path


def local_file(name: str) -> Path | None:
    """Where a registered model's file already is (shipped, or downloaded before), without checking or fetching it;
    None if using it needs a download."""
    w = WEIGHTS[name]
    path = (Path(__file__).resolve().parent / w.url if "://" not in w.url else
            Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url.split("?")[0]))
    return path if path.is_file() else None


def load_pretrained(name_or_path, *, fast: bool = True, progress: bool = True) -> glean.GLEAN:
    """A GLEAN model from a registered name (see WEIGHTS) or a checkpoint file, in eval mode on the CPU: this
    project's format, a training checkpoint of train.py, or an official release file (`generator.*` keys, e.g.
    glean_ffhq_16x_20210527-61a3afad.pth downloaded by hand; its configuration is read off its tensors).
    fast=True (the default) gives glean_fast.GLEANFast, the same network computed faster; False the reference.
    The model's `face_template` attribute tells infer.py how to frame faces for it, `face_window` whether it takes
    a window of the photo's own pixels (see face_entry, Weights.window)."""
    model = _load(name_or_path, glean_fast.GLEANFast if fast else glean.GLEAN, progress)
    entry = face_entry(name_or_path, model.cfg)
    model.face_template = entry.template if entry else ()
    model.face_window = bool(entry and entry.window)   # see Weights.window
    model.name = str(name_or_path)                 # what infer.py --faces notes name it by
    return model


def face_entry(name_or_path, cfg: glean.GLEANConfig) -> Weights | None:
    """The registered face model a name or a file stands for: by name, or the one whose configuration the file's
    is (when that identifies one framing); None if none."""
    if name_or_path in WEIGHTS:
        return WEIGHTS[name_or_path] if WEIGHTS[name_or_path].template else None
    same = [w for w in WEIGHTS.values() if w.kind.startswith("glean") and w.template and
            glean.GLEANConfig(**w.config) == cfg]
    return same[0] if len({(w.template, w.window) for w in same}) == 1 else None


def _load(name_or_path, cls, progress: bool) -> glean.GLEAN:
    if name_or_path in WEIGHTS:
        w = WEIGHTS[name_or_path]
        if not w.kind.startswith("glean"):
            raise ValueError(f"'{name_or_path}' is a {w.kind} latent bank, not a GLEAN model")
        path = weights_file(name_or_path, progress)
        return cls.from_official(path, glean.GLEANConfig(**w.config)) if w.kind == "glean-official" else cls.load(path)
    path = weights_file(name_or_path)
    ckpt = load_file(path)
    meta = ckpt["metadata"] if isinstance(ckpt.get("metadata"), dict) else ckpt
    if meta.get("format") == "glean":
        return cls.load(ckpt, source=str(path))
    if meta.get("format") == "glean-train" and isinstance(ckpt.get("model"), dict):   # a train.py checkpoint
        return cls.load({"format": "glean", "config": ckpt.get("model_config"), "state_dict": ckpt["model"]},
                        source=str(path))
    sd = ckpt.get("state_dict", ckpt)
    if isinstance(sd, dict) and any(isinstance(k, str) and k.startswith("generator.") for k in sd):
        return cls.from_official(ckpt, weight_formats.official_config(named(sd, str(path)), str(path)),
                                 source=str(path))
    raise CheckpointError(f"{path}: not a GLEAN checkpoint (neither this project's format nor an official release "
                          f"file with 'generator.' keys)")


def load_bank(name_or_path, *, progress: bool = True) -> stylegan2.Generator:
    """A StyleGAN2 generator (a latent bank) from a registered name or a file of any format stylegan2 reads."""
    if name_or_path in WEIGHTS and not WEIGHTS[name_or_path].kind.startswith("stylegan2"):
        raise ValueError(f"'{name_or_path}' is a GLEAN model, not a latent bank")
    return weight_formats.load_generator(weights_file(name_or_path, progress))
