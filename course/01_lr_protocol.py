# %% [markdown]
# # Chapter 1. The low-resolution protocol
#
# A super-resolution network never sees "a small image": it sees small images made by one particular operator
# from large ones, and it learns to undo *that operator*. The released GLEAN models were trained on LR images made
# with MATLAB's `imresize(hr, 1/s, 'bicubic')` (the official data folders `BIx8_down`, `BIx16_down`: "BI" for
# MATLAB bicubic), and so was this project's shipped model (`images.imresize`: `train.py` makes every LR image with
# it). This chapter asks what that operator
# does, how the resizers people reach for (Pillow, OpenCV, `torch.nn.functional.interpolate`) differ from it, and
# what happens when the shipped model gets an LR image made by another one.
#
# Run it as a script (`python course/01_lr_protocol.py`) or as a notebook (see course/README.md). It prints every
# number it discusses as `RESULT name = value` and writes its figures to `$COURSE_OUT` (default `course/out/`).

# %%
# Make the repository importable: as a script this file sits in course/, one level below glean.py; as a notebook
# (no __file__) the working directory is course/ or the repository root.
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
ROOT = HERE if (HERE / "glean.py").is_file() else HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "course")]

import math

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate
import images
import lesson
import zoo

torch.set_grad_enabled(False)                # inference only in this chapter

# %% [markdown]
# ## 1. MATLAB's bicubic, written as a matrix
#
# Resizing along one axis is a matrix: LR row = M @ HR row, with M of shape [out, in]. `images.resize_matrix`
# builds MATLAB's: output pixel x (1-based) samples the input at u = x / scale + (1 - 1/scale) / 2, weighted by
# Keys' cubic kernel (a = -0.5). The key word is **antialiased**: when shrinking (scale < 1) MATLAB stretches the
# kernel by 1/scale, so at 8x each LR pixel is a weighted average over a window 4 x 8 = 32 HR pixels wide, a
# low-pass filter applied before sampling. Without it (OpenCV's `INTER_CUBIC`, torch's default) each LR pixel
# is interpolated from the 4 HR pixels nearest to its centre and everything in between is ignored.

# %%
M_aa = images.resize_matrix(64, 8, 1 / 8, antialias=True)      # [8, 64] float64: MATLAB, 64 -> 8
M_plain = images.resize_matrix(64, 8, 1 / 8, antialias=False)  # the same kernel, not stretched
row = 3                                                          # one LR pixel, away from the borders
taps_aa = int((M_aa[row].abs() > 1e-12).sum())
taps_plain = int((M_plain[row].abs() > 1e-12).sum())
lesson.result("taps_antialiased", taps_aa, ".0f")
lesson.result("taps_plain", taps_plain, ".0f")
lesson.result("rows_sum_to_one_maxerr", (M_aa.sum(1) - 1).abs().max(), ".2e")

fig, ax = plt.subplots(figsize=(7, 2.6))
ax.stem(np.arange(64), M_aa[row].numpy(), linefmt="C0-", markerfmt="C0o", basefmt="k-", label="MATLAB (antialiased)")
ax.stem(np.arange(64) + 0.25, M_plain[row].numpy(), linefmt="C3-", markerfmt="C3s", basefmt="k-",
        label="plain bicubic (OpenCV, torch default)")
ax.set_xlabel("HR pixel (64 px row)")
ax.set_ylabel(f"weight of LR pixel {row}")
ax.set_title("One LR pixel of a 64 -> 8 resize: which HR pixels it sees")
ax.legend(fontsize=8)
lesson.save_figure(fig, "01_kernels.png")

# %% [markdown]
# ## 2. Aliasing, on a zone plate
#
# A zone plate, cos(pi r^2 / N), has a local frequency that grows with the radius r: r / N cycles per pixel. At 8x
# the LR grid can only hold frequencies below 1/16 cycle per HR pixel (its Nyquist limit), i.e. the rings inside
# r = N / 16. Everything outside should become flat grey in the LR image. An antialiased resize does that; a plain
# one folds the fine rings back as coarse, false rings (moire), which are indistinguishable from real structure.

# %%
N = 256
yy, xx = torch.meshgrid(torch.arange(N) - N / 2 + 0.5, torch.arange(N) - N / 2 + 0.5, indexing="ij")
zone = (0.5 + 0.5 * torch.cos(math.pi * (xx ** 2 + yy ** 2) / N)).double()   # [256, 256] in [0, 1]


