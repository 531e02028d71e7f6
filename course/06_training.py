# %% [markdown]
# # Chapter 6. Training, eq. (5)-(9)
#
# GLEAN trains its encoder, fusion convs and decoder, with the latent bank frozen (Sec. 3.4, Appendix A), on
#
# - **eq. (5)**, L_mse = 1/N ||y_hat - y||^2, fidelity;
# - **eq. (6)**, L_percep = 1/N ||f(y_hat) - f(y)||^2, with f the VGG16 features up to conv4_3;
# - **eq. (7)**, L_gen = log(1 - D(y_hat)), with D a StyleGAN2 discriminator;
# - **eq. (8)**, L_g = L_mse + alpha_percep L_percep + alpha_gen L_gen, alpha_percep = alpha_gen = 1e-2;
# - **eq. (9)**, the discriminator maximises L_d = log(1 - D(y_hat)) + log D(y).
#
# This chapter computes each one on one batch with `train.py`'s functions, takes one optimisation step and checks
# that the bank did not move, then runs `train.py` itself for about a minute on a tiny GLEAN and plots its loss.
#
# **Offline caveat.** VGG16's ImageNet weights are a download, so here the perceptual loss runs on a *randomly
# initialised* VGG16: the numbers show the mechanics of eq. (6), not a perceptual distance. With the real weights
# (`train.py --vgg-weights FILE`, torchvision's `vgg16-397923af.pth`) the same code gives the real loss.

# %%
# Make the repository importable: as a script this file sits in course/, one level below glean.py; as a notebook
# (no __file__) the working directory is course/ or the repository root.
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
ROOT = HERE if (HERE / "glean.py").is_file() else HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "course")]

import json
import shutil
import tempfile

import matplotlib.pyplot as plt
import torch
import torchvision

import evaluate
import images
import lesson
import stylegan2
import train
import zoo

torch.manual_seed(0)

# %% [markdown]
# ## 1. Every loss on one batch
#
# The generator is the shipped model (the reference `glean.GLEAN`) in training mode; the batch is four faces and
# their 8x8 LR versions (LFW photographs when present, else the shipped bank's own samples: synthetic "ground
# truths", see chapter 4). The discriminator is a randomly initialised StyleGAN2 discriminator at 64 px (the shipped
# bank was trained with one, but its file holds only the generator).

# %%
G = zoo.load_pretrained("glean_face_small_8x", fast=False).train()
y, source = lesson.faces(4)
print(f"SOURCE {source}: {lesson.describe_source(source, 4)}")
x = images.imresize(y, size=G.cfg.in_size)                                  # [4, 3, 8, 8]

D = stylegan2.Discriminator(stylegan2.DiscriminatorConfig(
    in_size=64, channel_multiplier=G.cfg.channel_multiplier, channel_base=G.cfg.channel_base))
with tempfile.TemporaryDirectory() as tmp:                                  # random VGG16 features (see above),
    vgg_file = Path(tmp) / "vgg16_random.pt"                                # as a file: what --vgg-weights reads
    torch.save({f"features.{k}": v for k, v in torchvision.models.vgg16().features[:22].state_dict().items()},
               vgg_file)
    percep = train.PerceptualLoss(str(vgg_file))
cfg = train.TrainConfig()                                                   # Appendix A's weights: 1, 1e-2, 1e-2
lesson.result("alpha_percep", cfg.percep_weight, ".0e")
lesson.result("alpha_gen", cfg.gan_weight, ".0e")

y_hat = G(x)                                                                # [4, 3, 64, 64]
l_mse = train.pixel_loss(y_hat, y)                                          # Eq. (5)
l_percep = percep(y_hat, y)                                                 # Eq. (6), random VGG features
fake_logits = D(y_hat)                                                      # D(y_hat) = sigmoid(logit)
l_gen = train.generator_adv_loss(fake_logits)                               # Eq. (7), non-saturating form
l_g = train.glean_loss(l_mse, l_percep, l_gen, cfg)                         # Eq. (8)
l_d = train.discriminator_loss(D(y), D(y_hat.detach()))                     # Eq. (9), as a loss to minimise
for name, v in (("l_mse", l_mse), ("l_percep_random_vgg", l_percep), ("l_gen", l_gen), ("l_g", l_g), ("l_d", l_d)):
    lesson.result(name, v.item(), ".5f")
