"""GLEAN super-resolution (Chan et al., CVPR 2021) as an installed package: `pip install .` in a clone, or the wheel
`pip wheel --no-deps . -w dist` builds there (no package index serves it).

    from glean_sr import load_model, upscale
    model = load_model()                               # the shipped 8x face model: offline, no download
    image = upscale(model, PIL.Image.open("face.png"))

Commands: `glean-upscale` (infer.py's command line) and `glean-demo` (the Gradio app, with the `demo` extra).
The project's modules are glean_sr.glean, .glean_fast, .stylegan2, .zoo, .images, .infer, .train, ...: in a
wheel they live in this folder (setup.py copies the repository's flat files here at build time, their imports of
each other made relative); in a clone or an editable install they are the flat files themselves.
"""
import sys
from pathlib import Path

WHEEL = (Path(__file__).parent / "infer.py").is_file()

if WHEEL:
    from . import glean, glean_fast, images, infer, stylegan2, zoo
else:                                                  # a clone or `pip install -e .`: the repository's own files
    import glean  # noqa: F401
    import glean_fast  # noqa: F401
    import images  # noqa: F401
    import infer
    import stylegan2  # noqa: F401
    import zoo  # noqa: F401

load_model, upscale = infer.load_model, infer.upscale


def upscale_cli() -> int:
    """The `glean-upscale` command: infer.py's command line, its --help showing the command as it is typed here."""
    infer.__doc__ = infer.__doc__.replace("python infer.py", "glean-upscale")
    return infer.main()


def demo_cli() -> int:
    """The `glean-demo` command: demo.py's app (needs the `demo` extra)."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: glean-demo needs Gradio: pip install gradio, or reinstall with the demo extra "
              "(pip install '.[demo]' in the clone)", file=sys.stderr)
        return 2
    if WHEEL:
        from . import demo
    else:
        import demo
    demo.__doc__ = demo.__doc__.replace("python demo.py", "glean-demo")   # --help shows the command as typed
    return demo.main()
