# %% [markdown]
# # Chapter 5. The ablations of Section 5, through the config switches
#
# Section 5 of the paper asks which of GLEAN's connections matter, with three experiments:
#
# - **Fig. 7**, multi-resolution encoder features: start from latent vectors only (the bank sees C and nothing
#   else, like GAN inversion) and add the encoder features f_i to the bank from coarse to fine;
# - **Fig. 8**, latent-bank features: pass the bank's features g_i to the decoder only up to some resolution (none
#   at all: a plain encoder-decoder);
# - **Fig. 9**, the decoder: let the bank's own RGB output be the result.
#
# `glean.GLEANConfig` has one switch per experiment: `fuse_encoder_up_to`, `decoder_bank_up_to` and `use_decoder`.
# This chapter shows what each switch builds and removes, applies them to the shipped model's weights, and is
# explicit about the difference between that and the paper's experiment, which trains each variant from scratch.

# %%
# Make the repository importable: as a script this file sits in course/, one level below glean.py; as a notebook
# (no __file__) the working directory is course/ or the repository root.
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
ROOT = HERE if (HERE / "glean.py").is_file() else HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "course")]

import dataclasses

import matplotlib.pyplot as plt
import torch

import evaluate
import glean
import images
import lesson
import zoo

torch.set_grad_enabled(False)

# %% [markdown]
# ## 1. What the switches build
#
# Modules that cannot influence the output in a configuration are not built: without encoder features in the bank
# there are no fusion convs; without bank features in the decoder there is no bank at all (nor E_1..E_{N+1},
# whose only purpose is to feed it), and the decoder's convolutions have fewer input channels. We build each
# variant of the shipped architecture on the meta device (no memory, no weights) and compare its parameters with
# the full model's.

# %%
model = zoo.load_pretrained("glean_face_small_8x", fast=False)
full_cfg = model.cfg
full_params = dict(model.named_parameters())

variants = {"GLEAN (full)": {},
            "Fig. 7: C only, no f": {"fuse_encoder_up_to": 0},
            "Fig. 7: f at 4 px only": {"fuse_encoder_up_to": 4},
            "Fig. 8: no g": {"decoder_bank_up_to": 0},
            "Fig. 8: g up to 16 px": {"decoder_bank_up_to": 16},
            "Fig. 8: g up to 32 px": {"decoder_bank_up_to": 32},
            "Fig. 9: no decoder": {"use_decoder": False}}
for label, changes in variants.items():
    with torch.device("meta"):
        v = glean.GLEAN(dataclasses.replace(full_cfg, **changes))
    params = dict(v.named_parameters())
    gone = sorted({".".join(k.split(".")[:2]) for k in full_params if k not in params})
    narrower = sorted(k for k, p in params.items() if k in full_params and p.shape != full_params[k].shape)
    new = sorted({".".join(k.split(".")[:2]) for k in params if k not in full_params})
    total = sum(p.numel() for p in params.values())
    print(f"{label:32s} {total / 1e6:5.2f} M parameters; removed: {', '.join(gone) or '-'}"
          + (f"; narrower: {', '.join(narrower)}" if narrower else "") + (f"; new: {', '.join(new)}" if new else ""))
    tag = "_".join(f"{k}_{v}" for k, v in changes.items()) or "full"          # e.g. fuse_encoder_up_to_0
    lesson.result(f"params_{tag}", total, ".0f")

# %% [markdown]
# Two asymmetries worth noticing. `decoder_bank_up_to=0` removes far more than the bank: E_1..E_{N+1} exist only to
# feed it. And `use_decoder=False` removes the decoder but keeps `fusion_skip`, the official implementation's
# fusion of encoder features into the bank's RGB path, which only matters when the bank's RGB is the output.
#
# ## 2. The switches on the trained model
#
# The cheapest way to ask "what does this connection do" is to switch it off in the trained model: build the
# variant and give it every weight it has in common with the shipped model. Where a decoder conv lost the input
# channels that carried g, we keep the weights of the d channels (the conv's input is [d_{i-1}, g] in that
# order): exactly the model of chapter 4 with that g zeroed. The faces are chapter 4's: LFW photographs when
# present, otherwise the bank's own samples, synthetic "ground truths" (see chapter 4).

# %%
def switched(model: glean.GLEAN, **changes) -> glean.GLEAN:
    """The variant of `model` with these GLEANConfig changes, holding every weight the two have in common."""
    with torch.device("meta"):
        v = glean.GLEAN(dataclasses.replace(model.cfg, **changes))
    sd = model.state_dict()
    new = {}
    for k, t in v.state_dict().items():
        w = sd[k]                                                       # the full model has every key
        if w.shape != t.shape:                                          # a decoder conv without its g channels
            assert k.startswith("decoder.") and w.shape[1] > t.shape[1], k
            w = w[:, :t.shape[1]]                                       # keep the d_{i-1} input channels
        new[k] = w
    v.load_state_dict(new, strict=True, assign=True)
    return v.eval()


n = 16
y, source = lesson.faces(n)
print(f"SOURCE {source}: {lesson.describe_source(source, n)}")
y = torch.cat([lesson.astronaut()[None], y])                            # the astronaut first, for the figure
x = images.imresize(y, size=full_cfg.in_size)
lesson.result("psnr_bicubic", evaluate.psnr(images.imresize(x, size=64), y).mean(), ".2f")
outputs = {}
for label, changes in variants.items():
    outputs[label] = switched(model, **changes)(x)
    db = evaluate.psnr(outputs[label], y).mean()
    print(f"{label:32s} PSNR {db:.2f} dB")
    lesson.result("psnr_" + ("_".join(f"{k}_{v}" for k, v in changes.items()) or "full"), db, ".2f")

