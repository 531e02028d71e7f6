# %% [markdown]
# # Chapter 7. Evaluation, and the framing lesson
#
# The paper evaluates fidelity with PSNR (Table 2) and identity with the cosine similarity of face-recognition
# embeddings of output and ground truth (Table 1, ArcFace). `evaluate.py` implements both (PSNR and SSIM on 8-bit
# values, on RGB and on luma Y; identity with dlib's face-recognition network, CC0 weights, offline). This
# chapter scores the shipped model against bicubic upscaling, and then shows how much the result depends on
# something no metric mentions: how the faces are **framed**.
#
# Faces: the first 32 LFW faces when the research data are present (their figures go to `$COURSE_OUT` only),
# otherwise 32 samples of the shipped bank. Identity needs `pip install dlib-bin face_recognition_models`
# (the `identity` extra); without it the chapter skips identity and says so.

# %%
# Make the repository importable: as a script this file sits in course/, one level below glean.py; as a notebook
# (no __file__) the working directory is course/ or the repository root.
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
ROOT = HERE if (HERE / "glean.py").is_file() else HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "course")]

import matplotlib.pyplot as plt
import torch

import evaluate
import images
import lesson
import zoo

torch.set_grad_enabled(False)

# %% [markdown]
# ## 1. Bicubic vs GLEAN at the model's framing
#
# The shipped model was fine-tuned on CelebA photos cropped the way LFW's 128x128 crops frame a face (face about
# 60% of the width, weights/MODEL_CARD.md), so for LFW "the model's framing" is the whole crop resized to 64 px.
# For the bank's samples (CelebA centre squares) it is the box `lesson.BANK_MODEL_BOX` inside each sample.

# %%
n = 32
model = zoo.load_pretrained("glean_face_small_8x", fast=False)
whole, source = lesson.faces(n, size=128 if lesson.face_folder() is not None else 64, whole=True)
print(f"SOURCE {source}: {lesson.describe_source(source, n)}")
S = whole.shape[-1]
model_box = (0, 0, S) if source != "bank" else lesson.BANK_MODEL_BOX    # (left, top, side) of the model's framing

try:
    identity = evaluate.DlibIdentity()
except ImportError as e:
    identity = None
    print(f"identity similarity skipped: dlib or face_recognition_models not installed ({e})")


def framed(frac: float) -> tuple:
    """Ground truths [n, 3, 64, 64] in [-1, 1]: the square of side frac x the model box's side, on the same centre,
    (moved to lie inside the image), resized to 64 px with MATLAB's bicubic; and the box used."""
    left, top, side = model_box
    cx, cy, s = left + side / 2, top + side / 2, min(round(side * frac), S)
    x0, y0 = min(max(0, round(cx - s / 2)), S - s), min(max(0, round(cy - s / 2)), S - s)
    crop = whole[..., y0:y0 + s, x0:x0 + s]
    return (crop if s == 64 else images.imresize(crop, size=64).clamp(-1, 1)), (x0, y0, s)


METRICS = {"psnr": evaluate.psnr, "psnr_y": evaluate.psnr_y, "ssim": evaluate.ssim}


def score(y: torch.Tensor, metrics=tuple(METRICS), with_identity: bool = True) -> tuple:
    """Per-image metrics of bicubic and GLEAN against y, from the LR image made as in training; and the outputs."""
    x = images.imresize(y, size=8)
    methods = {"bicubic": images.imresize(x, size=64).clamp(-1, 1), "glean": model(x).clamp(-1, 1)}
    res = {name: {m: METRICS[m](out, y) for m in metrics} for name, out in methods.items()}
    if with_identity and identity is not None:
        e_y = identity.embed(y)                                            # embed the ground truth once
        for name, out in methods.items():
            res[name]["identity"] = torch.nn.functional.cosine_similarity(identity.embed(out), e_y, dim=1)
    return res, methods


y, box = framed(1.0)
res, methods = score(y)
for metric in res["glean"]:
    b, g = res["bicubic"][metric].mean().item(), res["glean"][metric].mean().item()
    print(f"{metric:9s} bicubic {b:.4f}   GLEAN {g:.4f}")
    lesson.result(f"bicubic_{metric}", b, ".4f")
    lesson.result(f"glean_{metric}", g, ".4f")
gain = res["glean"]["psnr"] - res["bicubic"]["psnr"]
lesson.result("psnr_gain", gain.mean(), ".2f")
lesson.result("fraction_of_faces_improved", (gain > 0).double().mean(), ".3f")

fig, ax = plt.subplots(figsize=(5, 2.6))
ax.hist(gain.numpy(), bins=16, color="C0")
ax.axvline(0, color="k", lw=1)
ax.set_xlabel("PSNR gain of GLEAN over bicubic (dB), per face")
ax.set_ylabel("faces")
lesson.save_figure(fig, "07_gain_histogram.png")

# %% [markdown]
# PSNR and SSIM reward closeness pixel by pixel; identity asks whether a face-recognition network, which ignores
# most pixel errors, sees the same person. On LFW, GLEAN improves on bicubic in every metric, PSNR on every face
# (the histogram), identity by about 0.02 (the model card's 300 faces: 0.889 vs 0.872). On the bank's samples PSNR
# and SSIM improve too (PSNR on every face, by more than a dB on average), identity does not: dlib's network was
# trained on photographs, and how it embeds the small bank's odd synthetic faces says little about whether GLEAN
# kept "the same person". There the "ground truths" are the bank's own drawings, and GLEAN's outputs can look more
# like a face than they do.
#
# ## 2. The framing lesson
#
# Now the same faces, framed differently: the square around the same centre with 85%, 70% or 50% of the side (the
# face fills more of the picture, "cropped tighter"), and, where the picture has room (the bank's samples), a
# looser one (123%). Each framing is resized to 64 px and put through the same protocol.

