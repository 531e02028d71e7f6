# %% [markdown]
# # Chapter 4. Bank and decoder, eq. (3)-(4)
#
# Chapter 3 produced the encoder features f_i and the latent vectors C. Now the rest of GLEAN (Sec. 3.2-3.3):
#
# - **eq. (3)**, the latent bank: g_0 = S_0(c_0, f_N), g_i = S_i(c_i, g_{i-1}, f_{N-i}). Each S_i is a style block
#   of the frozen StyleGAN2 (chapter 2) "augmented" with one extra convolution that fuses the encoder feature of
#   the same resolution into the bank's feature. In `glean.GLEAN.forward`, S_i is `style_block(i, ...)` (the
#   bank's layers: `conv1` for S_0, `convs[2i - 2]` and `convs[2i - 1]` for S_i) followed, where an encoder feature
#   of that size exists, by `fuse(i, ...)`: the extra conv `fusion_out[i]` on [h, f_{N-i}].
# - **eq. (4)**, the decoder: d_0 = D_0(f_0), d_i = D_i(d_{i-1}, g): each D_i is a 3x3 conv + pixel-shuffle that
#   doubles the resolution, taking the previous decoder output concatenated with the bank feature of the same
#   resolution; the last block outputs the image.
#
# We run the shipped model (`glean_face_small_8x`, 8x8 -> 64x64 faces) on faces, watch g_i and d_i through forward
# hooks, and then knock out one input at a time to see what each contributes.

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
# ## 1. The shipped model on the astronaut
#
# The ground truth y is the 64x64 face crop of scikit-image's public-domain astronaut; the LR input x is made the
# way the model was trained (MATLAB's bicubic, chapter 1). Bicubic upscaling of x is the baseline.

# %%
model = zoo.load_pretrained("glean_face_small_8x", fast=False)   # the reference glean.GLEAN, eval mode
bank, cfg = model.bank, model.cfg
y_astro = lesson.astronaut()[None]                                 # [1, 3, 64, 64] in [-1, 1]
x_astro = images.imresize(y_astro, size=cfg.in_size)               # [1, 3, 8, 8]
out_astro = model(x_astro)
lesson.result("astronaut_psnr_glean", evaluate.psnr(out_astro, y_astro).item(), ".2f")
lesson.result("astronaut_psnr_bicubic", evaluate.psnr(images.imresize(x_astro, size=64), y_astro).item(), ".2f")

# %% [markdown]
# ## 2. Watching g_i and d_i
#
# The reference forward keeps f and g in local lists, so we read them with forward hooks. For the shipped model
# (in_size 8, so N = 1: f_0 at 8 px, f_1 at 4 px):
#
# - g_i, at 4 * 2^i px, is the output of S_i: of its extra conv `fusion_out[i]` where it fuses an encoder feature
#   (g_0 with f_1, g_1 with f_0), otherwise of its last style layer `bank.convs[2i - 1]` (g_2 .. g_4);
# - d_i is the output of `decoder[i]`.

# %%
def capture(model, x) -> tuple:
    """model(x) and the maps {name: tensor} that the hooks saw."""
    seen, hooks = {}, []
    put = lambda name: (lambda mod, args, out: seen.__setitem__(name, out))
    for i in range(len(model.bank.resolutions) + 1):
        layer = model.bank.conv1 if i == 0 else model.bank.convs[2 * i - 1]    # S_i's last style layer
        source = model.fusion_out[i] if i < len(model.fusion_out) else layer     # S_i's output
        hooks.append(source.register_forward_hook(put(f"g_{i}")))
    for i, D in enumerate(model.decoder):
        hooks.append(D.register_forward_hook(put(f"d_{i}")))
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


out, maps = capture(model, x_astro)
torch.testing.assert_close(out, out_astro, rtol=0, atol=0)     # hooks that only look change nothing
for name, t in maps.items():
    print(f"{name:10s} {list(t.shape)}")
lesson.result("num_g_maps", sum(name.startswith("g_") for name in maps), ".0f")
lesson.result("num_d_maps", sum(name.startswith("d_") for name in maps), ".0f")


