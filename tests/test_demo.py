"""demo.py: its handlers, and the whole app in a real browser (headless Chromium driven by Playwright)."""
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

gr = pytest.importorskip("gradio")
CHROMIUM = os.environ.get("GLEAN_CHROMIUM", "/usr/bin/chromium")


def test_import_is_light_and_handlers_work(model_file, tmp_path):
    import demo
    assert demo._models == {}                                   # nothing loaded at import
    face = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    face.save(tmp_path / "face.png")
    (before, after), strip, png = demo.upscale(str(tmp_path / "face.png"), str(model_file))
    assert before.size == after.size == (32, 32) and Image.open(png).size == (32, 32)   # degrade and restore
    assert strip.size == (4 * 128, 128 + 18)                        # LR the model saw, bicubic, GLEAN, original
    assert Path(png).name.startswith("face_glean") and Path(png).parent == demo.outbox()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "small.png")
    (before, after), strip, png = demo.upscale(str(tmp_path / "small.png"), str(model_file))
    assert after.size == (32, 32) and strip is None                   # the model's input size: upscaled as it is
    assert oct(demo.outbox().stat().st_mode & 0o777) == "0o700"         # private: not a predictable shared folder
    edited = {"background": face, "layers": [Image.new("RGBA", face.size)], "composite": face}
    out, png, said = demo.retouch(edited, str(model_file))        # nothing painted: the whole image
    assert "nothing painted" in said and "30x20 centre-cropped to 20x20" in said   # it says it cropped
    assert out.size == (32, 32)
    with pytest.raises(gr.Error, match="upload an image first"):
        demo.upscale(None, str(model_file))


def test_bad_uploads_get_a_message(model_file, tmp_path):
    """A text file named .png and a "decompression bomb" (a header claiming 12000x12000 pixels) are answered with a
    message naming the file and the problem, not Gradio's bare "Error"."""
    import demo
    from test_robustness import png_header_only
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(gr.Error, match=r"notes.png: not a readable image"):
        demo.upscale(str(tmp_path / "notes.png"), str(model_file))
    png_header_only(tmp_path / "bomb.png", 12000, 12000)
    t = time.perf_counter()
    with pytest.raises(gr.Error, match=r"bomb.png: 12000x12000 is 144 million pixels, above the limit of 16 million"):
        demo.upscale(str(tmp_path / "bomb.png"), str(model_file))
    assert time.perf_counter() - t < 1                                   # refused from the header, not decoded
    raw = {"path": str(tmp_path / "notes.png"), "orig_name": "my notes.png"}      # Gradio's file data
    with pytest.raises(gr.Error, match=r"my notes.png: not a readable image"):
        demo.upscale(raw, str(model_file))
    with pytest.raises(gr.Error, match="could not load"):
        demo.get_model(str(tmp_path / "notes.png"))


def test_models_that_need_a_download_are_marked(tmp_path, monkeypatch):
    import demo
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))                     # an empty download cache
    assert demo.model_label("glean_face_small_8x") == "glean_face_small_8x"
    assert demo.model_label("glean_face_16x") == "glean_face_16x (downloads on first use)"
    assert "downloaded on first use" in demo.describe("glean_face_16x")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
