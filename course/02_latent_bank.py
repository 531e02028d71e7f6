# %% [markdown]
# # Chapter 2. StyleGAN2 as a latent bank
#
# GLEAN's prior is a pretrained, frozen StyleGAN2 generator (Karras et al., CVPR 2020), the "generative latent
# bank" of Sec. 3.2. Before GLEAN conditions it on an LR image (chapter 4), this chapter takes the bank on its own:
# its layers, the modulated convolution written out and checked against `stylegan2.py`, its noise inputs, samples,
# truncation and style mixing. The bank is the one that ships with the repository (`stylegan2_celeba_64`: 64 px,
# trained on CelebA in this project; weights/MODEL_CARD.md), so everything runs offline in seconds.

# %%
# Make the repository importable: as a script this file sits in course/, one level below glean.py; as a notebook
# (no __file__) the working directory is course/ or the repository root.
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
ROOT = HERE if (HERE / "glean.py").is_file() else HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "course")]

import copy

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import images
import lesson
import zoo

torch.set_grad_enabled(False)
gen = torch.Generator().manual_seed(0)       # every random draw of the chapter comes from here

# %% [markdown]
# ## 1. The generator, layer by layer
#
# A mapping network turns a code z into a style vector w. The synthesis network starts from a learned 4x4
# constant and a style layer (`conv1`), then per resolution 8, 16, ..., 64 runs a 2x up-sampling style layer and a
# style layer (`convs[2k]`, `convs[2k + 1]`) and a toRGB layer, whose RGB outputs are summed over resolutions (the
# "skip" RGB path). Every style layer takes its own style vector, and each toRGB layer takes the vector of the
# style layer after it: 9 style layers and the last toRGB make 2 log2(64) - 2 = 10 vectors, so this bank's "W+"
# code is a [10, 96] matrix. GLEAN's encoder produces exactly such a matrix, C (eq. 2), and never uses the mapping
# network.

# %%
G = zoo.load_bank("stylegan2_celeba_64")     # stylegan2.Generator, eval mode
cfg = G.cfg
print(cfg)
print("style layers:", ["conv1 (4 px)"] + [f"{'up-conv' if i % 2 == 0 else 'conv'} ({r} px)"
                                            for r in G.resolutions for i in range(2)])
lesson.result("bank_params", sum(p.numel() for p in G.parameters()), ".0f")
lesson.result("num_style_layers", 1 + len(G.convs), ".0f")
lesson.result("num_latents", G.num_latents, ".0f")
lesson.result("num_noise_inputs", G.num_injected_noises, ".0f")

# %% [markdown]
# ## 2. Modulation and demodulation, written out
#
# A style layer is a 3x3 convolution whose weight W [C_out, C_in, 3, 3] is rescaled per sample:
#
# - modulation: s = A(w) (an affine map, `style_modulation`, initialised so that s starts at 1) and
#   W'_{o,i,k} = s_i W_{o,i,k}: each *input* channel i is scaled by its style;
# - demodulation: W''_{o,i,k} = W'_{o,i,k} / sqrt(sum_{i,k} W'_{o,i,k}^2 + eps): each *output* channel gets unit
#   weight norm again, so that unit-variance inputs give (roughly) unit-variance outputs whatever the style.
#
# The stored weight is also multiplied by 1 / sqrt(C_in k^2) at run time ("equalized learning rate"). Written out
# for one layer, in float64 so that only the maths can differ:

# %%
layer = copy.deepcopy(G.convs[3].conv).double()   # the 16 px style layer (no up-sampling), C_in = C_out = 96
B, C_in, k = 4, layer.in_channels, layer.kernel_size
w = G.mapping(torch.randn(B, cfg.style_channels, generator=gen)).double()     # [B, 96]

A = layer.style_modulation                                            # EqualLinear: y = x (W a)^T + b lr_mul
s = w @ (A.weight * A.scale).T + A.bias * A.lr_mul                    # s = A(w)                      [B, C_in]
W = layer.weight[0] / (C_in * k * k) ** 0.5                           # equalized lr                [O, I, 3, 3]
W1 = W[None] * s[:, None, :, None, None]                              # W'  = s_i W_oik         [B, O, I, 3, 3]
W2 = W1 / torch.sqrt(W1.square().sum(dim=(2, 3, 4), keepdim=True) + layer.eps)   # W'' (demodulated)

lesson.result("modulated_weight_maxdiff", (W2 - layer.modulated_weight(w)).abs().max(), ".2e")

x = torch.randn(B, C_in, 16, 16, generator=gen).double()              # unit-variance input features
y_loop = torch.stack([F.conv2d(x[b:b + 1], W2[b], padding=1)[0] for b in range(B)])   # one conv per sample
y_layer = layer(x, w)                        # stylegan2.py: the batch as one grouped conv with B groups
lesson.result("modulated_conv_maxdiff", (y_loop - y_layer).abs().max(), ".2e")

