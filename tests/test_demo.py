"""demo.py: its handlers, and the whole app in a real browser (headless Chromium driven by Playwright)."""
import os
import socket
import subprocess
import sys
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
    out, png = demo.retouch(edited, str(model_file))              # nothing painted: the whole image
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
            browser.close()
        assert sizes and all(s == [32, 32] for s in sizes), sizes
        with urllib.request.urlopen(link) as r, Image.open(r) as im:   # the PNG offered for download
            assert im.size == (32, 32)
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
    assert all("left as the bicubic upscale" in line for line in lines if line[0].isdigit())   # no model fits
    marks = np.asarray(marked).astype(int) - np.asarray(Image.open(tmp_path / "group.png")).astype(int)
    assert np.abs(marks).sum() > 0                                                # the faces are marked
    with pytest.raises(gr.Error, match="not a face model"):
        demo.photo(str(tmp_path / "group.png"), "glean_cat_8x", 2)
