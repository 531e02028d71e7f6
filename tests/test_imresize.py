"""MATLAB-compatible bicubic imresize against known values."""
import math

import numpy as np
import pytest
import torch

from images import cubic, imresize, resize_matrix

# MATLAB's bicubic kernel (Keys, a = -0.5) at the distances a 2x upscale samples: 1/4, 3/4, 5/4, 7/4
K = {0.25: 0.8671875, 0.75: 0.2265625, 1.25: -0.0703125, 1.75: -0.0234375}


def test_kernel_values():
    for d, v in K.items():
        assert cubic(torch.tensor([d, -d], dtype=torch.float64)).tolist() == [v, v]
    assert cubic(torch.tensor([0.0, 1.0, 2.0, 2.5], dtype=torch.float64)).tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("scale,size", [(1 / 4, None), (1 / 16, None), (3.0, None), (None, (5, 9))])
def test_constant_image_stays_constant(scale, size):
    img = torch.full((2, 3, 64, 48), 0.37, dtype=torch.float64)
    out = imresize(img, scale=scale, size=size)
    torch.testing.assert_close(out, torch.full_like(out, 0.37), atol=1e-12, rtol=0)


def test_upscale_impulse_response_hand_computed():
    """2x upscale of an impulse: output pixel j samples u = j/2 + 1/4 (1-based), so the response is the kernel at
    distances 7/4, 5/4, 3/4, 1/4, 1/4, 3/4, 5/4, 7/4 with signs -,-,+,+,+,+,-,-."""
    x = torch.zeros(1, 12, dtype=torch.float64)
    x[0, 5] = 1.0                                      # 1-based index 6
    out = imresize(x[None], scale=2.0)[0, 0]           # treat as a [1, 1, 12] image, resize only W (H: 1 -> 2)
    expected = [-0.0234375, -0.0703125, 0.2265625, 0.8671875, 0.8671875, 0.2265625, -0.0703125, -0.0234375]
    assert out.tolist()[7:15] == expected
    assert out[:7].abs().max() == 0 and out[15:].abs().max() == 0


def test_boundary_is_mirrored_hand_computed():
    """First output of a 2x upscale (u = 0.75): taps at 1-based -1, 0, 1, 2 mirror to 2, 1, 1, 2:
    (K(3/4) + K(1/4)) x1 + (K(7/4) + K(5/4)) x2 = 1.09375 x1 - 0.09375 x2."""
    m = resize_matrix(6, 12, 2.0)
    assert m[0, :3].tolist() == [1.09375, -0.09375, 0.0]


def test_linear_ramp_reproduced_away_from_borders():
    """Cubic convolution reproduces linear functions; output j samples u_j = j / s + (1 - 1/s) / 2 (1-based)."""
    ramp = torch.arange(64, dtype=torch.float64)[None, None].expand(1, 64, 64)  # value = column index (0-based)
    for s in (2.0, 0.5, 0.25):
        out = imresize(ramp, scale=s)[0, 0]
        j = torch.arange(1, out.numel() + 1, dtype=torch.float64)
        u = j / s + 0.5 * (1 - 1 / s) - 1                                         # 0-based input coordinate
        margin = math.ceil(2 / min(s, 1) * min(s, 1) + 2)
        inner = slice(margin, out.numel() - margin)
        torch.testing.assert_close(out[inner], u[inner], atol=1e-9, rtol=0)


def test_antialiasing_kernel_is_stretched():
    """Downscaling by 4 with antialiasing: each output averages a 16-pixel-wide stretched kernel, 4 * K(4 d) * 1/4."""
    m = resize_matrix(64, 16, 0.25)
    row = m[5]                                    # 1-based output 6: u = 6 * 4 - 1.5 = 22.5
    idx = torch.arange(1, 65, dtype=torch.float64)
    w = 0.25 * cubic(0.25 * (22.5 - idx))
    torch.testing.assert_close(row, w / w.sum(), atol=1e-15, rtol=0)
    assert (row != 0).sum() == 16
    no_aa = resize_matrix(64, 16, 0.25, antialias=False)
    assert (no_aa[5] != 0).sum() == 4


def test_output_size_and_errors():
    img = torch.rand(3, 100, 60)
    assert imresize(img, scale=1 / 3).shape == (3, 34, 20)       # ceil, as MATLAB
    assert imresize(img, size=64).shape == (3, 64, 64)
    with pytest.raises(TypeError, match="float"):
        imresize(torch.zeros(3, 8, 8, dtype=torch.uint8), scale=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        imresize(img)


@pytest.mark.parametrize("shape,r", [((3, 9, 13), 2), ((2, 3, 16, 16), 4), ((3, 8, 8), 8), ((1, 100, 37), 3),
                                     ((3, 24, 40), 8)])
def test_integer_upscale_equals_the_dense_resize_matrices(shape, r):
    """imresize by an integer factor runs as polyphase convolutions: the same numbers as the resize matrices."""
    import images
    x = torch.rand(shape, dtype=torch.float64)
    H, W = shape[-2:]
    dense = images.resize_matrix(H, H * r, float(r)) @ x @ images.resize_matrix(W, W * r, float(r)).T
    torch.testing.assert_close(images.imresize(x, scale=r), dense, atol=1e-12, rtol=0)
    torch.testing.assert_close(images.imresize(x.float(), size=(H * r, W * r)), dense.float(), atol=2e-6, rtol=0)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_streamed_png_reads_back_exactly(tmp_path, channels, dtype):
    import images
    from PIL import Image
    rng = np.random.default_rng(channels)
    a = rng.integers(0, np.iinfo(dtype).max + 1, (37, 301, channels), dtype=dtype)
    a[5:9] = a[5:6]                                                     # smooth rows too (Sub filter wraps mod 256)
    images.write_image(a, tmp_path / "x.png", bits=16 if dtype == np.uint16 else 8)
    if dtype == np.uint16 and channels >= 2:                           # Pillow reads these as 8 bits
        cv2 = pytest.importorskip("cv2")
        back = cv2.imread(str(tmp_path / "x.png"), cv2.IMREAD_UNCHANGED)           # BGR(A); grey + alpha as BGRA
        back = back[..., [0, 3]] if channels == 2 else back[..., [2, 1, 0, 3][:channels]]
    else:
        with Image.open(tmp_path / "x.png") as im:
            back = np.asarray(im)
        back = back[..., None] if back.ndim == 2 else back
    assert back.shape == a.shape and np.array_equal(back.astype(np.int64), a.astype(np.int64))