# %% [markdown]
# `stylegan2.ModulatedConv2d.forward` folds the batch into the channel axis ([1, B C_in, H, W]) and runs one
# convolution with `groups=B`: the same B convolutions as the loop, in one call. The up-sampling layer is the same
# modulation, used as a stride-2 transposed convolution, followed by the [1, 3, 3, 1] blur. Written out from the
# layer's stored weights only: a transposed convolution with stride 2 is a zero-inserted input convolved with the
# flipped kernel, and the blur is the separable [1, 3, 3, 1] filter, scaled by 4 so that the zeros do not darken
# the image:

# %%
up = copy.deepcopy(G.convs[0].conv).double()                          # 4 px -> 8 px
x4 = torch.randn(B, up.in_channels, 4, 4, generator=gen).double()
A = up.style_modulation
s = w @ (A.weight * A.scale).T + A.bias * A.lr_mul                    # s = A(w)                      [B, C_in]
Wu = up.weight[0] / (up.in_channels * 9) ** 0.5 * s[:, None, :, None, None]    # W' [B, O, I, 3, 3]
Wu = Wu / torch.sqrt(Wu.square().sum(dim=(2, 3, 4), keepdim=True) + up.eps)  # W''
z = torch.zeros(B, up.in_channels, 7, 7, dtype=torch.float64)
z[..., ::2, ::2] = x4                                                 # zero insertion           [B, I, 7, 7]
z = F.pad(z, [2, 2, 2, 2])                                            # a "full" 3x3 convolution [B, I, 11, 11]
t = torch.stack([F.conv2d(z[b:b + 1], Wu[b].flip([2, 3]))[0] for b in range(B)])   # [B, O, 9, 9]
k = torch.tensor([1.0, 3, 3, 1], dtype=torch.float64)
blur = (k[:, None] * k[None]) / 64 * 4                                # [4, 4], sums to 4
y_up = F.conv2d(F.pad(t, [1, 1, 1, 1]), blur.expand(t.shape[1], 1, 4, 4), groups=t.shape[1])   # [B, O, 8, 8]
lesson.result("upsampling_conv_maxdiff", (y_up - up(x4, w)).abs().max(), ".2e")

# %% [markdown]
# What demodulation buys: the per-channel standard deviation of the output, for unit-variance inputs, with and
# without it. Without it the output scale depends on the style (here it is about 2.5x too large); with it, about 1.

# %%
y_demod = torch.stack([F.conv2d(x[b:b + 1], W2[b], padding=1)[0] for b in range(B)])
y_plain = torch.stack([F.conv2d(x[b:b + 1], W1[b], padding=1)[0] for b in range(B)])
lesson.result("output_std_demodulated", y_demod.std(dim=(2, 3)).mean(), ".3f")
lesson.result("output_std_modulated_only", y_plain.std(dim=(2, 3)).mean(), ".3f")

# %% [markdown]
# ## 3. Samples and truncation
#
# A sample: z ~ N(0, I) -> w = mapping(z) -> synthesis. The truncation trick pulls w towards the average w,
# w' = w_mean + psi (w - w_mean): psi = 1 is the full distribution, psi = 0 the "average face", in between a
# trade of variety for typicality. This bank is small and trained for 41 CPU-minutes: its faces are blurry and
# often odd, but clearly faces, which is all a prior at 64 px needs to be.

# %%
z = torch.randn(8, cfg.style_channels, generator=gen)
w_mean = G.mean_latent(4096, generator=torch.Generator().manual_seed(1))            # [1, 96]
rows = []
for psi in (1.0, 0.7, 0.0):
    rows.append(list(G(z, truncation=psi, truncation_latent=w_mean, noise="const").clamp(-1, 1)))
fig = lesson.image_grid(rows, [f"z{i}" for i in range(8)], ["psi = 1", "psi = 0.7", "psi = 0 (mean)"])
lesson.save_figure(fig, "02_samples_truncation.png")

# %% [markdown]
# ## 4. Noise
#
# Each style layer adds a noise map of its own (9 maps here, `injected_noise_0` for `conv1`, then one per layer
# of `convs`: two per resolution), scaled by a learned per-layer strength, before its activation: StyleGAN's
# source of stochastic detail (hair strands, pores), which the styles need not encode. `noise="random"` draws
# fresh maps, `noise="const"` uses the fixed maps stored with the weights. **GLEAN always uses the fixed maps**
# (`glean.GLEAN.style_layer` passes layer n its map `injected_noise_n`): the output is a deterministic function of
# the LR input.