def pca_rgb(feat: torch.Tensor) -> torch.Tensor:
    """A feature map [C, H, W] as an image [3, H, W] in [-1, 1]: its first three principal components over channels."""
    C, H, W = feat.shape
    X = feat.reshape(C, H * W).T.double()                        # [HW, C]
    X = X - X.mean(0)
    _, _, V = torch.linalg.svd(X, full_matrices=False)
    P = X @ V[:3].T                                              # [HW, 3]
    P = P / (P.abs().amax(0) + 1e-12)
    return P.T.reshape(3, H, W).float()


names = [n for n in maps if n.startswith("g_")] + [n for n in maps if n.startswith("d_")]
fig, axes = plt.subplots(1, len(names) + 1, figsize=(1.6 * (len(names) + 1), 2.1))
axes[0].imshow(lesson.as_image(x_astro[0]), interpolation="nearest")
axes[0].set_title("x (8x8)", fontsize=8)
for ax, name in zip(axes[1:], names):
    t = maps[name][0]
    ax.imshow(lesson.as_image(pca_rgb(t) if t.shape[0] > 3 else t), interpolation="nearest")
    ax.set_title(f"{name}\n{t.shape[0]}x{t.shape[1]}x{t.shape[2]}", fontsize=7)
for ax in axes:
    ax.set_xticks([]), ax.set_yticks([])
lesson.save_figure(fig, "04_g_and_d.png")

# %% [markdown]
# Features are shown by their first three principal components (as RGB). The bank's maps grow from a 4x4 layout to
# 64 px detail; the decoder's d_i follow them, one resolution behind: d_0 (16 px) is computed from f_0 alone, d_1
# (32 px) from [d_0, g_2] (16 px), and so on, until the last block turns [d_2, g_4] (64 px) into RGB. Note what eq.
# (4) does *not* use: the bank's own RGB output (its toRGB layers are never run) and the bank's features at 4 and 8
# px (g_0, g_1), which reach the decoder only through the bank's later blocks. The 2x2 checkerboard in the d_i maps
# is the pixel-shuffle's signature: each of the four sub-pixel positions comes from its own group of conv filters.
#
# ## 3. What each input contributes: zero one out
#
# A forward *pre*-hook can rewrite a module's input. To remove one connection from the trained model we zero its
# channels where it enters a convolution, for a batch of faces, and measure the PSNR drop against the intact
# model. (Zero is a crude stand-in for "absent"; see exercise 1.) The faces are LFW photographs when the research
# data are present; otherwise (a fresh clone) they are samples of the shipped bank: there the "ground truths" are
# synthetic faces the bank itself drew, often odd ones, and GLEAN's outputs can look more like a face than the
# ground truth does. A PSNR against them measures closeness to a generated image, not the restoration of a photo.

# %%
n = 16
y, source = lesson.faces(n)
print(f"SOURCE {source}: {lesson.describe_source(source, n)}")
x = images.imresize(y, size=cfg.in_size)
full = evaluate.psnr(model(x), y).mean().item()
bicubic = evaluate.psnr(images.imresize(x, size=64), y).mean().item()
lesson.result("faces_psnr_glean", full, ".2f")
lesson.result("faces_psnr_bicubic", bicubic, ".2f")


def zero_channels(part: str):
    """A pre-hook zeroing part of a conv's concatenated input: 'first' half, 'second' half or 'all'."""
    def hook(module, args):
        (inp,) = args
        c = inp.shape[1] // 2
        inp = inp.clone()
        if part == "all":
            inp.zero_()
        else:
            inp[:, c:] = 0 if part == "second" else inp[:, c:]
            inp[:, :c] = 0 if part == "first" else inp[:, :c]
        return (inp,)
    return hook


def batch_mean(module, args, out):
    """A forward hook replacing E_{N+1}'s output, C, by its mean over the batch: no image-specific latent vectors."""
    return out.mean(0, keepdim=True).expand_as(out)