def pil_bicubic(img: torch.Tensor, size: int) -> torch.Tensor:
    """Pillow's bicubic on 8-bit images, as almost everyone calls it: [3, H, W] or [H, W] in [0, 1]."""
    a = (img.clamp(0, 1) * 255).round().byte()
    a = a.permute(1, 2, 0).numpy() if a.ndim == 3 else a.numpy()
    out = np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC), dtype=np.float64) / 255
    return torch.from_numpy(out).permute(2, 0, 1) if out.ndim == 3 else torch.from_numpy(out)


def torch_bicubic(img: torch.Tensor, size: int, antialias: bool) -> torch.Tensor:
    """torch's bicubic (a = -0.75; antialias=False by default), [..., H, W]."""
    shape = img.shape
    out = F.interpolate(img.reshape(-1, 1, *shape[-2:]), size=size, mode="bicubic", align_corners=False,
                        antialias=antialias)
    return out.reshape(*shape[:-2], size, size)


try:
    import cv2                               # opencv-python-headless (in the dev extra); optional here
except ImportError:
    cv2 = None
    print("OpenCV not installed: its INTER_CUBIC is the same non-antialiased resize as torch's default")


def cv2_bicubic(img: torch.Tensor, size: int) -> torch.Tensor:
    a = (img.clamp(0, 1) * 255).round().byte()
    a = a.permute(1, 2, 0).numpy() if a.ndim == 3 else a.numpy()
    out = cv2.resize(a, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.float64) / 255
    return torch.from_numpy(out).permute(2, 0, 1) if out.ndim == 3 else torch.from_numpy(out)


zone_lr = {"MATLAB (images.imresize)": images.imresize(zone, size=32),
           "Pillow BICUBIC": pil_bicubic(zone, 32),
           "torch bicubic": torch_bicubic(zone, 32, antialias=False)}
if cv2 is not None:
    zone_lr["OpenCV INTER_CUBIC"] = cv2_bicubic(zone, 32)
R = torch.sqrt(((torch.arange(32) - 15.5) ** 2)[:, None] + ((torch.arange(32) - 15.5) ** 2)[None]) * 8  # HR radius
beyond = (R > 3 * N / 16) & (R < 0.47 * N)   # rings at 3x to 7.5x the LR Nyquist frequency: should be flat grey
for name, key in (("matlab", "MATLAB (images.imresize)"), ("pil", "Pillow BICUBIC"), ("torch_plain", "torch bicubic")):
    lesson.result(f"alias_std_{name}", zone_lr[key][beyond].std(), ".4f")

fig, axes = plt.subplots(1, 1 + len(zone_lr), figsize=(2.2 * (1 + len(zone_lr)), 2.5))
axes[0].imshow(zone.numpy(), cmap="gray", vmin=0, vmax=1)
axes[0].set_title("HR zone plate, 256 px", fontsize=8)
for ax, (name, lr) in zip(axes[1:], zone_lr.items()):
    ax.imshow(lr.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"{name}\n-> 32 px", fontsize=8)
for ax in axes:
    ax.set_xticks([]), ax.set_yticks([])
lesson.save_figure(fig, "01_zone_plate.png")

# %% [markdown]
# The standard deviation over the rings that the LR grid cannot hold is the aliasing that got through: about 0
# for MATLAB and Pillow, of the order of the pattern's own contrast for a plain bicubic.
#
# ## 3. The resizers on faces
#
# Now the images the model is for. Ground truths y are 64x64 faces (LFW when the research data are present,
# otherwise faces sampled from the shipped latent bank, synthetic faces the bank itself drew: see `lesson.faces`),
# and each resizer makes an 8x8 LR image x from them. How far is each LR image from MATLAB's (PSNR on 8-bit values,
# higher = closer)?

# %%
n = 32
y, source = lesson.faces(n)                                      # [n, 3, 64, 64] in [-1, 1]
print(f"SOURCE {source}: {lesson.describe_source(source, n)}")
y01 = (y + 1) / 2                                                # [0, 1] for the 8-bit resizers

lrs = {"matlab": images.imresize(y01, size=8),                  # what the model was trained on
       "pil": torch.stack([pil_bicubic(im, 8) for im in y01]).float(),
       "torch_aa": torch_bicubic(y01, 8, antialias=True),
       "torch_plain": torch_bicubic(y01, 8, antialias=False)}
if cv2 is not None:
    lrs["cv2"] = torch.stack([cv2_bicubic(im, 8) for im in y01]).float()
lrs = {k: v.clamp(0, 1) * 2 - 1 for k, v in lrs.items()}         # back to [-1, 1], as the network expects
for name, lr in lrs.items():
    if name != "matlab":
        lesson.result(f"lr_psnr_{name}_vs_matlab", evaluate.psnr(lr, lrs["matlab"]).mean(), ".2f")

