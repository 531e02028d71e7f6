"""torch.hub entry points, e.g. torch.hub.load("<owner>/glean", "glean_face_small_8x").

Each builder takes keyword-only `pretrained=True, progress=True`; weights are declared once in glean.WEIGHTS
(address with a sha256 prefix, sizes, category, licence) and checked after download. See torch.hub.help(...).
"""
dependencies = ["torch", "numpy", "PIL", "safetensors"]

from glean import (glean_cat_8x, glean_cat_16x, glean_face_16x, glean_face_in128_8x,  # noqa: E402, F401
                   glean_face_small_8x, stylegan2_cat_256, stylegan2_celeba_64, stylegan2_ffhq_1024)