lesson.result("l_mse_share_of_l_g", (l_mse / l_g).item(), ".3f")           # the alphas make L_mse lead

# %% [markdown]
# With alpha_percep = alpha_gen = 1e-2 the fidelity term L_mse makes up most of L_g for this trained model
# (`l_mse_share_of_l_g`, over half on both kinds of faces): the perceptual and adversarial terms steer, they do not
# dominate. Three checks that the losses mean what the paper says:
#
# - **eq. (5) is the PSNR's MSE.** For images in [-1, 1] (a range of 2), PSNR = 10 log10(2^2 / MSE): from the
#   MSE of each image we predict `evaluate.psnr` (which works on 8-bit values) to within rounding;
# - **eq. (6) compares conv4_3 features**: VGG16's 512 channels at 1/8 of the image's size;
# - **eq. (9) rewards a right discriminator**: L_d (minimised) is small when D says "real" to y and "fake" to
#   y_hat (logits +3 and -3), and 2 log 2 = 1.386 when it cannot tell (logits 0).

# %%
per_image_mse = (y_hat - y).square().flatten(1).mean(1)                     # eq. (5) for each image
predicted = 10 * torch.log10(4 / per_image_mse)
lesson.result("psnr_from_l_mse_maxgap", (predicted - evaluate.psnr(y_hat, y)).abs().max().item(), ".3f")
features = percep.f(percep.normalise(y))                                    # f(y) of eq. (6)
lesson.result("percep_feature_channels", features.shape[1], ".0f")
lesson.result("percep_feature_size", features.shape[-1], ".0f")
right, chance = torch.full((4, 1), 3.0), torch.zeros(4, 1)
lesson.result("l_d_right_discriminator", train.discriminator_loss(right, -right).item(), ".4f")
lesson.result("l_d_at_chance", train.discriminator_loss(chance, chance).item(), ".4f")

# %% [markdown]
# About eq. (7): the paper writes L_gen = log(1 - D(y_hat)) (`train.paper_generator_adv_loss`), the original
# minimax form. Like the official code and StyleGAN2, `train.generator_adv_loss` minimises -log D(y_hat) =
# softplus(-logit) instead: the same goal, D(y_hat) -> 1, but not the same gradient. Where D is sure an image is
# fake (logit -4, as early in training) the paper's form is nearly flat and the non-saturating one is steep; where
# D is fooled (logit +4) it is the other way round. The gradients with respect to the logit:

# %%
for name, logit in (("confident_D", -4.0), ("fooled_D", 4.0)):
    for form, loss in (("paper", train.paper_generator_adv_loss), ("nonsaturating", train.generator_adv_loss)):
        t = torch.tensor([[logit]], requires_grad=True)
        (grad,) = torch.autograd.grad(loss(t), t)
        lesson.result(f"grad_{form}_at_{name}", grad.item(), ".4f")

# %% [markdown]
# Eq. (9) likewise is maximised by minimising its negation, softplus(logit_fake) + softplus(-logit_real).
#
# ## 2. One optimisation step, bank frozen
#
# The bank's parameters have `requires_grad=False` (set in `GLEAN.__init__`), so backward leaves no gradient on
# them and the optimiser, built over `G.trainable_parameters()`, never sees them. We check both, and that the
# step changed the rest.

# %%
trainable = G.trainable_parameters()
n_train = sum(p.numel() for p in trainable)
n_frozen = sum(p.numel() for p in G.parameters() if not p.requires_grad)
lesson.result("trainable_params", n_train, ".0f")
lesson.result("frozen_params", n_frozen, ".0f")
lesson.result("bank_params", sum(p.numel() for p in G.bank.parameters()), ".0f")

bank_before = {k: v.clone() for k, v in G.bank.state_dict().items()}
encoder_before = [p.detach().clone() for p in G.encoder.parameters()]
opt_g = torch.optim.Adam(trainable, lr=cfg.lr, betas=cfg.betas)            # Appendix A: Adam, lr 1e-4
opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=cfg.betas)

