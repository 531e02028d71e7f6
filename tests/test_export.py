"""export.py: ONNX files with a dynamic batch, checked against PyTorch; infer.py -m FILE.onnx through onnxruntime."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_cfg

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import export  # noqa: E402
import glean_fast  # noqa: E402
import infer  # noqa: E402
import zoo  # noqa: E402
from glean_io import CheckpointError, sha256_of  # noqa: E402


@pytest.fixture(scope="module")
def shipped_onnx(tmp_path_factory):
    """The shipped model exported by the command line, and what it printed."""
    out = tmp_path_factory.mktemp("onnx") / "small.onnx"
    assert export.main(["-o", str(out)]) == 0
    return out


def test_shipped_model_exports_with_metadata_and_a_dynamic_batch(shipped_onnx, capsys):
    proto = onnx.load(str(shipped_onnx))
    meta = {p.key: p.value for p in proto.metadata_props}
    model = zoo.load_pretrained(zoo.DEFAULT_MODEL)
    assert meta["format"] == export.FORMAT and meta["model"] == zoo.DEFAULT_MODEL
    assert meta["weights_sha256"] == sha256_of(zoo.weights_file(zoo.DEFAULT_MODEL))
    assert meta["opset"] == str(export.OPSET) and "dynamo=True" in meta["exporter"]
    assert json.loads(meta["config"])["in_size"] == model.cfg.in_size == 8
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["B", 3, 8, 8]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["B", 3, 64, 64]
    # a batch size the self-check did not try, and the same images one by one: the batch axis is really dynamic
    runner = export.OnnxGLEAN(shipped_onnx, "cpu")
    assert runner.face_template == zoo.WEIGHTS[zoo.DEFAULT_MODEL].template
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = model(x)
    y = runner(x)
    assert y.shape == (5, 3, 64, 64)
    assert (y - expected).abs().max() <= export.TOLERANCE * expected.std()
    assert torch.allclose(torch.cat([runner(x[i:i + 1]) for i in range(5)]), y, atol=1e-5)


@pytest.mark.parametrize("name", [n for n, w in zoo.WEIGHTS.items() if w.kind == "glean-official"])
def test_official_configurations_at_reduced_width(name, tmp_path):
    """Every official configuration (its sizes and depth of the bank), random weights, few channels."""
    torch.manual_seed(0)
    cfg = tiny_cfg(**{k: zoo.WEIGHTS[name].config[k] for k in ("in_size", "out_size")})
    glean_fast.GLEANFast(cfg).save(tmp_path / "m.safetensors")
    result = export.export(str(tmp_path / "m.safetensors"), tmp_path / "m.onnx")
    assert sorted(result) == list(export.CHECK_BATCHES)
    assert all(err <= export.TOLERANCE * std for err, std in result.values())
    runner = export.OnnxGLEAN(tmp_path / "m.onnx", "cpu")
    assert runner.cfg == cfg and runner.name == "m.safetensors"
    assert runner(torch.zeros(2, 3, cfg.in_size, cfg.in_size)).shape == (2, 3, cfg.out_size, cfg.out_size)


def test_a_file_that_fails_its_check_is_not_written(model_file, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "TOLERANCE", 0.0)     # no float32 export matches PyTorch to the last bit
    out = tmp_path / "m.onnx"
    with pytest.raises(CheckpointError, match="self-check failed.*no file written"):
        export.export(str(model_file), out)
    assert list(tmp_path.iterdir()) == []


def test_command_line_refuses_bad_arguments(tmp_path, capsys):
    assert export.main(["-o", str(tmp_path / "m.pt")]) == 2
    assert ".onnx" in capsys.readouterr().err
    assert export.main(["-o", str(tmp_path / "no" / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert export.main(["-m", "stylegan2_celeba_64", "-o", str(tmp_path / "m.onnx")]) == 1
    assert "latent bank, not a GLEAN model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_infer_runs_an_onnx_file_like_the_model(shipped_onnx, tmp_path):
    """infer.py -m FILE.onnx: the same input handling (grey, alpha, odd sizes, folders) and output names as the
    PyTorch model, and the same pixels up to float32 rounding."""
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(src / "a.png")
    Image.fromarray(rng.integers(0, 255, (10, 14), dtype=np.uint8)).save(src / "sub" / "grey.png")
    Image.fromarray(rng.integers(0, 255, (8, 8, 4), dtype=np.uint8)).save(src / "sub" / "alpha.png")
    for model, out, flags in ((str(shipped_onnx), "onnx", []), (zoo.DEFAULT_MODEL, "torch", ["--precision", "fp32"])):
        assert infer.main(["-i", str(src), "-o", str(tmp_path / out), "-m", model, "--batch", "2",
                           "--device", "cpu", *flags]) == 0                # the ONNX file: auto is its fp32
    names = sorted(p.relative_to(tmp_path / "torch") for p in (tmp_path / "torch").rglob("*.png"))
    assert names == sorted(p.relative_to(tmp_path / "onnx") for p in (tmp_path / "onnx").rglob("*.png"))
    assert len(names) == 3
    for name in names:
        a, b = (np.asarray(Image.open(tmp_path / d / name), dtype=np.int16) for d in ("torch", "onnx"))
        assert a.shape == b.shape and np.abs(a - b).max() <= 1


def test_faces_and_simulate_run_an_onnx_file_like_the_model(shipped_onnx, tmp_path):
    """--simulate and --faces with -m FILE.onnx: the same files as with the PyTorch model in fp32, the same pixels up
    to float32 rounding (the face forced into the 8x8 model with a large --max-shrink, so that it is restored)."""
    from skimage import data
    src = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()[:300, 100:400]).save(src)
    for mode in (["--simulate"], ["--faces", "--max-shrink", "100"]):
        outs = {}
        for model, flags in ((str(shipped_onnx), []), (zoo.DEFAULT_MODEL, ["--precision", "fp32"])):
            out = tmp_path / f"{mode[0][2:]}_{Path(model).suffix or 'torch'}"
            assert infer.main(["-i", str(src), "-o", str(out), "-m", model, *mode, *flags]) == 0
            outs[model] = {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in sorted(out.glob("*.png"))}
        a, b = outs.values()
        assert sorted(a) == sorted(b) and len(a) == (5 if mode[0] == "--simulate" else 1)
        for name in a:
            assert a[name].shape == b[name].shape and np.abs(a[name] - b[name]).max() <= 1, name
        if mode[0] == "--faces":
            import photos
            photo = np.asarray(Image.open(src), np.float32) / 255
            bicubic = np.round(photos.restore_photo(photo, outscale=8, found=[]).image * 255)    # no face restored
            assert a["astronaut_faces.png"].shape == bicubic.shape
            assert np.abs(a["astronaut_faces.png"] - bicubic).max() > 20                      # a face was restored


def test_infer_names_a_bad_onnx_file_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    assert infer.main(["-i", str(img), "-o", str(tmp_path / "out"), "-m", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}: not a usable ONNX file") and "\n" not in err
    # a valid ONNX file that export.py did not write: a model's metadata is missing
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(bad))
    assert infer.main(["-i", str(img), "-o", str(tmp_path / "out"), "-m", str(bad)]) == 2
    assert "not one export.py wrote" in capsys.readouterr().err
    assert infer.main(["-i", str(img), "-o", str(tmp_path / "out"), "-m", str(bad), "--precision", "bf16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--precision bf16: an .onnx file runs in the precision it was exported in" in err and "\n" not in err
    assert not list((tmp_path / "out").glob("*.png"))


def test_without_onnxruntime_the_message_says_what_to_install(shipped_onnx, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)     # import onnxruntime fails
    with pytest.raises(CheckpointError, match=r"pip install 'glean-sr\[onnx\]'"):
        export.OnnxGLEAN(shipped_onnx, "cpu")