# %%
print("learned noise strengths:", [f"{c.noise_injector.weight.item():+.4f}" for c in [G.conv1, *G.convs]])
wz = G.styles_to_latents(G.mapping(z[:4]))                            # [4, 10, 96]: one w for every layer
draws = torch.stack([G.synthesis(wz, noise="random") for _ in range(6)])            # [6, 4, 3, 64, 64]
noise_effect = (draws - draws.mean(0)).abs().mean()                   # how much re-drawing the noise moves pixels
other = G.synthesis(G.styles_to_latents(G.mapping(z[4:8])), noise="random")
style_effect = (draws[0] - other).abs().mean()                        # how much another face moves them
lesson.result("noise_effect", noise_effect, ".4f")
lesson.result("style_effect", style_effect, ".4f")

fig, axes = plt.subplots(2, 4, figsize=(6.4, 3.4))
for j in range(4):
    axes[0][j].imshow(lesson.as_image(draws[0, j]))
    axes[1][j].imshow(draws[:, j].std(0).mean(0).numpy(), cmap="magma")
    axes[0][j].set_title(f"sample {j}", fontsize=8)
for ax in axes.flat:
    ax.set_xticks([]), ax.set_yticks([])
axes[0][0].set_ylabel("one noise draw", fontsize=8)
axes[1][0].set_ylabel("std over 6 draws", fontsize=8)
fig.tight_layout()
lesson.save_figure(fig, "02_noise.png")

# %% [markdown]
# ## 5. Style mixing: what each style vector controls
#
# `Generator.styles_to_latents([w_B, w_A], inject_index=k)` takes the first k style vectors from B and the rest
# from A. The early vectors act at 4-16 px (pose, face shape, layout), the late ones at 32-64 px (texture, fine
# colour). For super-resolution that split is the whole story: an 8x8 LR image pins down roughly what the coarse
# styles control, and the missing detail is what the fine ones draw. We measure it: how close is the 8x8
# downscale of the mixed face to B's, and to A's?

# %%
zA, zB = torch.randn(16, cfg.style_channels, generator=gen), torch.randn(16, cfg.style_channels, generator=gen)
trunc = lambda w: w_mean + 0.7 * (w - w_mean)  # truncation, psi = 0.7
wA, wB = trunc(G.mapping(zA)), trunc(G.mapping(zB))
img_A = G.synthesis(G.styles_to_latents(wA, input_is_latent=True), noise="const")
img_B = G.synthesis(G.styles_to_latents(wB, input_is_latent=True), noise="const")
lr = lambda t: images.imresize(t, size=8)  # the LR image GLEAN would see
mixes = {}
for k in (2, 4, 6, 8):
    mixes[k] = G.synthesis(G.styles_to_latents([wB, wA], input_is_latent=True, inject_index=k), noise="const")
    lesson.result(f"mix{k}_lr_mse_to_B", (lr(mixes[k]) - lr(img_B)).square().mean(), ".4f")
    lesson.result(f"mix{k}_lr_mse_to_A", (lr(mixes[k]) - lr(img_A)).square().mean(), ".4f")

rows = [[img_A[i]] + [mixes[k][i] for k in (2, 4, 6, 8)] + [img_B[i]] for i in range(4)]
fig = lesson.image_grid(rows, ["A", "B's first 2", "B's first 4", "B's first 6", "B's first 8", "B"])
lesson.save_figure(fig, "02_style_mixing.png")

# %% [markdown]
# With B's first 4 of 10 vectors (up to the first 16 px layer) the 8x8 image is already about three times closer to
# B's than to A's (`mix4_lr_mse_to_A / mix4_lr_mse_to_B`), and with 6 ten times closer; the remaining vectors change
# mostly what an 8x LR image cannot see. GLEAN's encoder has to infer all ten from the LR image: the first few from
# what it sees, the rest as a plausible guess, which the bank then turns into detail. It also passes spatial
# features f_i into the bank (eq. 3), which a style vector, one number per channel, cannot carry.
#
# ## Exercises
#
# 1. Repeat section 2 for a `ToRGB` layer (`G.to_rgbs[0].conv`): it is modulated but not demodulated. Why would
#    demodulating the RGB output be a bad idea?
# 2. Set the noise strength of the two 64 px layers to zero (`G.convs[6]` and `G.convs[7]`:
#    `.noise_injector.weight.zero_()`) and redo section 4: which layers' noise carries most of `noise_effect`?
# 3. Style mixing in the other direction: take B's *last* six vectors (`inject_index=4` with `[w_A, w_B]`). How does
#    the 8x8 distance change, and what does that say about which vectors GLEAN's encoder can infer from an LR
#    image?