D.requires_grad_(False)                     # generator step: D is fixed (its gradients would be thrown away)
opt_g.zero_grad()
l_g.backward()
lesson.result("bank_params_with_grad", sum(p.grad is not None for p in G.bank.parameters()), ".0f")
lesson.result("trainable_params_with_grad", sum(p.grad is not None for p in trainable), ".0f")
lesson.result("trainable_tensors", len(trainable), ".0f")
opt_g.step()

D.requires_grad_(True)                      # discriminator step, eq. (9), on the same batch
opt_d.zero_grad()
train.discriminator_loss(D(y), D(y_hat.detach())).backward()
opt_d.step()

bank_change = max((v - bank_before[k]).abs().max().item() for k, v in G.bank.state_dict().items())
encoder_change = max((p - q).abs().max().item() for p, q in zip(G.encoder.parameters(), encoder_before))
lesson.result("bank_max_change_after_step", bank_change, ".1e")
lesson.result("encoder_max_change_after_step", encoder_change, ".1e")
with torch.no_grad():
    lesson.result("l_mse_after_step", train.pixel_loss(G(x), y).item(), ".5f")

# %% [markdown]
# Adam's first step moves every trainable weight by about the learning rate (1e-4) in the direction of its
# gradient's sign, whatever the gradient's size (`encoder_max_change_after_step`). On a trained model that blunt
# first step moves the batch's MSE by up to a fifth, up or down depending on the batch (`l_mse_after_step` against
# `l_mse`): Adam's moment estimates need a few steps before its steps follow the gradient's size. The bank's
# weights and buffers are bit-for-bit unchanged. `train.py`
# checks the same thing at the end of every run (`latent bank tensor ... changed during training` would stop it).
#
# ## 3. A tiny training run
#
# Now `train.py` itself, as a function (`train.main([...])` takes the command-line arguments). To fit in well under
# a minute on two CPU cores the GLEAN is tiny (an RRDBNet of 16 channels with one block, a decoder of 16 channels)
# around the shipped bank, trained from scratch for 30 steps of 8 images with eq. (5) and (7) (alpha_percep = 0:
# no ImageNet VGG offline). course/train_minimal.py is the same loop written out in one screen. The images:
#
# - with the research data present, CelebA photos (what the shipped model was trained on), cropped at the
#   shipped model's framing (`--crop 8 23 73`, weights/MODEL_CARD.md);
# - otherwise 64 faces sampled from the bank (synthetic faces), written as PNG files to
#   `$COURSE_OUT/06_bank_faces/`.

# %%
out = lesson.out_dir()
celeba = lesson.research_folder(lesson.CELEBA)
if celeba is not None:
    data, crop, train_source = celeba, ["--crop", "8", "23", "73"], "celeba"
else:
    data, crop, train_source = out / "06_bank_faces", [], "bank"
    data.mkdir(exist_ok=True)
    for i, face in enumerate(lesson.bank_samples(64, seed=1, box=None)):
        torchvision.utils.save_image((face + 1) / 2, data / f"{i:03d}.png")
print(f"TRAINING DATA {train_source}: {data}")

tiny = {**{k: getattr(G.cfg, k) for k in ("style_channels", "num_mlps", "channel_multiplier", "channel_base")},
        "rrdb_channels": 16, "num_rrdbs": 1, "rrdb_growth_channels": 8, "decoder_channels": 16}
run = out / "06_tiny_run"
shutil.rmtree(run, ignore_errors=True)                                      # train.py refuses to overwrite a run
args = ["--data", str(data), *crop, "--out-size", "64", "--scale", "8", "--model", json.dumps(tiny),
        "--bank", "stylegan2_celeba_64", "--percep-weight", "0", "--gan-weight", "0.01", "--disc", "none",
        "--iters", "30", "--batch", "8", "--lr", "2e-3", "--workers", "0", "--log-every", "1",
        "--ckpt-every", "1000", "--seed", "0", "--no-tensorboard", "--out", str(run)]
print("python train.py " + " ".join(a if " " not in a else f"'{a}'" for a in args))
threads = torch.get_num_threads()
torch.set_num_threads(1)     # a tiny network is thousands of small ops: a second thread gains little, and one
try:                         # thread keeps the run's time steady when other jobs share the CPU cores
    assert train.main(args) == 0
