"""GLEAN in the browser (Gradio): upload an image, compare bicubic and GLEAN with a slider, download the PNG,
and retouch (Sec. 6): paint over a flawed region of an edited photo and let GLEAN redraw it.

    pip install -e ".[demo]"
    python demo.py            # http://127.0.0.1:7860  (glean-demo after a pip install)

Built on infer.py; models load on first use and stay cached. Nothing heavy at import. Every upload, in every tab
(the retouch editor's painted layers included), is decoded by the app itself, never by Gradio first, with this
demo's pixel limit checked per call from the file's header (Pillow's process-wide limit is never changed), so a
file that is no image, or one of too many pixels, gets a message that says so and is never decoded; results wait in
a private temporary folder that is cleaned up.
"""
import atexit
import functools
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

import glean
import glean_fast
import images
import infer
import photos
import zoo
from glean_io import CheckpointError, one_line

MODELS = [zoo.DEFAULT_MODEL] + [n for n, w in zoo.WEIGHTS.items()
                                if w.kind.startswith("glean") and n != zoo.DEFAULT_MODEL]
MAX_UPLOAD = "10mb"              # larger uploads are refused by the server
MAX_UPLOAD_PIXELS = 16_000_000   # and larger images before they are decoded (12000x12000 held the worker ~11 s)
MAX_RESULT_PIXELS = 40_000_000   # the Photo tab lowers its scale to stay under this
KEEP_RESULTS_S = 15 * 60         # downloads are deleted after this long
_models, _lock = {}, threading.Lock()
_outbox: list = []               # the private results folder, made on first use
_precision = ["auto"]            # the models' precision (--precision; infer.load_model)


def fail(message: str) -> gr.Error:
    """The error a handler raises for the user: shown in the browser, and one line on the server's console instead of
    Gradio's traceback (print_exception=False)."""
    message = one_line(str(message))
    print(f"demo: {message}", file=sys.stderr)
    return gr.Error(message, print_exception=False)


def one_line_errors(handler):
    """A handler whose unexpected errors (a bug, not bad input) reach the browser and the console as one line with
    the exception's type, like the expected ones; their traceback is not printed."""
    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:                                          # noqa: BLE001 - reported, not swallowed
            raise fail(f"{handler.__name__} failed: {type(e).__name__}: {e}") from None
    return wrapped


def read_upload(upload, what: str = "") -> tuple:
    """An upload as (array [H, W, C] in [0, 1], bits, file name), or a gr.Error that says what is wrong with it.
    `upload` is Gradio's file data (the events run with preprocess=False, so that Gradio does not decode the file
    first and answer a bad one with a bare "Error"; it has checked that the path is one of its uploads), a path, the
    bytes of a file (the retouch editor's), or a PIL image (direct calls). Images over MAX_UPLOAD_PIXELS are refused
    from their header, before they are decoded."""
    if upload is None:
        raise fail("upload an image first")
    if isinstance(upload, Image.Image):
        name = what or "image"
        if upload.width * upload.height > MAX_UPLOAD_PIXELS:
            raise fail(f"{name}: {upload.width}x{upload.height} is more than this demo's limit of "
                           f"{MAX_UPLOAD_PIXELS / 1e6:g} million pixels; run infer.py for larger images")
        try:
            return (*images.from_pil(upload, name), name)
        except images.InputError as e:
            raise fail(str(e)) from None
    if isinstance(upload, (bytes, bytearray)):
        path = outbox() / f"upload-{uuid.uuid4().hex[:8]}"
        path.write_bytes(upload)
        try:
            return read_upload(str(path), what or "image")
        finally:
            path.unlink(missing_ok=True)
    path = upload.get("path") if isinstance(upload, dict) else str(upload)
    name = what or (upload.get("orig_name") if isinstance(upload, dict) else None) or Path(path).name
    try:
        a, bits = images.read_image(path, max_pixels=MAX_UPLOAD_PIXELS)
    except images.InputError as e:
        message = str(e).replace(one_line(path), name).replace("raise it with --max-megapixels", "run infer.py "
                                                                                                "for larger images")
        raise fail(one_line(message)) from None
    return a, bits, name


