"""The StyleGAN2 generator and discriminator on their own."""
import pytest
import torch

import stylegan2


def tiny_gen(res):
    return stylegan2.Generator(stylegan2.GeneratorConfig(out_size=res, style_channels=16, num_mlps=2,
                                                         channel_multiplier=1, channel_base=16))


@pytest.mark.parametrize("res", [16, 32, 64, 128, 256, 512, 1024])
def test_generator_and_discriminator_every_resolution(res):
    torch.manual_seed(0)
    G = tiny_gen(res)
    D = stylegan2.Discriminator(stylegan2.DiscriminatorConfig(in_size=res, channel_multiplier=1, channel_base=16))
    img = G.sample(4, seed=0)
    assert img.shape == (4, 3, res, res) and torch.isfinite(img).all()
    assert G.num_latents == 2 * (res.bit_length() - 1) - 2
    logits = D(img)
    assert logits.shape == (4, 1) and torch.isfinite(logits).all()


def test_channel_table_official_and_scaled():
    assert stylegan2.channel_table(2, 512) == {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128,
                                               512: 64, 1024: 32}
    assert stylegan2.channel_table(1, 64) == {4: 64, 8: 64, 16: 64, 32: 64, 64: 32, 128: 16, 256: 8, 512: 4,
                                              1024: 2}


def test_noise_modes_truncation_and_mixing():
    torch.manual_seed(0)
    G = tiny_gen(32).eval()
    for m in G.modules():
        if isinstance(m, stylegan2.NoiseInjection):
            m.weight.data.fill_(0.5)  # initialised to zero: noise would have no effect
    z = torch.randn(2, 16)
    with torch.no_grad():
        assert torch.equal(G(z, noise="const"), G(z, noise="const"))
        assert not torch.equal(G(z, noise="random"), G(z, noise="random"))
        mean = G.mean_latent(256)
        same = G(z, truncation=0.0, truncation_latent=mean, noise="const")  # psi = 0: every z maps to mean w
        torch.testing.assert_close(same[0], same[1])
        w0, w1 = G.mapping(z[:1]), G.mapping(z[1:])
        img, lat = G([w0, w1], input_is_latent=True, inject_index=3, noise="const", return_latents=True)
        assert torch.equal(lat[0, :3], w0.expand(3, -1)) and torch.equal(lat[0, 3:], w1.expand(G.num_latents - 3, -1))
        per_layer = G(lat, input_is_latent=True, noise="const")
        torch.testing.assert_close(img, per_layer)
    with pytest.raises(ValueError, match="truncation_latent"):
        G(z, truncation=0.5)


def test_generator_gradients_reach_all_parameters():
    torch.manual_seed(0)
    G = tiny_gen(32)
    G(torch.randn(2, 16)).square().mean().backward()
    for n, p in G.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_discriminator_needs_divisible_batch():
    D = stylegan2.Discriminator(stylegan2.DiscriminatorConfig(in_size=16, channel_multiplier=1, channel_base=16))
    with pytest.raises(ValueError, match="divisible"):
        D(torch.zeros(6, 3, 16, 16))
    with pytest.raises(AssertionError, match="expects"):
        D(torch.zeros(4, 3, 32, 32))