def test_upload_upscale_in_a_real_browser(model_file, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "demo.py"), "--model", str(model_file), "--port", str(port)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail(f"demo did not start: {server.stdout.read() if server.poll() is not None else ''}")
                time.sleep(0.5)
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
            tmp_path / "face.png")
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync"])
            page = browser.new_page()
            page.goto(url, wait_until="networkidle")
            page.set_input_files("#input-image input[type=file]", str(tmp_path / "face.png"))
            page.wait_for_selector("#input-image img", timeout=30_000)
            page.click("#upscale-button")
            page.wait_for_selector("#result-slider img", timeout=120_000)
            page.wait_for_function("() => [...document.querySelectorAll('#result-slider img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
            sizes = page.eval_on_selector_all("#result-slider img", "els => els.map(e => [e.naturalWidth, "
                                                                     "e.naturalHeight])")
            link = page.eval_on_selector("#result-file a", "a => a.href")
            page.get_by_role("tab", name="Retouch").click()        # the editor's images: files or blobs (read_editor)
            with page.expect_file_chooser() as chooser:
                page.get_by_text("Upload an image").click()
            chooser.value.set_files(str(tmp_path / "face.png"))
            page.wait_for_function("() => !document.querySelector('#retouch-editor').innerText"
                                   ".includes('Upload an image')", timeout=60_000)   # the image is on the canvas
            page.wait_for_load_state("networkidle")
            page.click("#retouch-button")
            page.wait_for_selector("#retouch-result img", timeout=120_000)
            page.wait_for_function("() => [...document.querySelectorAll('#retouch-result img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
            retouched = page.eval_on_selector("#retouch-result img", "e => [e.naturalWidth, e.naturalHeight]")
            browser.close()
        assert sizes and all(s == [32, 32] for s in sizes), sizes
        with urllib.request.urlopen(link) as r, Image.open(r) as im:   # the PNG offered for download
            assert im.size == (32, 32)
        assert retouched == [32, 32]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_results_folder_is_cleaned_and_slider_sends_png(monkeypatch, tmp_path):
    import demo
    folder = demo.outbox()
    old = folder / "old-result.png"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - demo.KEEP_RESULTS_S - 60,) * 2)
    demo.save_png(Image.new("RGB", (4, 4)), "fresh")
    assert not old.exists() and any(p.name.startswith("fresh-") for p in folder.iterdir())
    sliders = [b for b in demo.demo.blocks.values() if isinstance(b, gr.ImageSlider)]
    assert sliders and all(s.format == "png" for s in sliders)


def test_failed_download_is_one_line_on_the_console(monkeypatch, capsys):
    import demo
    import zoo
    from glean_io import CheckpointError

    def offline(*args, **kwargs):
        raise CheckpointError("could not download https://example/x.pth (no answer within 30 s); ...")
    monkeypatch.setattr(zoo, "download", offline)
    monkeypatch.setattr(zoo, "local_file", lambda name: None)
    with pytest.raises(gr.Error, match="could not load glean_cat_8x: could not download"):
        demo.get_model("glean_cat_8x")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "could not download" in err


def test_photo_tab_marks_faces_and_returns_the_whole_photo_at_full_size(tmp_path):
    pytest.importorskip("skimage")
    import demo
    import faces
    scene, placed = faces.face_scene()
    Image.fromarray((scene * 255).round().astype(np.uint8)).save(tmp_path / "group.png")
    marked, restored, png, info = demo.photo(str(tmp_path / "group.png"), demo.AUTO, 2)
    assert marked.size == (640, 480) and restored.size == (1280, 960) and Image.open(png).size == (1280, 960)
    lines = info.splitlines()
    assert lines[0].startswith("The photo upscaled 2.00x") and f"of {len(placed)} detection(s)" in lines[0]
    assert sum(line[0].isdigit() for line in lines) == len(placed)                # one line per face, numbered
    said = [line for line in lines if line[0].isdigit()]
    assert all("left as the bicubic upscale: too large" in line or "restored by glean_face_in" in line
               for line in said)                                      # each face: restored by which model, or why not
    assert any("restored by glean_face_in32_4x" in line for line in said)       # the smallest face: 32 -> 128 fits
    assert any("(a download) fits it" in line for line in said)                   # the largest: only downloads fit
    marks = np.asarray(marked).astype(int) - np.asarray(Image.open(tmp_path / "group.png")).astype(int)
    assert np.abs(marks).sum() > 0                                                # the faces are marked
    with pytest.raises(gr.Error, match="not a face model"):
        demo.photo(str(tmp_path / "group.png"), "glean_cat_8x", 2)


# -- uploads from strangers: every tab decodes them itself, with a per-call limit -----------------------------