# %%
fractions = ([1.23] if source == "bank" else []) + [1.0, 0.85, 0.7, 0.5]
gains, id_gains, examples = {}, {}, []
for frac in fractions:
    y_f, box = framed(frac)
    if frac == 1.0:
        r, m = res, methods                                               # section 1's numbers
    else:                                                                 # identity costs ~0.05 s per image:
        r, m = score(y_f, metrics=("psnr",), with_identity=frac == 0.5)   # at 50% only
    g = (r["glean"]["psnr"] - r["bicubic"]["psnr"]).mean().item()
    gains[frac] = g
    tag = f"{round(frac * 100)}"
    lesson.result(f"framing{tag}_bicubic_psnr", r["bicubic"]["psnr"].mean(), ".2f")
    lesson.result(f"framing{tag}_glean_psnr", r["glean"]["psnr"].mean(), ".2f")
    lesson.result(f"framing{tag}_psnr_gain", g, ".2f")
    if "identity" in r["glean"]:
        id_gains[frac] = (r["glean"]["identity"] - r["bicubic"]["identity"]).mean().item()
        lesson.result(f"framing{tag}_identity_gain", id_gains[frac], ".4f")
    print(f"framing {frac:4.2f} (box {box}): bicubic {r['bicubic']['psnr'].mean():.2f} dB, "
          f"GLEAN {r['glean']['psnr'].mean():.2f} dB, gain {g:+.2f} dB")
    examples.append((frac, y_f[0], m["bicubic"][0], m["glean"][0]))

rows = [[gt, bic, out] for _, gt, bic, out in examples]
fig = lesson.image_grid(rows, ["ground truth", "bicubic", "GLEAN"], [f"framing {f:.2f}" for f, *_ in examples])
lesson.save_figure(fig, "07_framings.png")

fig, ax = plt.subplots(figsize=(5.5, 3))
ax.plot(fractions, [gains[f] for f in fractions], "o-", label="PSNR gain (dB, left axis)")
ax.axhline(0, color="k", lw=1, label="no gain (both axes)")
ax.set_xlabel("side of the crop / side of the model's framing")
ax.set_ylabel("GLEAN - bicubic, PSNR (dB)")
ax.invert_xaxis()
ax.set_title(f"{source}: tighter framing to the right")
handles, labels = ax.get_legend_handles_labels()
if id_gains:
    ax2 = ax.twinx()
    ax2.plot(list(id_gains), list(id_gains.values()), "s--", color="C3", label="identity gain (right axis)")
    ax2.axhline(0, color="C3", lw=0.5, ls=":")
    lim = max(abs(v) for v in id_gains.values()) * 1.3
    ax2.set_ylim(-lim, lim)                                   # the identity axis centred on its zero line
    ax.set_ylim(-max(gains.values()) * 1.3, max(gains.values()) * 1.3)   # and the PSNR axis on its own
    ax2.set_ylabel("GLEAN - bicubic, identity", color="C3")
    handles += ax2.get_legend_handles_labels()[0]
    labels += ax2.get_legend_handles_labels()[1]
ax.legend(handles, labels, fontsize=7, loc="lower left")
lesson.save_figure(fig, "07_gain_vs_framing.png")

# %% [markdown]
# On LFW the gain is largest at the model's framing and shrinks steadily as the crop tightens: at 50% GLEAN is
# only a fraction of a dB ahead of bicubic, and its identity advantage is gone. The faces did not change, and
# bicubic actually gets *easier* (a tighter crop resized to 64 px has less fine detail per pixel), but GLEAN's
# prior is a prior on faces **framed as in training**: where eyes, mouth and hairline sit in the 8x8 grid. A
# tighter crop puts them where the model expects nothing of the kind.
#
# On the bank's samples the curve has the same shape around the model's framing, with one twist: the whole
# sample (framing 1.23, a CelebA centre square) is *looser* than the model's framing, and there the gain is lower
# too. That is the model card's story in one curve: the same model, before it was fine-tuned at LFW's framing,
# gained +2.0 dB on CelebA centre squares but only +0.7 dB on LFW.
#
# The lesson for reading (and writing) results: a face-SR number means little without the crop protocol. Two
# papers that align and crop faces differently are not on the same benchmark, and a model can look better or
# worse than it is by a dB or more, on the very same photographs.
#
# ## Exercises
#
# 1. Off-centre framing: shift the model's box by 10% of its side to the left (keep the size). Does a shift hurt
#    as much as a 70% crop?
# 2. Compute the gains with `evaluate.psnr_y` (luma only, the usual SR convention) instead of RGB PSNR. Does the
#    framing trend change?
# 3. The model card fitted the training crop box to LFW's average face. Using the bank's samples only, fit the box
#    (left, top, side) that maximises GLEAN's PSNR gain (a coarse grid is enough). How close is it to
#    `lesson.BANK_MODEL_BOX`?
