"""GLEAN's training loop in one screen: eq. (5)-(9) of the paper written out, nothing else.

train.py runs the same recipe with what a real run needs around it (data folders, processes, checkpoints, resume,
logs); here a small GLEAN around the shipped 64 px latent bank learns 8 -> 64 px faces for a few dozen steps, on
the CPU, offline. The "ground truth" faces are samples of that bank (synthetic faces, which a clone always has).

    python course/train_minimal.py        # about a minute on 2 CPU cores; prints RESULT lines
"""
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import glean  # noqa: E402
import images  # noqa: E402
import stylegan2  # noqa: E402
import zoo  # noqa: E402

STEPS, BATCH, LR = 40, 8, 1e-3           # the paper: 300k steps of 8 faces at lr 1e-4 (Appendix A)
ALPHA_PERCEP = ALPHA_GEN = 1e-2          # eq. (8), Appendix A
torch.manual_seed(0)

# -- data: 64 HR faces y from the bank, their LR images x made as train.py makes them ----------------------------
bank_file = zoo.weights_file("stylegan2_celeba_64")
with torch.no_grad():
    faces = zoo.load_bank("stylegan2_celeba_64").sample(64, seed=1, truncation=0.7).clamp(-1, 1)   # [64, 3, 64, 64]


def lr_image(y: torch.Tensor) -> torch.Tensor:
    """MATLAB bicubic 64 -> 8, clipped and rounded to 8 bits as an image file holds it; [-1, 1] in and out."""
    x = images.imresize((y + 1) / 2, size=8)
    return (x.clamp(0, 1) * 255).round() / 255 * 2 - 1


# -- networks: G = GLEAN with the pretrained bank frozen (Sec. 3.4), D = a StyleGAN2 discriminator ------------------
shipped = glean.GLEANConfig(**zoo.WEIGHTS["glean_face_small_8x"].config)
cfg = glean.GLEANConfig(in_size=8, out_size=64, rrdb_channels=16, num_rrdbs=1, rrdb_growth_channels=8,
                        decoder_channels=16, style_channels=shipped.style_channels, num_mlps=shipped.num_mlps,
                        channel_multiplier=shipped.channel_multiplier, channel_base=shipped.channel_base)
G = glean.GLEAN(cfg).load_bank(bank_file).train()            # its bank: requires_grad False
D = stylegan2.Discriminator(stylegan2.DiscriminatorConfig(in_size=64, channel_multiplier=cfg.channel_multiplier,
                                                          channel_base=cfg.channel_base))
bank_before = {k: v.clone() for k, v in G.bank.state_dict().items()}

# f of eq. (6): VGG16 up to conv4_3. Its ImageNet weights are a download; offline it stays randomly initialised,
# which shows the mechanics of eq. (6), not a perceptual distance (train.py --vgg-weights takes the real ones).
vgg = torchvision.models.vgg16().features[:22].eval().requires_grad_(False)
mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
f = lambda t: vgg((t - mean) / std)                          # noqa: E731

opt_g = torch.optim.Adam(G.trainable_parameters(), lr=LR, betas=(0.9, 0.99))   # Adam (Appendix A)
opt_d = torch.optim.Adam(D.parameters(), lr=LR, betas=(0.9, 0.99))


def cosine(step: int) -> float:
    """Cosine annealing (Appendix A) from LR to 0 over the run."""
    return LR * (1 + math.cos(math.pi * step / STEPS)) / 2


# -- the loop ---------------------------------------------------------------------------------------------------
log, t0 = [], time.perf_counter()
for step in range(STEPS):
    y = faces[torch.randint(0, len(faces), (BATCH,))]       # HR ground truths  [B, 3, 64, 64]
    x = lr_image(y)                                          # LR inputs         [B, 3, 8, 8]
    for opt in (opt_g, opt_d):
        opt.param_groups[0]["lr"] = cosine(step)

    # G's update, D fixed: eq. (5)-(8)
    D.requires_grad_(False)
    y_hat = G(x)                                             # eq. (1)-(4)
    l_mse = (y_hat - y).square().mean()                      # eq. (5): 1/N ||y_hat - y||^2
    l_percep = (f(y_hat) - f(y)).square().mean()             # eq. (6): 1/N ||f(y_hat) - f(y)||^2
    # eq. (7) is L_gen = log(1 - D(y_hat)); G minimises its non-saturating form -log D(y_hat), as the official
    # code does: the same goal, D(y_hat) -> 1, with a gradient that does not vanish while D wins. D = sigmoid(logit)
    l_gen = -F.logsigmoid(D(y_hat)).mean()
    l_g = l_mse + ALPHA_PERCEP * l_percep + ALPHA_GEN * l_gen   # eq. (8)
    opt_g.zero_grad()
    l_g.backward()
    opt_g.step()

    # D's update: eq. (9), D maximises L_d = log(1 - D(y_hat)) + log D(y); log(1 - sigmoid(l)) = logsigmoid(-l)
    D.requires_grad_(True)
    L_d = F.logsigmoid(-D(y_hat.detach())).mean() + F.logsigmoid(D(y)).mean()
    opt_d.zero_grad()
    (-L_d).backward()                                        # maximise L_d: minimise -L_d
    opt_d.step()
    log.append((l_mse.item(), l_gen.item(), -L_d.item()))
    if step % 10 == 0 or step == STEPS - 1:
        print(f"step {step:3d}  L_mse {l_mse.item():.4f}  L_gen {l_gen.item():.3f}  -L_d {-L_d.item():.3f}")

# -- what happened ------------------------------------------------------------------------------------------------
first, last = sum(m for m, _, _ in log[:5]) / 5, sum(m for m, _, _ in log[-5:]) / 5
bank_change = max((v - bank_before[k]).abs().max().item() for k, v in G.bank.state_dict().items())
print(f"RESULT steps = {STEPS}")
print(f"RESULT mse_first5 = {first:.4f}")
print(f"RESULT mse_last5 = {last:.4f}")
print(f"RESULT bank_max_change = {bank_change:.1e}")
print(f"RESULT seconds = {time.perf_counter() - t0:.1f}")
