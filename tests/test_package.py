"""A pip install is a whole product: the wheel built from a clean checkout, installed without the checkout on the
path, runs glean-upscale offline with the shipped model, starts glean-demo, and installs no generic top-level
names."""
import importlib.util
import os
import shutil
import site
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel of the working tree's tracked (and new, not ignored) files, installed into a folder of its own."""
    tmp = tmp_path_factory.mktemp("package")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    src = tmp / "checkout"
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True)
    (wheel,) = (tmp / "dist").glob("glean_sr-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--target", str(tmp / "site"), str(wheel)], check=True,
                   capture_output=True)
    return tmp


def env_without_checkout(installed: Path) -> dict:
    """Python without site processing (-S: no editable-install finder pointing at the checkout), seeing only the
    installed package and the dependencies' site-packages."""
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(installed / "site"), *deps]), PYTHONNOUSERSITE="1")


def test_wheel_contents_and_metadata(installed):
    (wheel,) = (installed / "dist").glob("glean_sr-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"glean_sr", wheel.name.split("-py3")[0] + ".dist-info"}       # one package, nothing generic
    assert {"glean_sr/infer.py", "glean_sr/glean.py", "glean_sr/weights/glean_face_small_8x.safetensors",
            "glean_sr/weights/stylegan2_celeba_64.safetensors", "glean_sr/weights/glean_face_in16_8x.safetensors",
            "glean_sr/weights/glean_face_in32_4x.safetensors", "glean_sr/weights/MODEL_CARD_128.md"} <= set(names)
    meta = zipfile.ZipFile(wheel).read(wheel.name.split("-py3")[0] + ".dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta and "Requires-Dist: tqdm" in meta
    assert any(n.endswith("licenses/LICENSE") for n in names) and any(n.endswith("MODEL_CARD.md") for n in names)
    assert any(n.endswith("licenses/weights/MODEL_CARD_128.md") for n in names)
    source = zipfile.ZipFile(wheel).read("glean_sr/infer.py").decode()
    assert "\nfrom . import glean\n" in source and "\nimport glean\n" not in source    # imports made relative
    dist_info = wheel.name.split("-py3")[0] + ".dist-info"
    assert sorted(p.name for p in (installed / "site").iterdir()) == sorted(["bin", "glean_sr", dist_info])


def test_glean_upscale_runs_offline_from_any_folder(installed):
    work = installed / "elsewhere"
    work.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(work / "x.png")
    env = env_without_checkout(installed)
    script = installed / "site" / "bin" / "glean-upscale"
    p = subprocess.run([sys.executable, "-S", str(script), "-i", "x.png", "-o", "out"], cwd=work, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    with Image.open(work / "out" / "x_glean.png") as im:
        assert im.size == (64, 64)
    probe = ("import importlib.util, glean_sr; print(glean_sr.__file__); "
             "print([m for m in ('infer', 'images', 'zoo', 'glean', 'demo', 'train') if importlib.util.find_spec(m)])")
    out = subprocess.run([sys.executable, "-S", "-c", probe], cwd=work, env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0].startswith(str(installed / "site")) and out[1] == "[]"
    api = ("import numpy as np, PIL.Image as I, glean_sr; m = glean_sr.load_model(); "
           "print(glean_sr.upscale(m, I.fromarray(np.zeros((8, 8, 3), np.uint8))).size)")
    assert subprocess.run([sys.executable, "-S", "-c", api], cwd=work, env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "(64, 64)"


def test_glean_demo_starts(installed):
    pytest.importorskip("gradio")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-S", str(installed / "site" / "bin" / "glean-demo"), "--port",
                               str(port)], cwd=installed, env=env_without_checkout(installed),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    assert r.status == 200 and b"GLEAN" in r.read()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    log = server.stdout.read() if server.poll() is not None else ""
                    pytest.fail(f"glean-demo did not start: {log}")
                time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_console_scripts_help_shows_the_command_as_typed(installed):
    """`glean-upscale --help` (and `glean-demo --help`) show examples with the installed command, not the clone's
    `python infer.py`."""
    env = env_without_checkout(installed)
    scripts = [("glean-upscale", "python infer.py")] + ([("glean-demo", "python demo.py")]
                                                      if importlib.util.find_spec("gradio") else [])
    for script, clone_form in scripts:
        p = subprocess.run([sys.executable, "-S", str(installed / "site" / "bin" / script), "--help"], cwd=installed,
                           env=env, capture_output=True, text=True)
        assert p.returncode == 0 and f"usage: {script}" in p.stdout, p.stderr
        assert f"    {script} " in p.stdout and clone_form not in p.stdout, p.stdout[:600]