def model_label(name: str) -> str:
    """The dropdown's words for a model: whether it is here or must be downloaded first."""
    if name not in zoo.WEIGHTS:
        return f"{Path(name).name} (local file)"
    where = zoo.local_file(name)
    return name if where is not None else f"{name} (downloads on first use)"


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def get_model(name: str) -> glean.GLEAN:
    """Load a registered model or a checkpoint file once (first use may download it) and keep it."""
    if name not in zoo.WEIGHTS and not Path(name).is_file():
        raise fail(f"unknown model '{name}'")
    with _lock:
        if name not in _models:
            try:
                _models[name] = infer.load_model(name, device(), _precision[0], notes=[])
            except (CheckpointError, images.InputError, ValueError, OSError) as e:
                raise fail(f"could not load {name}: {e}") from None
        return _models[name]


def describe(name: str) -> str:
    if name not in zoo.WEIGHTS:
        return f"**{Path(name).name}**: a local checkpoint."
    w, c = zoo.WEIGHTS[name], zoo.WEIGHTS[name].config
    download = "" if zoo.local_file(name) is not None else " Its weights are downloaded on first use."
    framing = ("its largest face is aligned to the model's framing" if w.template else
               "its centre square is taken")
    return (f"**{name}**: {c['in_size']}x{c['in_size']} -> {c['out_size']}x{c['out_size']}, {w.category}. A larger "
            f"upload is taken as the high-resolution original (the paper's setting): {framing}, shrunk to the "
            f"model's input with MATLAB's bicubic, and upscaled back.{download} Licence: {w.license}.")