# the decoder_bank_up_to switch with sliced weights is the zero knock-out of chapter 4
def zero_g(module, args):
    """Pre-hook: zero the g half of a decoder block's input [d_{i-1}, g]."""
    d, g = args[0].chunk(2, dim=1)
    return (torch.cat([d, torch.zeros_like(g)], dim=1),)


hooks = [model.decoder[i].register_forward_pre_hook(zero_g) for i in (2, 3)]     # g_3 (32 px), g_4 (64 px)
try:
    lesson.result("fig8_switch_vs_zeroed_maxdiff",
                  (model(x) - outputs["Fig. 8: g up to 16 px"]).abs().max(), ".2e")
finally:
    for h in hooks:
        h.remove()

# %% [markdown]
# - **Fig. 7.** Without the fusion convs the bank receives g straight from its previous block, steered by C alone,
#   and the trained model loses between one and a half and three and a half dB (about 3 on LFW, under 2 on the
#   bank's samples); keeping only the 4 px fusion recovers a little, a few tenths of a dB at most. The trend is
#   the paper's, but the size is not a measurement of the idea: this model was trained with both convs, and its C
#   was never meant to work alone (chapter 4: replacing C by the batch mean costs under half a dB).
# - **Fig. 8.** Each bank feature withdrawn from the decoder costs PSNR, and none at all costs the most.
# - **Fig. 9.** The bank's own RGB path is far below bicubic here (more than 5 dB). That is not the paper's Fig. 9:
#   the shipped model's `fusion_skip` convs were never trained (with a decoder they cannot change the output, so
#   train.py freezes them at their random initialisation), and the encoder learnt to feed a decoder, not the bank's
#   toRGB layers.
#
# Which is the general lesson: **switching a connection off in a trained model measures how much that model
# relies on it; an ablation asks what the best model without it can do, and needs a model trained without it.**
#
# ## 3. The paper's experiment: retrain each variant
#
# The same switches are `train.py`'s `--model` overrides, so each variant trains with the command that trains
# GLEAN. The model card's step 3 did that for two of them, with exactly the data, seed, schedule and budget (1500
# steps) of the full model's first 1500 steps, and scored all three on the first 300 LFW faces (weights/MODEL_CARD.md;
# these numbers are quoted, not recomputed here):
#
# | same-budget model (1500 steps) | PSNR (dB) | SSIM | identity |
# | --- | --- | --- | --- |
# | bicubic | 19.77 | 0.4613 | 0.8721 |
# | GLEAN | 20.41 | 0.5169 | 0.8666 |
# | latent vectors only (`fuse_encoder_up_to=0`) | 20.32 | 0.5115 | 0.8651 |
# | no bank features (`decoder_bank_up_to=0`) | 20.34 | 0.5090 | 0.8737 |
#
# Retrained, the differences shrink to a tenth of a dB: a network trained without a connection routes the
# information another way. GLEAN stays ahead in PSNR and SSIM, as in the paper, but the small bank (41 CPU-minutes
# of StyleGAN2 training, chapter 2) does not buy identity.

# %%
order = list(outputs)
rows = [[y[i]] + [outputs[k][i] for k in order] for i in range(4)]
titles = ["ground truth"] + [k.replace(": ", ":\n") for k in order]
lesson.save_figure(lesson.image_grid(rows, titles, size=1.3), "05_switches.png")

fig, ax = plt.subplots(figsize=(7, 2.8))                  # PSNR over bicubic's: the 1-2 dB differences visible
bicubic_db = evaluate.psnr(images.imresize(x, size=64), y).mean().item()
gains = [evaluate.psnr(outputs[k], y).mean().item() - bicubic_db for k in order]
low = min(g for g in gains if g > -5) - 1                 # Fig. 9's bar (about -10 dB) is cut at the axis
ax.barh(range(len(order)), [max(g, low) for g in gains], color=["C0"] + ["C1"] * 2 + ["C2"] * 3 + ["C3"])
for i, g in enumerate(gains):
    ax.text(max(g, low), i, f" {g:+.2f}" + (" (cut)" if g < low else ""), va="center", fontsize=7)
ax.axvline(0, color="k", lw=1, label="bicubic")
ax.set_xlim(low, max(gains) + 1)
ax.set_yticks(range(len(order)), order, fontsize=8)
ax.invert_yaxis()
ax.set_xlabel("PSNR - bicubic's PSNR (dB), shipped weights with the switch applied")
ax.legend(fontsize=8, loc="lower right")
lesson.save_figure(fig, "05_switches_psnr.png")

# %% [markdown]
# ## Exercises
#
# 1. Retrain an ablation for real, at toy scale: run chapter 6's tiny training twice, once as is and once with
#    `"fuse_encoder_up_to": 0` added to its `--model` JSON, and compare the final losses. How many steps before
#    the difference exceeds the step-to-step noise?
# 2. Fine-tune the Fig. 7 variant: save `switched(model, fuse_encoder_up_to=0)` (`variant.save(path)`) and go on
#    training it for a few hundred steps with `train.py --init path` (which trains every weight but the bank's),
#    or with course/train_minimal.py's loop with its optimiser over `G.encoder.parameters()` only. How much of the
#    loss in section 2 comes back, and does training the encoder alone recover as much?
# 3. Fig. 9 properly: which parameters would a `use_decoder=False` model train (`trainable_parameters()`), and why
#    are the `fusion_skip` convs frozen in the shipped model but trainable in this variant?
