# %% [markdown]
# # Chapter 3. The encoder, eq. (1)-(2)
#
# GLEAN's encoder (Sec. 3.1, Fig. 2) reads the LR image x and produces two things for the latent bank:
#
# - multi-resolution features: f_0 = E_0(x), an RRDBNet (ESRGAN's trunk, without upsampling) at the input
#   resolution, then **f_i = E_i(f_{i-1}), i = 1..N (eq. 1)**, each E_i a stride-2 convolution and a stride-1
#   convolution, halving the resolution down to f_N at 4x4;
# - **C = E_{N+1}(f_N) (eq. 2)**: a convolution and a fully-connected layer whose output is reshaped into the
#   matrix of latent vectors c_0 .. c_{k-1}, one per style layer of the bank.
#
# This chapter prints the shape of every f_i and of C for the shipped model (8 -> 64) and for the official
# configurations, the 32 -> 256 cat model of the paper's Fig. 2 and the 64 -> 1024 face model. The official ones
# are built on PyTorch's *meta* device: modules and tensors with shapes but no storage, so a 175 M-parameter model
# "runs" instantly and without its weights.

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

import glean
import images
import lesson
import zoo

torch.set_grad_enabled(False)

# %% [markdown]
# ## 1. The shipped model
#
# In `glean.GLEAN` the encoder is one `nn.ModuleList`: `encoder[0]` is E_0 (RRDBNet + a conv to the bank's width),
# `encoder[1..N]` are E_1..E_N, `encoder[-1]` is E_{N+1}. `GLEAN.forward` keeps the f_i in a local list, f[i], so
# to see them from outside we attach forward hooks that record each block's input and output.

# %%
model = zoo.load_pretrained("glean_face_small_8x", fast=False)   # reference implementation, eval mode
cfg = model.cfg
print(cfg)


def trace_encoder(model: glean.GLEAN, x: torch.Tensor) -> list:
    """Run model(x) and return, per encoder block, (name, input shape, output shape, parameters)."""
    rows, hooks = [], []
    last = len(model.encoder) - 1
    for i, block in enumerate(model.encoder):
        name = "E_0" if i == 0 else f"E_{i}" if i < last else f"E_{i} (= E_N+1)"
        hooks.append(block.register_forward_hook(
            lambda mod, args, out, name=name: rows.append(
                (name, tuple(args[0].shape), tuple(out.shape), sum(p.numel() for p in mod.parameters())))))
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    rows.append(("output", tuple(x.shape), tuple(out.shape), 0))
    return rows


x = images.imresize(lesson.astronaut()[None], size=cfg.in_size)                    # [1, 3, 8, 8] in [-1, 1]
rows = trace_encoder(model, x)
print(f"{'block':16s} {'input':22s} {'output':22s} params")
for name, shape_in, shape_out, n in rows:
    print(f"{name:16s} {str(shape_in):22s} {str(shape_out):22s} {n:,}")

N = len(model.encoder) - 2                   # E_1..E_N: stride-2 blocks from in_size down to 4x4
lesson.result("shipped_N", N, ".0f")
lesson.result("shipped_f0_channels", rows[0][2][1], ".0f")
lesson.result("shipped_f0_size", rows[0][2][-1], ".0f")
lesson.result("shipped_fN_size", rows[N][2][-1], ".0f")
lesson.result("shipped_C_rows", cfg.num_latents, ".0f")
lesson.result("shipped_C_cols", cfg.style_channels, ".0f")
assert rows[N + 1][2] == (1, cfg.num_latents * cfg.style_channels)   # E_{N+1}'s output, reshaped to C in forward

# %% [markdown]
# Two things to notice. N = log2(in_size / 4): an 8x8 input needs a single stride-2 block to reach 4x4. And the
# fully-connected layer of E_{N+1} outputs one flat vector, which `forward` reshapes into C, [B, k, 96] with
# k = 2 log2(out_size) - 2 = 10: one latent vector per style layer of the 64 px bank (chapter 2), from the 4x4
# features f_N alone.
#
# The feature maps themselves, for the public-domain astronaut: the mean absolute activation over channels of each
# f_i (left: the 8x8 LR input, as GLEAN sees it).

# %%
feats = {}
hooks = [b.register_forward_hook(lambda mod, a, out, i=i: feats.__setitem__(i, out)) for i, b in
         enumerate(model.encoder[:-1])]
model(x)
for h in hooks:
    h.remove()
fig, axes = plt.subplots(1, 1 + len(feats), figsize=(2.2 * (1 + len(feats)), 2.4))
axes[0].imshow(lesson.as_image(x[0]), interpolation="nearest")
axes[0].set_title("LR input x, 8x8", fontsize=8)
for ax, (i, f) in zip(axes[1:], feats.items()):
    ax.imshow(f[0].abs().mean(0).numpy(), cmap="viridis", interpolation="nearest")
    ax.set_title(f"f_{i}: {list(f.shape[1:])}", fontsize=8)
for ax in axes:
    ax.set_xticks([]), ax.set_yticks([])
lesson.save_figure(fig, "03_features.png")

# %% [markdown]
# ## 2. The official configurations, on the meta device
#
# `with torch.device("meta")` builds every parameter as a shape without storage (glean.py skips its random
# initialisation there), and a forward pass on a meta tensor propagates shapes through every operation. The same
# `trace_encoder` then prints the official models' shapes without downloading or allocating anything.