finally:
    torch.set_num_threads(threads)

rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
steps = [r["step"] for r in rows]
mse = [r["loss/mse"] for r in rows]
first, last = sum(mse[:3]) / 3, sum(mse[-3:]) / 3
lesson.result("tiny_run_steps", steps[-1], ".0f")
lesson.result("tiny_run_mse_first", first, ".4f")
lesson.result("tiny_run_mse_last", last, ".4f")
lesson.result("tiny_run_mse_ratio", last / first, ".3f")
lesson.result("tiny_run_seconds", rows[-1]["time"], ".1f")
lesson.result("tiny_run_gen_mean", sum(r["loss/gen"] for r in rows) / len(rows), ".3f")
lesson.result("tiny_run_d_mean", sum(r["loss/d"] for r in rows) / len(rows), ".3f")

fig, ax = plt.subplots(1, 2, figsize=(9, 3))
ax[0].plot(steps, mse, label="L_mse (eq. 5)")
ax[0].plot(steps, [r["loss/g"] for r in rows], label="L_g (eq. 8)", ls="--")
ax[0].set_yscale("log")
ax[0].set_xlabel("step")
ax[0].legend(fontsize=8)
ax[0].set_title(f"tiny GLEAN, {train_source} faces")
ax[1].plot(steps, [r["loss/gen"] for r in rows], label="L_gen (eq. 7)")
ax[1].plot(steps, [r["loss/d"] for r in rows], label="L_d (eq. 9, minimised form)")
ax[1].set_xlabel("step")
ax[1].legend(fontsize=8)
ax[1].set_title("adversarial terms")
fig.tight_layout()
lesson.save_figure(fig, "06_loss_curve.png")

# %% [markdown]
# The MSE falls fast at first (the network learns colour and layout, which bicubic upscaling would give it too)
# and then slowly; the adversarial terms stay near log 2 ~ 0.69 (L_gen) and 2 log 2 ~ 1.39 (L_d), where a
# discriminator that cannot tell real from fake sits (`tiny_run_gen_mean`, `tiny_run_d_mean`: their means over the
# run), and drift as it learns. 30 steps is nothing: the shipped model trained for 1,500 + 7,000 + 4,000 steps of
# 16 images (weights/MODEL_CARD.md), the paper for 300k steps.
#
# The run's result is a model file like any other. The tiny model next to the shipped one, on the astronaut:

# %%
G.eval()
small = zoo.load_pretrained(str(run / "glean.safetensors"), fast=False)
lesson.result("tiny_run_bank_max_change", max((small.bank.state_dict()[k] - v).abs().max().item()
                                              for k, v in G.bank.state_dict().items()), ".1e")
with torch.no_grad():
    y_a = lesson.astronaut()[None]
    x_a = images.imresize(y_a, size=8)
    panels = [x_a[0], images.imresize(x_a, size=64)[0], small(x_a)[0], G(x_a)[0], y_a[0]]
    lesson.result("tiny_run_astronaut_psnr", evaluate.psnr(small(x_a), y_a).item(), ".2f")
fig = lesson.image_grid([panels], ["LR 8x8", "bicubic", "tiny run (30 steps)", "shipped (+1 step)", "ground truth"])
lesson.save_figure(fig, "06_tiny_run_output.png")

# %% [markdown]
# (The shipped model here has taken the one optimisation step of section 2, with lr 1e-4: the change measured by
# `l_mse_after_step`.)
#
# ## Exercises
#
# 1. Run the tiny training again with `--gan-weight 0` and compare the MSE curves. At this scale, does the
#    adversarial term help or hurt the MSE, and why would the paper accept a slightly worse MSE for it?
# 2. Make the bank trainable for one step (`G.bank.requires_grad_(True)` and rebuild the optimiser) and measure how
#    far its weights move. Sec. 3.4 gives two reasons for freezing it: which one could this experiment speak to?
# 3. With real VGG16 weights (a file on a machine with internet access), compare L_percep of (bicubic, y) and
#    (GLEAN, y) on the same batch. Which one does the perceptual loss prefer, and does PSNR agree?