def outbox() -> Path:
    """The private folder (mode 0700, removed at exit) where results wait to be downloaded; files older than
    KEEP_RESULTS_S are deleted whenever a new one is written."""
    if not _outbox:
        folder = Path(tempfile.mkdtemp(prefix="glean-demo-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _outbox.append(folder)
    folder, now = _outbox[0], time.time()
    for old in folder.iterdir():
        if now - old.stat().st_mtime > KEEP_RESULTS_S:
            old.unlink(missing_ok=True)
    return folder


def save_png(image: Image.Image, stem: str) -> str:
    path = outbox() / f"{stem}-{uuid.uuid4().hex[:8]}.png"
    image.save(path, format="PNG")
    return str(path)


def bicubic_baseline(model: glean.GLEAN, a: np.ndarray) -> Image.Image:
    """What the model sees (cropped and resized to in_size), enlarged with MATLAB bicubic: the 'before'."""
    rgb, _, _ = images.split(a)
    lr, _ = infer.fit(rgb, model.cfg.in_size, strict=False, pad=False, notes=[])
    up = images.imresize(lr, size=model.cfg.out_size).clamp(0, 1)
    return Image.fromarray((up.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@one_line_errors
def upscale(upload, name: str):
    """The Upscale tab. An upload larger than the model's input goes through infer.simulate (degrade and restore):
    the slider compares bicubic and GLEAN from the input the model saw, and a labelled strip shows that input,
    bicubic, GLEAN and the original. An upload of the model's input size (or smaller) is upscaled as it is."""
    a, bits, stem = read_upload(upload)
    model = get_model(name)
    stem = Path(stem).stem
    if max(a.shape[:2]) > model.cfg.in_size:
        try:
            r = infer.simulate(model, a, name=stem)
        except images.InputError as e:
            raise fail(f"{e}: upload a face photo, or one of {model.cfg.in_size}x{model.cfg.in_size} pixels to "
                           f"upscale it as it is") from None
        to_image = lambda x: images.to_pil(x)  # noqa: E731
        return ((to_image(r["bicubic"]), to_image(r["glean"])), to_image(r["compare"]),
                save_png(to_image(r["glean"]), stem + "_glean"))
    outs, _ = infer.upscale_arrays(model, [a])
    out = images.to_pil(outs[0], bits)
    before = bicubic_baseline(model, a)
    return (before, out.convert("RGB")), None, save_png(out, stem + "_glean")


AUTO = "auto"                    # the Photo tab's default: photos.py picks, per face, the offline model that fits


@one_line_errors
def photo(upload, name: str, outscale: float):
    """The Photo tab: the whole photo upscaled (bicubic) with each face that a model's input fits restored by that
    model and pasted back (photos.restore_photo); every face found is marked on the photo: green if restored (and
    by which model), orange if left as the bicubic upscale, grey if not taken for a face, each with the reason.
    The result is downloaded at full size."""
    a, _, stem = read_upload(upload)
    model = None
    if name != AUTO:
        if name in zoo.WEIGHTS and not zoo.WEIGHTS[name].template or infer.face_template(get_model(name)) is None:
            raise fail(f"{name} is not a face model: choose auto or one of "
                           f"{', '.join(n for n, w in zoo.WEIGHTS.items() if w.template)}")
        model = get_model(name)
    notes = []
    scale = float(outscale or (model.cfg.scale if model is not None else 4))
    limit = (MAX_RESULT_PIXELS / (a.shape[0] * a.shape[1])) ** 0.5
    if scale > limit:
        notes.append(f"scaled {limit:.2f}x instead of {scale:g}x, to keep the result under "
                     f"{MAX_RESULT_PIXELS / 1e6:g} million pixels")
        scale = math.floor(limit * 100) / 100
    try:
        r = photos.restore_photo(a, model=model, outscale=scale, name=Path(stem).name, max_output_pixels=0,
                                 precision=_precision[0])
    except images.InputError as e:
        raise fail(str(e)) from None
    result = images.to_pil(r.image)
    return (mark_faces(a, r.faces), result, save_png(result, Path(stem).stem + "_faces"),
            photo_info(r, scale, notes))


def mark_faces(a: np.ndarray, reports: list) -> Image.Image:
    """The photo with a box around every detection: green restored, orange left alone, grey not a face."""
    from PIL import ImageDraw
    marked = images.to_pil(a).convert("RGB")
    draw = ImageDraw.Draw(marked)
    width = max(1, round(max(a.shape[:2]) / 300))
    for i, f in enumerate(reports, 1):
        colour = "#20c020" if f.restored else "#a0a0a0" if f.reason.startswith("not taken") else "#ff9020"
        draw.rectangle(list(f.box), outline=colour, width=width)
        draw.text((f.box[0] + width + 1, f.box[1] + width), str(i), fill=colour)
    return marked


def photo_info(r, scale: float, notes: list) -> str:
    """What happened, face by face, in the numbering of the marked photo."""
    lines = [f"The photo upscaled {scale:.2f}x with MATLAB bicubic; "
             f"{sum(f.restored for f in r.faces)} of {len(r.faces)} detection(s) restored by a face model."]
    for i, f in enumerate(r.faces, 1):
        what = (f"restored by {f.model} (shrunk {f.shrink:.2f}x to its input)" if f.restored else
                f"left as the bicubic upscale: {f.reason}")
        lines.append(f"{i}. {what}")
    return "\n".join(lines + [f"- {n}" for n in notes + r.notes])


MAX_LAYERS = 4        # the retouch editor's layers (it shows one): indices beyond are refused
MAX_EDITS = 8         # the retouch editor's uploads kept, newest first; older ones are dropped


def guard_editor(editor: gr.ImageEditor) -> gr.ImageEditor:
    """Bound what Gradio's ImageEditor keeps. After each edit the browser sends the editor's images (background,
    layers, composite) through the component's `accept_blobs` server function, which stores them in memory until an
    event uses them: a client could name layer 10**9 (a list that long) or send edits without end. This instance's
    accept_blobs refuses such indices and keeps only the newest MAX_EDITS edits."""
    accept = editor.accept_blobs

    def accept_blobs(data):
        index = data.data.get("index")
        if index not in (None, "null", "") and not (str(index).isdigit() and int(index) < MAX_LAYERS):
            raise ValueError(f"layer index {str(index)[:20]!r} refused")
        accept(data)
        while len(editor.blob_storage) > MAX_EDITS:
            editor.blob_storage.pop(next(iter(editor.blob_storage)))       # (dicts keep insertion order)
    accept_blobs._is_server_fn = True                                       # what gradio.components.base.server marks
    editor.accept_blobs = accept_blobs
    return editor


def read_editor(edited, blobs: dict | None = None) -> tuple:
    """The retouch editor's raw value (preprocess=False) as (background array [H, W, C], painted mask [H, W, 1] or
    None). Gradio sends {'id': ...} for images it holds as blobs (`blobs`: the editor's blob_storage, emptied of that
    edit here), or {'background': file, 'layers': [files]}; each image is decoded by read_upload, with its limit."""
    if not isinstance(edited, dict):
        raise fail("upload an edited image first")
    if edited.get("id") is not None:
        stored = (blobs or {}).pop(edited["id"], None)
        if stored is None:
            raise fail("the edited image did not arrive; upload it again")
        background, layers = stored.background, stored.layers or []
    else:
        background, layers = edited.get("background"), edited.get("layers") or []
    if background is None:
        raise fail("upload an edited image first")
    a = read_upload(background, "the edited image")[0]
    mask = None
    for layer in layers:
        if layer is None:
            continue
        paint = read_upload(layer, "the painted layer")[0]
        if paint.shape[:2] != a.shape[:2]:
            raise fail(f"the painted layer is {paint.shape[1]}x{paint.shape[0]}, the image "
                           f"{a.shape[1]}x{a.shape[0]}; paint on the image again")
        painted = paint[..., -1:] > 0 if paint.shape[2] in (2, 4) else paint.max(axis=2, keepdims=True) > 0
        mask = painted if mask is None else mask | painted
    return a, (mask.astype(np.float32) if mask is not None and mask.any() else None)


@one_line_errors
def retouch(edited, name: str, blobs: dict | None = None):
    """The Retouch tab: `edited` is the editor's raw value (see read_editor); whatever is painted on its layers
    marks the region to redraw (nothing painted: the whole image)."""
    a, mask = read_editor(edited, blobs)
    model = get_model(name)
    notes = []
    out = infer.retouch_arrays(model, a, mask, notes=notes)
    result = images.to_pil(out)
    H, W = a.shape[:2]
    said = [f"The {W}x{H} image was redrawn at {result.width}x{result.height} from a "
            f"{model.cfg.in_size}x{model.cfg.in_size} version of it" +
            (" (the painted region only)." if mask is not None else " (nothing painted: the whole image).")]
    return result, save_png(result, "retouched"), "\n".join(said + [f"- {n}" for n in notes])


def example_files() -> list:
    """The example images as files Gradio can show (scikit-image's astronaut face and cat), in the private
    results folder."""
    paths = []
    for name in images.EXAMPLES:
        try:
            image = images.example_image(name)
        except images.InputError:
            continue                 # scikit-image not installed: no examples
        path = outbox() / f"{name}.png"
        image.save(path)
        paths.append([str(path)])
    return paths


def build(models: list) -> gr.Blocks:
    """The app: an Upscale tab and a Retouch tab, with `models` to choose from (the first is the default)."""
    choices = [(model_label(m), m) for m in models]
    with gr.Blocks(title="GLEAN super-resolution", delete_cache=(3600, 3600)) as app:
        gr.Markdown("# GLEAN: large-factor super-resolution with a generative latent bank\n"
                    "Upload a face photo: it is shrunk to the model's tiny input (8x8 pixels for the default model) "
                    "and GLEAN redraws it at 8x, next to bicubic from the same input and your original. The Photo "
                    "tab upscales a whole photo and restores each face a model fits.")
        with gr.Tab("Upscale"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", label="Photo (a face) or a low-resolution input",
                                     sources=["upload", "clipboard"], image_mode=None, elem_id="input-image")
                    model = gr.Dropdown(choices, value=models[0], label="Model")
                    go = gr.Button("Upscale", variant="primary", elem_id="upscale-button")
                    gr.Examples(example_files(), inputs=[image], label="Examples (scikit-image)")
                with gr.Column():
                    compare = gr.ImageSlider(label="Bicubic | GLEAN", type="pil", format="png",
                                             elem_id="result-slider")
                    strip = gr.Image(label="What the model saw, bicubic, GLEAN, your original", type="pil",
                                     format="png", interactive=False, elem_id="result-strip")
                    download = gr.File(label="Download GLEAN's result (PNG, full size)", elem_id="result-file")
                    info = gr.Markdown(describe(models[0]))
            model.change(describe, model, info)
            # the description is not an output: an error on a bad upload is shown without marking it "Error"
            go.click(upscale, [image, model], [compare, strip, download], preprocess=False)   # see read_upload
        with gr.Tab("Photo"):
            gr.Markdown("Faces in the wild: the whole photo is upscaled with bicubic, and each face that a face "
                        "model's input fits (it is shrunk at most 1.25x to fit) is restored by that model and "
                        "blended back over the face region. Faces no model fits are left as the bicubic upscale, "
                        "never made worse: the marked photo says which face got what, and why.")
            with gr.Row():
                with gr.Column():
                    photo_in = gr.Image(type="filepath", label="Photo", sources=["upload", "clipboard"],
                                        image_mode=None, elem_id="photo-image")
                    photo_model = gr.Dropdown([("auto: per face, the offline model that fits it", AUTO)] +
                                              [c for c in choices if zoo.WEIGHTS.get(c[1]) is None or
                                               zoo.WEIGHTS[c[1]].template], value=AUTO, label="Model")
                    outscale = gr.Slider(0, 16, value=0, step=0.5, label="Scale (0: 4x, or the model's)")
                    photo_go = gr.Button("Restore faces", variant="primary", elem_id="photo-button")
                with gr.Column():
                    marked = gr.Image(label="Faces found", type="pil", format="png", interactive=False)
                    restored = gr.Image(label="Upscaled photo", type="pil", format="png", interactive=False,
                                        elem_id="photo-result")
                    photo_file = gr.File(label="Download (PNG, full size)", elem_id="photo-file")
                    photo_notes = gr.Markdown()
            photo_go.click(photo, [photo_in, photo_model, outscale], [marked, restored, photo_file, photo_notes],
                           preprocess=False)
        with gr.Tab("Retouch"):
            gr.Markdown("Sec. 6 of the paper: load an edited photo and paint over the region with artefacts. GLEAN "
                        "downsamples the photo, super-resolves it back and replaces the painted region (the whole "
                        "image if nothing is painted).")
            with gr.Row():
                editor = guard_editor(gr.ImageEditor(type="filepath", label="Edited photo (paint the region to fix)",
                                                     sources=["upload"], layers=False, elem_id="retouch-editor",
                                                     brush=gr.Brush(colors=["#ffffff"], default_size=12)))
                with gr.Column():
                    retouched = gr.Image(type="pil", label="Retouched", interactive=False, format="png",
                                         elem_id="retouch-result")
                    retouch_file = gr.File(label="Download PNG")
                    retouch_notes = gr.Markdown()
            retouch_model = gr.Dropdown(choices, value=models[0], label="Model")
            gr.Button("Retouch", variant="primary", elem_id="retouch-button").click(
                lambda edited, name: retouch(edited, name, editor.blob_storage), [editor, retouch_model],
                [retouched, retouch_file, retouch_notes], preprocess=False, api_name="retouch")   # see read_editor
    app.queue(max_size=16, default_concurrency_limit=1)  # one job at a time on the model, at most 16 waiting
    return app


demo = build(MODELS)


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="registered name or checkpoint file (repeatable); "
                                                                  "the first one is the default")
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                    help="address to serve on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                    help="port (default: $GRADIO_SERVER_PORT or 7860)")
    ap.add_argument("--precision", choices=["auto", *glean_fast.PRECISIONS], default="auto",
                    help=f"the models' precision ({glean_fast.AUTO_RULE}; default: auto)")
    args = ap.parse_args(argv)
    missing = [m for m in args.model if m not in zoo.WEIGHTS and not Path(m).is_file()]
    if missing:
        print(f"error: --model {missing[0]}: neither a registered model ({', '.join(zoo.WEIGHTS)}) nor a file",
              file=sys.stderr)
        return 2
    dev = torch.device(device())
    chosen, note = glean_fast.choose_precision(args.precision, dev)
    print(glean_fast.precision_line(args.precision, chosen, dev))          # stdout, as infer.py says it
    if note:
        print(f"note: {note}", file=sys.stderr)
    _precision[0] = args.precision
    app = build(args.model + [m for m in MODELS if m not in args.model]) if args.model else demo
    app.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD, show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