# %%
configs = {"shipped 8 -> 64": cfg,
           "cat 8x, 32 -> 256 (Fig. 2)": glean.GLEANConfig(in_size=32, out_size=256),
           "faces 16x, 64 -> 1024": glean.GLEANConfig(in_size=64, out_size=1024)}
param_table = {}
for label, c in configs.items():
    with torch.device("meta"):
        m = glean.GLEAN(c)
        rows = trace_encoder(m, torch.empty(1, 3, c.in_size, c.in_size))
    print(f"\n{label}: N = {len(m.encoder) - 2}, C = [{c.num_latents}, {c.style_channels}]")
    for name, shape_in, shape_out, n in rows:
        print(f"  {name:16s} {str(shape_in):22s} -> {str(shape_out):22s} {n:>12,}")
    count = lambda mods: sum(p.numel() for mod in mods for p in mod.parameters())
    param_table[label] = {"E_0": count([m.encoder[0]]), "E_1..E_N": count(m.encoder[1:-1]),
                          "E_N+1": count([m.encoder[-1]]), "bank (frozen)": count([m.bank]),
                          "fusion convs": count([m.fusion_out]), "decoder": count([m.decoder])}
    if c.in_size == 64:
        lesson.result("ffhq16_N", len(m.encoder) - 2, ".0f")
        lesson.result("ffhq16_f0_channels", rows[0][2][1], ".0f")
        lesson.result("ffhq16_C_rows", c.num_latents, ".0f")
        lesson.result("ffhq16_C_cols", c.style_channels, ".0f")
        lesson.result("ffhq16_output_size", rows[-1][2][-1], ".0f")
        lesson.result("ffhq16_params_millions", sum(p.numel() for p in m.parameters()) / 1e6, ".2f")
        lesson.result("ffhq16_bank_params_millions", param_table[label]["bank (frozen)"] / 1e6, ".2f")
    if c.in_size == 32:
        lesson.result("cat8_N", len(m.encoder) - 2, ".0f")
        lesson.result("cat8_C_rows", c.num_latents, ".0f")

fig, ax = plt.subplots(figsize=(8, 3))
parts = list(next(iter(param_table.values())))
width = 0.8 / len(param_table)
for j, (label, counts) in enumerate(param_table.items()):
    ax.bar(np.arange(len(parts)) + j * width, [max(counts[p], 1) for p in parts], width, label=label)
ax.set_xticks(np.arange(len(parts)) + width, parts)
ax.set_yscale("log")
ax.set_ylabel("parameters")
ax.legend(fontsize=8)
ax.set_title("Where the parameters are")
lesson.save_figure(fig, "03_parameters.png")

# %% [markdown]
# ## 3. Which f_i and which c_i go where
#
# Eq. (3), g_i = S_i(c_i, g_{i-1}, f_{N-i}), pairs each bank block with the encoder feature of its resolution:
# f_N (4x4) with the first block, ..., f_0 (in_size) with the block at in_size. Above in_size there are no
# encoder features: the bank's blocks at 128 ... 1024 px of the 16x model are steered by their latent vectors
# alone, and their features reach the output through the decoder (chapter 4). `GLEAN.forward` keeps both lists in
# the paper's order, f[i] at in_size / 2^i and g[i] at 4 * 2^i, so S_i fuses f[N - i]. The style layers take
# c_0, c_1, ... in order (chapter 2), two per block: layer n of [conv1, *convs] takes row n of C. The toRGB layers
# share the index of the next up-sampling layer, so the last vector is read by the last toRGB layer alone, which
# GLEAN does not run when it has a decoder:

# %%
for label, c in configs.items():
    n_in = int(math.log2(c.in_size))
    print(f"{label}:")
    print("  encoder features: " + ", ".join(f"f_{i} at {c.in_size >> i} px" for i in range(n_in - 1)))
    layer = ["conv1 4px"] + [f"{'up' if j % 2 == 0 else 'conv'} {r}px"
                             for r in (2 ** e for e in range(3, int(math.log2(c.out_size)) + 1)) for j in range(2)]
    fused = [r for r in (2 ** e for e in range(2, n_in + 1))]
    print(f"  bank: {len(layer)} style layers read c_0..c_{len(layer) - 1}; c_{c.num_latents - 1} only feeds the "
          f"last toRGB layer (never run when a decoder is used); fusion convs where g meets f at {fused} px; "
          f"no encoder feature above {c.in_size} px")

# %% [markdown]
# ## Exercises
#
# 1. Build `glean.GLEANConfig(in_size=16, out_size=1024)` (64x) on the meta device and trace it. How many stride-2
#    blocks, how many latent vectors, and how large is the fully-connected layer of E_{N+1}?
# 2. f_N is 4x4 whatever the input size, so C always comes from a 4x4 map. Estimate, from the parameter table,
#    what fraction of the 16x encoder's parameters sit in that one fully-connected layer.
# 3. In the shipped model, zero f_N before E_{N+1} (a forward pre-hook on `model.encoder[-1]` returning zeros)
#    and compare the output with the original. Is C carrying much of the image? (Chapter 4 measures this.)