N = model.N                                    # 1: f_0 at 8 px, f_1 at 4 px
knockouts = {                                  # name: (module, hook kind, hook, RESULT key)
    "f_1 (4 px) into S_0": (model.fusion_out[0], "pre", zero_channels("second"), "f4"),   # fusion_out[i]: [h, f]
    "f_0 (8 px) into S_1": (model.fusion_out[1], "pre", zero_channels("second"), "f8"),
    "C (batch mean)": (model.encoder[-1], "post", batch_mean, "C_mean"),
    "f_0 into D_0": (model.decoder[0], "pre", zero_channels("all"), "d0"),
    **{f"g_{N + i} ({8 * 2 ** i} px) into D_{i}": (model.decoder[i], "pre", zero_channels("second"),   # [d, g]
                                                  f"g{8 * 2 ** i}") for i in range(1, len(model.decoder))},
}
panels = {"ground truth": y[:4], "bicubic": images.imresize(x[:4], size=64), "GLEAN": model(x[:4])}
for name, (module, kind, hook, key) in knockouts.items():
    h = module.register_forward_pre_hook(hook) if kind == "pre" else module.register_forward_hook(hook)
    try:
        out = model(x)
    finally:
        h.remove()
    drop = full - evaluate.psnr(out, y).mean().item()
    print(f"without {name:24s} PSNR drop {drop:+.2f} dB")
    lesson.result(f"drop_{key}", drop, ".2f")
    panels[f"no {name}"] = out[:4]

rows = [[panels[k][i] for k in panels] for i in range(4)]
fig = lesson.image_grid(rows, [k.replace(" into ", "\ninto ") for k in panels], size=1.25)
lesson.save_figure(fig, "04_knockouts.png")

# %% [markdown]
# What the numbers say about this model (the printed drops; the ranges below hold for LFW faces and for the bank's
# samples, and the exact values depend on the faces):
#
# - **f_0 into D_0** is the backbone: without the encoder-decoder skip the output collapses (over 5 dB). The paper
#   notes it (Sec. 3.3: the skip lets "the latent bank focus more on the texture and detail generation").
# - **Encoder features into the bank** (eq. 3): the finest one, f_0 at 8 px, matters (about a dB); f_1 at 4 px
#   hardly does (under 0.3 dB either way), because its information also reaches the bank through f_0 and C.
# - **Bank features into the decoder** (eq. 4): each of g_2, g_3, g_4 (16, 32, 64 px) is worth between a tenth of
#   a dB and a little over one; the decoder leans on the bank at every resolution.
# - **C, the latent vectors**, replaced by their batch mean cost little (under half a dB): in this small model the
#   image-specific content travels through the spatial features, not the style vectors. That is the paper's point
#   about GAN inversion (Sec. 2 and Fig. 7): a few vectors cannot carry an image's spatial detail.
#
# These are knock-outs of a model trained with every connection, which measure how much it *relies* on each one.
# The paper's ablations retrain without the connection (chapter 5).
#
# ## 4. The fast path computes the same function
#
# `glean_fast.GLEANFast` (what `infer.py`, `demo.py` and `torch.hub` use) runs the same weights through faster
# code: strips, channels-last layout, sliced convolutions. On the same faces:

# %%
fast = zoo.load_pretrained("glean_face_small_8x", fast=True)
lesson.result("fast_vs_reference_maxdiff", (fast(x) - model(x)).abs().max(), ".2e")

# %% [markdown]
# ## Exercises
#
# 1. Replace "zero" by "the batch mean of that input" for the g and f knock-outs (as done for C). Which drops
#    shrink, and what does that tell you about reading knock-out numbers?
# 2. GLEAN with a decoder never runs the bank's toRGB layers. Build the Fig. 9 variant on the shipped weights
#    (chapter 5's `switched(model, use_decoder=False)`) and call it: `GLEAN.bank_image` runs them on each S_i's
#    layers. Does the bank, conditioned by this encoder (trained for a decoder), draw a face?
# 3. Knock out two bank features together (g_3 and g_4). Is the drop the sum of the single drops?