# %% [markdown]
# Pillow is close to MATLAB, and that is no accident: Pillow's `resize` also stretches its kernel when shrinking
# (it is antialiased) and also uses a = -0.5. Where do the two differ? Run Pillow on float images (mode "F", so no
# 8-bit rounding) and compare the interior and the border rows separately:

# %%
def pil_float(img: torch.Tensor, size: int) -> torch.Tensor:
    """Pillow's bicubic on one float channel (mode 'F'): [H, W] -> [size, size]."""
    im = Image.fromarray(img.numpy().astype(np.float32), mode="F")
    return torch.from_numpy(np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.float64))


mat255 = images.imresize(y01.double(), size=8) * 255                         # [n, 3, 8, 8], 8-bit scale
pilf255 = torch.stack([torch.stack([pil_float(c * 255, 8) for c in im]) for im in y01.double()])
diff = (pilf255 - mat255).abs()
lesson.result("pil_float_interior_maxdiff", diff[..., 2:-2, 2:-2].max(), ".2e")    # in 8-bit units
lesson.result("pil_float_border_meandiff", diff[..., 0, :].mean(), ".3f")

# %% [markdown]
# In the interior the two are the same operator (differences of 1e-5 of a grey level: float32 rounding). At the
# borders the kernel reaches outside the image: MATLAB mirrors the image there ('symmetric' padding), Pillow drops
# the outside taps and renormalises the rest. With 8-bit rounding on top, that is the whole difference.
#
# ## 4. Why the released models need the former
#
# Feed each LR version to the shipped model (`glean_face_small_8x`, 8x8 -> 64x64, the reference `glean.GLEAN`) and
# score against the ground truth. Bicubic upscaling of the same LR image (MATLAB's, `images.imresize`) is the
# baseline.

# %%
model = zoo.load_pretrained("glean_face_small_8x", fast=False)  # the reference implementation, eval mode
outputs = {}
for name, lr in lrs.items():
    outputs[name] = model(lr).clamp(-1, 1)                       # [n, 3, 64, 64]
    glean_db = evaluate.psnr(outputs[name], y).mean()
    bicubic_db = evaluate.psnr(images.imresize(lr, size=64).clamp(-1, 1), y).mean()
    lesson.result(f"glean_psnr_{name}", glean_db, ".2f")
    lesson.result(f"bicubic_psnr_{name}", bicubic_db, ".2f")
    lesson.result(f"glean_gain_{name}", glean_db - bicubic_db, ".2f")

show = list(lrs)
rows = [[y[i], lrs["matlab"][i], lrs["torch_plain"][i]] + [outputs[k][i] for k in show]   # the LR as 8x8 blocks
        for i in range(4)]
fig = lesson.image_grid(rows, ["ground truth", "LR: MATLAB", "LR: torch plain"] + [f"GLEAN <- {k}" for k in show])
lesson.save_figure(fig, "01_glean_on_each_lr.png")

# %% [markdown]
# Read the numbers:
#
# - **Antialiased resizers (MATLAB, Pillow, torch with `antialias=True`)** give the model essentially the same
#   input, and it gains over bicubic upscaling. Pillow's border handling and 8-bit rounding cost
#   about a tenth of a dB.
# - **Plain bicubic (OpenCV `INTER_CUBIC`, torch's default)** gives an aliased LR image: the model loses several
#   dB and ends up *below* bicubic upscaling of the very same input. The network has learnt to invert a low-pass
#   filter followed by sampling; on an aliased input it sharpens aliasing into false detail.
#
# So "bicubic" is not a protocol: the kernel, its antialiasing, the pixel-centre convention and the border rule
# all are. When you evaluate or deploy a released SR model, make its LR inputs exactly as its training data were
# made (here: `images.imresize`, or at least an antialiased resize), and when you compare numbers between papers,
# check that they used the same operator.
#
# ## Exercises
#
# 1. `cv2.INTER_AREA` averages boxes of 8x8 pixels: antialiased, but with a different kernel. Add it to `lrs`.
#    Where does its LR land between MATLAB's and the plain bicubic, and what does the model make of it?
# 2. Real photos are not only downscaled: add JPEG compression (Pillow, quality 50) to MATLAB's LR images and
#    measure the model again. Which of the official models in `zoo.WEIGHTS` was trained for that (and how, in
#    `train_data.degrade`)?
# 3. `images.resize_matrix` mirrors taps that fall outside the image. Build a variant that drops and
#    renormalises them like Pillow, and check that it reproduces `pil_float` at the borders too.
