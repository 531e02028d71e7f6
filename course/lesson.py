"""What every chapter of the course shares, kept small so the chapters show everything about GLEAN itself:

- `out_dir()`: where figures go ($COURSE_OUT, default course/out/, which git ignores);
- `result(name, value)`: print a number as `RESULT name = value`, the line tests/test_course.py reads;
- `save_figure(fig, name)`: write a matplotlib figure there and print `FIGURE path`;
- `faces(n)`: face images the chapter can reach offline, as [n, 3, 64, 64] in [-1, 1], and where they came from;
- `astronaut()`: scikit-image's public-domain astronaut, the face crop, as [3, 64, 64] in [-1, 1];
- `as_image(t)`, `image_grid(rows, ...)`: tensors [3, H, W] in [-1, 1] as matplotlib images.

Faces: a folder named by $GLEAN_FACES, else the research set `shared/data/lfw_val_128/images` next to the repository
or above it, when present (LFW, 128x128: research use only, so nothing made from it is ever committed: figures of
it go to $COURSE_OUT only). Without it (a fresh clone elsewhere, or GLEAN_FACES=none) the faces are samples of the
shipped 64 px latent bank: synthetic, public to show, framed like the shipped model's training crops.
"""
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                # glean.py, images.py, ... live in the repository root
    sys.path.insert(0, str(ROOT))

import images  # noqa: E402
import zoo  # noqa: E402

LFW = Path("shared") / "data" / "lfw_val_128" / "images"          # 1000 LFW faces, 128x128, evaluation only
CELEBA = Path("shared") / "data" / "celeba_89x109" / "images"    # 10000 CelebA photos, what the model trained on

# The shipped model's framing inside a 64 px sample of its bank. The bank was trained on CelebA centre squares
# (89x89 of the 89x109 photos); the model was fine-tuned on the box (left 8, top 23, side 73) of those photos, which
# frames a face like LFW's crops (weights/MODEL_CARD.md). In the centre square that box is (8, 13, 73); at 64 px,
# (5.75, 9.35, 52.5): rounded, (6, 9, 52).
BANK_MODEL_BOX = (6, 9, 52)                  # (left, top, side) in a 64x64 bank sample


def out_dir() -> Path:
    """$COURSE_OUT, default course/out/ (git ignores it); created if missing."""
    d = Path(os.environ.get("COURSE_OUT") or ROOT / "course" / "out")
    d.mkdir(parents=True, exist_ok=True)
    return d


def result(name: str, value, fmt: str = ".4f") -> None:
    """Print one number the chapter discusses, in the form the course test parses."""
    print(f"RESULT {name} = {float(value):{fmt}}")


def in_notebook() -> bool:
    return "ipykernel" in sys.modules


def save_figure(fig, name: str) -> Path:
    """Save a matplotlib figure as $COURSE_OUT/name (PNG) and announce it; a script closes it, a notebook shows it."""
    import matplotlib.pyplot as plt
    path = out_dir() / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"FIGURE {path}")
    if not in_notebook():
        plt.close(fig)
    return path


def as_image(t: torch.Tensor):
    """[3, H, W] in [-1, 1] -> array [H, W, 3] in [0, 1] for imshow."""
    return ((t.detach().float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def image_grid(rows: list, col_titles: list, row_titles: list | None = None, size: float = 1.3):
    """A figure of images: rows[i][j] is a tensor [3, H, W] in [-1, 1], shown without interpolation."""
    import matplotlib.pyplot as plt
    R, C = len(rows), len(rows[0])
    fig, axes = plt.subplots(R, C, figsize=(size * C, size * R + 0.3), squeeze=False)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            ax = axes[i][j]
            ax.imshow(as_image(img), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(col_titles[j], fontsize=8)
            if j == 0 and row_titles:
                ax.set_ylabel(row_titles[i], fontsize=8)
    fig.tight_layout()
    return fig


def astronaut(size: int = 64) -> torch.Tensor:
    """The face crop of scikit-image's public-domain astronaut photo (`images.example_image`), [3, size, size] in
    [-1, 1], resized with MATLAB's bicubic. Free to show in any figure."""
    import numpy as np
    a = np.array(images.example_image("astronaut"))                        # [140, 140, 3] uint8
    return images.square(torch.from_numpy(a).permute(2, 0, 1).float() / 255, size) * 2 - 1


def research_folder(rel: Path) -> Path | None:
    """shared/data/... (`rel`) in the repository's parent folder or above it, if present and not switched off by
    GLEAN_FACES=none (which makes every chapter use only what ships with the code)."""
    if os.environ.get("GLEAN_FACES", "").lower() == "none":
        return None
    return next((p / rel for p in ROOT.parents if (p / rel).is_dir()), None)


def face_folder() -> Path | None:
    """$GLEAN_FACES (a folder; 'none' forces the bank's samples), else the LFW research set when present, else None."""
    env = os.environ.get("GLEAN_FACES", "")
    if env and env.lower() != "none":
        if not Path(env).is_dir():
            raise FileNotFoundError(f"GLEAN_FACES={env} is not a folder (use GLEAN_FACES=none for the bank's samples)")
        return Path(env)
    return research_folder(LFW)


@torch.no_grad()
def bank_samples(n: int, seed: int = 0, box: tuple | None = BANK_MODEL_BOX) -> torch.Tensor:
    """n faces from the shipped bank (truncation 0.7), [n, 3, 64, 64] in [-1, 1]; cropped to `box` and resized
    back to 64 px with MATLAB's bicubic (None: the whole sample)."""
    G = zoo.load_bank("stylegan2_celeba_64")
    x = G.sample(n, seed=seed, truncation=0.7).clamp(-1, 1)
    if box is None:
        return x
    left, top, side = box
    return images.imresize(x[..., top:top + side, left:left + side], size=64).clamp(-1, 1)


def faces(n: int, size: int = 64, whole: bool = False) -> tuple:
    """n face images [n, 3, size, size] in [-1, 1] at the shipped model's framing, and the source's name:
    'lfw' (or 'folder' for $GLEAN_FACES): the first n images, centre square resized with MATLAB's bicubic;
    'bank': samples of the shipped bank cropped to BANK_MODEL_BOX (whole=True: the uncropped samples)."""
    folder = face_folder()
    if folder is None:
        x = bank_samples(n, box=None if whole else BANK_MODEL_BOX)
        return (x if size == 64 else images.imresize(x, size=size).clamp(-1, 1)), "bank"
    files = images.list_images(folder)[:n]
    if len(files) < n:
        raise FileNotFoundError(f"{folder} has {len(files)} images, the chapter needs {n}")
    x = torch.stack([images.square(images.read_rgb(f), size) for f in files]) * 2 - 1
    return x, ("lfw" if folder.parts[-2:] == LFW.parts[-2:] else "folder")


def describe_source(source: str, n: int) -> str:
    return {"lfw": f"the first {n} LFW faces of shared/data/lfw_val_128 (research use: figures stay in $COURSE_OUT)",
            "folder": f"the first {n} images of $GLEAN_FACES={os.environ.get('GLEAN_FACES')}",
            "bank": f"{n} samples of the shipped 64 px bank (synthetic faces, the bank's own drawings, as ground "
                    f"truths; no LFW found, or GLEAN_FACES=none)",
            }[source]
