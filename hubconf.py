"""torch.hub entry points, e.g. torch.hub.load("<owner>/glean", "glean_face_small_8x").

Each builder takes keyword-only `pretrained=True, progress=True`; the weights are declared once in
zoo.WEIGHTS (address with a sha256 prefix, sizes, category, licence) and checked after download.
GLEAN models come as glean_fast.GLEANFast (the reference network, computed faster); see torch.hub.help(...).
"""
dependencies = ["torch", "numpy", "PIL", "safetensors"]

import glean  # noqa: E402
import glean_fast  # noqa: E402
import stylegan2  # noqa: E402
import zoo  # noqa: E402   (modules only: every public callable here is a hub entry)


def _entry(name: str, pretrained: bool, progress: bool):
    w = zoo.WEIGHTS[name]
    if w.kind.startswith("stylegan2"):
        if pretrained:
            return zoo.load_bank(name, progress=progress)
        return stylegan2.Generator(stylegan2.GeneratorConfig(**w.config)).eval()
    if pretrained:
        return zoo.load_pretrained(name, progress=progress)
    return glean_fast.GLEANFast(glean.GLEANConfig(**w.config)).eval()


def _describe(fn):
    """Write a builder's docstring (shown by torch.hub.help and help(hubconf)) from its WEIGHTS entry."""
    w = zoo.WEIGHTS[fn.__name__]
    c = w.config
    sizes = (f"{c['in_size']}x{c['in_size']} -> {c['out_size']}x{c['out_size']} ({c['out_size'] // c['in_size']}x)"
             if "in_size" in c else f"{c['out_size']}x{c['out_size']} images")
    fn.__doc__ = (f"{w.note or fn.__name__}.\n\n    {sizes}; {w.category}; input and output {w.pixel_range}.\n"
                  f"    Weights: {w.url} (sha256 {w.sha256}...).\n    Licence: {w.license}.\n\n"
                  f"    pretrained=False gives the same network with random weights; progress shows the download.")
    return fn


@_describe
def glean_face_small_8x(*, pretrained: bool = True, progress: bool = True) -> glean.GLEAN:
    return _entry("glean_face_small_8x", pretrained, progress)


@_describe
def glean_face_in16_8x(*, pretrained: bool = True, progress: bool = True) -> glean.GLEAN:
    return _entry("glean_face_in16_8x", pretrained, progress)


@_describe
def glean_face_in32_4x(*, pretrained: bool = True, progress: bool = True) -> glean.GLEAN:
    return _entry("glean_face_in32_4x", pretrained, progress)


@_describe
def glean_face_16x(*, pretrained: bool = True, progress: bool = True) -> glean.GLEAN:
    return _entry("glean_face_16x", pretrained, progress)


@_describe
def glean_face_in128_8x(*, pretrained: bool = True, progress: bool = True) -> glean.GLEAN:
    return _entry("glean_face_in128_8x", pretrained, progress)


@_describe
def glean_cat_8x(*, pretrained: bool = True, progress: bool = True) -> glean.GLEAN:
    return _entry("glean_cat_8x", pretrained, progress)


@_describe
def glean_cat_16x(*, pretrained: bool = True, progress: bool = True) -> glean.GLEAN:
    return _entry("glean_cat_16x", pretrained, progress)


@_describe
def stylegan2_ffhq_1024(*, pretrained: bool = True, progress: bool = True) -> stylegan2.Generator:
    return _entry("stylegan2_ffhq_1024", pretrained, progress)


@_describe
def stylegan2_cat_256(*, pretrained: bool = True, progress: bool = True) -> stylegan2.Generator:
    return _entry("stylegan2_cat_256", pretrained, progress)


@_describe
def stylegan2_celeba_64(*, pretrained: bool = True, progress: bool = True) -> stylegan2.Generator:
    return _entry("stylegan2_celeba_64", pretrained, progress)


@_describe
def stylegan2_lfw_128(*, pretrained: bool = True, progress: bool = True) -> stylegan2.Generator:
    return _entry("stylegan2_lfw_128", pretrained, progress)