def jpeg_bomb(path) -> Path:
    """A 629-byte JPEG whose header declares 65500x65500 pixels (12.9 GB decoded as RGB), as in issue 19."""
    import io
    import struct
    b = io.BytesIO()
    Image.new("RGB", (8, 8), "gray").save(b, "JPEG")
    data, i = bytearray(b.getvalue()), 2
    while data[i + 1] not in (0xC0, 0xC2):                               # to the frame header (SOF)
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    data[i + 5:i + 9] = struct.pack(">HH", 65500, 65500)
    Path(path).write_bytes(bytes(data))
    return Path(path)


BOMB = r"65500x65500 is 4290 million pixels, above the limit of 16 million"


def test_overlapping_requests_then_a_bomb_in_every_tab(model_file, tmp_path, monkeypatch):
    """Upscale, Photo and Retouch requests run at once (as Gradio runs different events); Pillow's process-wide limit
    never changes meanwhile, and then a bomb sent to each tab, as a file or as the editor's blobs, is refused from
    its header: nothing of its size is ever decoded."""
    import demo
    import images
    from gradio.components.image_editor import EditorDataBlobs
    decoded, real = [], images.from_pil
    monkeypatch.setattr(images, "from_pil", lambda im, *a: decoded.append(im.size) or real(im, *a))
    face = tmp_path / "face.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 32, 3), dtype=np.uint8)).save(face)
    limit, errors, stop = Image.MAX_IMAGE_PIXELS, [], threading.Event()
    jobs = [lambda: demo.upscale(str(face), str(model_file)), lambda: demo.photo(str(face), "glean_face_small_8x", 2),
            lambda: demo.retouch({"background": {"path": str(face)}, "layers": []}, str(model_file))]

    def loop(job):
        while not stop.is_set():
            try:
                job()
            except Exception as e:                                      # noqa: BLE001 (reported below)
                errors.append(e)
    threads = [threading.Thread(target=loop, args=(job,)) for job in jobs * 2]
    for t in threads:
        t.start()
    deadline = time.time() + 4
    while time.time() < deadline:
        assert Image.MAX_IMAGE_PIXELS == limit
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join()
    assert errors == [] and len(decoded) > 6 and Image.MAX_IMAGE_PIXELS == limit
    bomb = jpeg_bomb(tmp_path / "bomb.jpg")
    blobs = {"edit1": EditorDataBlobs(background=bomb.read_bytes(), layers=[], composite=None),
             "edit2": EditorDataBlobs(background=face.read_bytes(), layers=[bomb.read_bytes()], composite=None)}
    for job in (lambda: demo.upscale(str(bomb), str(model_file)),
                lambda: demo.photo({"path": str(bomb), "orig_name": "b.jpg"}, "glean_face_small_8x", 2),
                lambda: demo.retouch({"background": {"path": str(bomb)}, "layers": []}, str(model_file)),
                lambda: demo.retouch({"id": "edit1"}, str(model_file), blobs),
                lambda: demo.retouch({"id": "edit2"}, str(model_file), blobs)):
        with pytest.raises(gr.Error, match=BOMB):
            job()
    assert blobs == {} and max(w * h for w, h in decoded) < demo.MAX_UPLOAD_PIXELS


def test_the_retouch_editor_keeps_bounded_uploads(model_file):
    """Gradio's ImageEditor stores each edit's images until an event uses them: here a layer index of 10**9 is
    refused (it would make a list that long) and only the newest MAX_EDITS edits are kept."""
    import demo
    from types import SimpleNamespace
    editor = demo.demo.blocks[next(k for k, b in demo.demo.blocks.items() if isinstance(b, gr.ImageEditor))]
    editor.blob_storage.clear()

    def send(edit, kind="layer", index="0"):
        editor.accept_blobs(SimpleNamespace(data={"type": kind, "index": index, "id": edit, "file": b""},
                                            files=[("layer.png", b"png bytes")]))
    with pytest.raises(ValueError, match="layer index '1000000000' refused"):
        send("big", index=str(10 ** 9))
    assert editor.blob_storage == {}
    for i in range(3 * demo.MAX_EDITS):
        send(f"edit{i}", "background", None)
    assert list(editor.blob_storage) == [f"edit{i}" for i in range(2 * demo.MAX_EDITS, 3 * demo.MAX_EDITS)]
    editor.blob_storage.clear()


