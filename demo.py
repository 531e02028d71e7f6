"""GLEAN in the browser (Gradio): upload an image, compare bicubic and GLEAN with a slider, download the PNG,
and retouch (Sec. 6): paint over a flawed region of an edited photo and let GLEAN redraw it.

    pip install -e ".[demo]"
    python demo.py            # http://127.0.0.1:7860

Built on infer.upscale / infer.retouch_arrays; models load on first use and stay cached. Nothing heavy at import.
"""
import os
import tempfile
import threading
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

import glean
import images
import infer
import zoo

MODELS = [zoo.DEFAULT_MODEL] + [n for n, w in zoo.WEIGHTS.items()
                                  if w.kind.startswith("glean") and n != zoo.DEFAULT_MODEL]
MAX_UPLOAD = "10mb"              # larger uploads are refused by the server
_models, _lock = {}, threading.Lock()


def get_model(name: str) -> glean.GLEAN:
    """Load a registered model or a checkpoint file once (first use may download it) and keep it."""
    if name not in zoo.WEIGHTS and not Path(name).is_file():
        raise gr.Error(f"unknown model '{name}'")
    with _lock:
        if name not in _models:
            try:
                _models[name] = infer.load_model(name, "cuda" if torch.cuda.is_available() else "cpu")
            except Exception as e:  # shown to the user in the page; the server keeps running
                raise gr.Error(f"could not load {name}: {e}") from e
        return _models[name]


def describe(name: str) -> str:
    if name not in zoo.WEIGHTS:
        return f"**{Path(name).name}**: a local checkpoint."
    w, c = zoo.WEIGHTS[name], zoo.WEIGHTS[name].config
    return (f"**{name}**: {c['in_size']}x{c['in_size']} -> {c['out_size']}x{c['out_size']}, {w.category}. "
            f"Inputs of another size are centre-cropped and resized to {c['in_size']}x{c['in_size']}. "
            f"Licence: {w.license}.")


def save_png(image: Image.Image, stem: str) -> str:
    path = Path(tempfile.mkdtemp(prefix="glean-")) / f"{stem}_glean.png"
    image.save(path)
    return str(path)


def bicubic_baseline(model: glean.GLEAN, image: Image.Image) -> Image.Image:
    """What the model sees (cropped and resized to in_size), enlarged with MATLAB bicubic: the 'before'."""
    a, _ = images.from_pil(image.convert("RGB"))
    rgb, _, _ = infer.split(a)
    lr, _ = infer.fit(rgb, model.cfg.in_size, strict=False, pad=False, notes=[])
    up = images.imresize(lr, size=model.cfg.out_size).clamp(0, 1)
    return Image.fromarray((up.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def upscale(image, name: str):
    if image is None:
        raise gr.Error("upload an image first")
    model = get_model(name)
    try:
        out = infer.upscale(model, image)
    except images.InputError as e:
        raise gr.Error(str(e)) from e
    before = bicubic_baseline(model, image)
    return (before, out.convert("RGB")), save_png(out, "upscaled"), describe(name)


def retouch(edited, name: str):
    """edited: Gradio's ImageEditor value; whatever is painted on the layers marks the region to redraw."""
    if edited is None or edited.get("background") is None:
        raise gr.Error("upload an edited image first")
    model = get_model(name)
    background = np.asarray(edited["background"].convert("RGB"), dtype=np.float32) / 255
    mask = None
    layers = [np.asarray(layer.convert("RGBA")) for layer in edited.get("layers") or []]
    if layers and any(layer[..., 3].any() for layer in layers):
        mask = (np.max([layer[..., 3] for layer in layers], axis=0) > 0).astype(np.float32)[..., None]
    out = infer.retouch_arrays(model, background, mask)
    result = images.to_pil(out)
    return result, save_png(result, "retouched")


def example_files() -> list:
    """The example images as files Gradio can show (scikit-image's astronaut face and cat)."""
    folder = Path(tempfile.gettempdir()) / "glean-examples"
    folder.mkdir(exist_ok=True)
    paths = []
    for name in images.EXAMPLES:
        path = folder / f"{name}.png"
        if not path.exists():
            try:
                images.example_image(name).save(path)
            except images.InputError:
                continue  # scikit-image not installed: no examples
        paths.append([str(path)])
    return paths


def build(models: list) -> gr.Blocks:
    """The app: an Upscale tab and a Retouch tab, with `models` to choose from (the first is the default)."""
    with gr.Blocks(title="GLEAN super-resolution") as app:
        gr.Markdown("# GLEAN: large-factor super-resolution with a generative latent bank\n"
                    "Upload a photo (faces work best with the face models); GLEAN redraws it at 8x-16x. "
                    "The slider compares bicubic upscaling (left) with GLEAN (right).")
        with gr.Tab("Upscale"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="pil", label="Low-resolution input", sources=["upload", "clipboard"],
                                     image_mode=None, elem_id="input-image")
                    model = gr.Dropdown(models, value=models[0], label="Model")
                    go = gr.Button("Upscale", variant="primary", elem_id="upscale-button")
                    gr.Examples(example_files(), inputs=[image], label="Examples (scikit-image)")
                with gr.Column():
                    compare = gr.ImageSlider(label="Bicubic | GLEAN", type="pil", elem_id="result-slider")
                    download = gr.File(label="Download PNG", elem_id="result-file")
                    info = gr.Markdown(describe(models[0]))
            model.change(describe, model, info)
            go.click(upscale, [image, model], [compare, download, info])
        with gr.Tab("Retouch"):
            gr.Markdown("Sec. 6 of the paper: load an edited photo and paint over the region with artefacts. GLEAN "
                        "downsamples the photo, super-resolves it back and replaces the painted region (the whole "
                        "image if nothing is painted).")
            with gr.Row():
                editor = gr.ImageEditor(type="pil", label="Edited photo (paint the region to fix)", sources=["upload"],
                                        brush=gr.Brush(colors=["#ffffff"], default_size=12), layers=False)
                with gr.Column():
                    retouched = gr.Image(type="pil", label="Retouched", interactive=False)
                    retouch_file = gr.File(label="Download PNG")
            retouch_model = gr.Dropdown(models, value=models[0], label="Model")
            gr.Button("Retouch", variant="primary").click(retouch, [editor, retouch_model], [retouched, retouch_file])
    app.queue(max_size=16, default_concurrency_limit=1)  # one job at a time on the model, at most 16 waiting
    return app


demo = build(MODELS)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="registered name or checkpoint file (repeatable); "
                                                                  "the first one is the default")
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    args = ap.parse_args()
    app = build(args.model + [m for m in MODELS if m not in args.model]) if args.model else demo
    app.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD)