def test_painted_layers_mark_the_region_to_redraw(model_file, tmp_path):
    import demo
    rng = np.random.default_rng(2)
    photo = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    paint = np.zeros((32, 32, 4), np.uint8)
    paint[4:12, 20:30] = 255                                             # white strokes, opaque
    layer = Image.fromarray(paint, "RGBA")
    out, _, said = demo.retouch({"background": photo, "layers": [layer]}, str(model_file))
    whole, _, _ = demo.retouch({"background": photo, "layers": []}, str(model_file))
    assert "the painted region only" in said
    out, whole, orig = (np.asarray(x, dtype=np.int16) for x in (out, whole, photo))
    assert np.array_equal(out[4:12, 20:30], whole[4:12, 20:30])          # the painted region: redrawn by GLEAN
    assert np.array_equal(out[16:, :16], orig[16:, :16])                 # elsewhere: the edited image as it was
    assert not np.array_equal(whole[16:, :16], orig[16:, :16])
    small = Image.new("RGBA", (16, 16))
    with pytest.raises(gr.Error, match="the painted layer is 16x16, the image 32x32"):
        demo.retouch({"background": photo, "layers": [small]}, str(model_file))


SERVER_RSS_MB = 3000     # the demo server's peak memory after all this (a decoded bomb alone: 12.9 GB)


def test_overlapping_requests_then_bombs_through_the_server(model_file, tmp_path):
    """The same through a running demo server and Gradio's client: requests to the three tabs overlap, then a bomb
    goes to each; each bomb gets its message, the server stays up, its peak memory stays low."""
    client_lib = pytest.importorskip("gradio_client")
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "demo.py"), "--model", str(model_file), "--port", str(port)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = wait_for(server, f"http://127.0.0.1:{port}")
        photos = [tmp_path / f"face{i}.png" for i in range(3)]
        for i, p in enumerate(photos):      # different pictures: Gradio caches results by content, and two equal
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 32, 3), dtype=np.uint8)).save(p)
        bomb = jpeg_bomb(tmp_path / "bomb.jpg")                             # ones written at once can race there
        client = client_lib.Client(url, verbose=False)
        f = client_lib.handle_file

        def calls(image):
            return [((f(image), str(model_file)), "/upscale"), ((f(image), "glean_face_small_8x", 2), "/photo"),
                    (({"background": f(image), "layers": [], "composite": None, "id": None}, str(model_file)),
                     "/retouch")]
        jobs = [client.submit(*args, api_name=api) for p in photos for args, api in calls(p)]
        assert all(job.result(timeout=300) for job in jobs)
        for args, api in calls(bomb):
            with pytest.raises(Exception, match=BOMB):
                client.predict(*args, api_name=api)
        assert server.poll() is None
        status = Path(f"/proc/{server.pid}/status").read_text()
        peak = int(status.split("VmHWM:")[1].split()[0]) / 1024
        print(f"demo server peak memory: {peak:.0f} MB")
        assert peak < SERVER_RSS_MB
    finally:
        server.terminate()
        server.wait(timeout=30)


def wait_for(server, url: str) -> str:
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return url
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                pytest.fail(f"demo did not start: {server.stdout.read() if server.poll() is not None else ''}")
            time.sleep(0.5)


def test_errors_are_one_line_on_the_console_too(model_file, tmp_path, capsys):
    """Gradio prints a traceback for every gr.Error by default; the demo's say one line, on the console as in the
    browser, for bad input and for unexpected failures alike."""
    import demo
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(gr.Error) as bad:
        demo.upscale(str(tmp_path / "notes.png"), str(model_file))
    assert bad.value.print_exception is False
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("demo: ") and "notes.png: not a readable image" in err

    @demo.one_line_errors
    def broken(x):
        return {}[x]
    with pytest.raises(gr.Error, match="broken failed: KeyError"):
        broken("k")
    assert capsys.readouterr().err.count("\n") == 1
