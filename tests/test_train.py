import subprocess
import sys
from pathlib import Path

from PIL import Image

from engine.demo.shapes import COLOURS, ShapesDataset
from engine.io.checkpoint import load_dalle

ROOT = Path(__file__).resolve().parents[1]


def test_train_on_builtin_data_then_generate(tmp_path):
    train = [sys.executable, str(ROOT / "train.py"), "--dalle_output_file_name", "run/dalle", "--num_samples", "64",
             "--batch_size", "16", "--vae_steps", "3", "--dim", "32", "--depth", "2", "--heads", "2",
             "--dim_head", "16", "--text_seq_len", "16", "--attn_types", "axial_row,conv_like",
             "--bpe_vocab_size", "300", "--truncate_captions", "--epochs", "1"]
    subprocess.run(train, check=True, cwd=tmp_path, capture_output=True)
    ckpt = load_dalle(tmp_path / "run" / "dalle.safetensors")
    assert ckpt.model.config.attn_types == ("axial_row", "conv_like") and ckpt.extra["progress"]["step"] == 4
    assert ckpt.tokenizer.vocab_size == ckpt.model.config.num_text_tokens
    generate = [sys.executable, str(ROOT / "generate.py"), "--dalle_path", "run/dalle.safetensors",
                "--text", "a large red circle on the middle left", "--num_images", "2", "--outputs_dir", "out",
                "--truncate_captions"]
    subprocess.run(generate, check=True, cwd=tmp_path, capture_output=True)
    assert Image.open(tmp_path / "out" / "a_large_red_circle_on_the_middle_left" / "1.jpg").size == (32, 32)


def test_shapes_dataset_is_deterministic_and_matches_captions():
    a, b = ShapesDataset(50, 32, seed=1), ShapesDataset(50, 32, seed=1)
    for i in range(50):
        caption, image = a[i]
        assert caption == b[i][0] and a.caption(i) == caption
        spec = a.sample(i)[0]
        colour = image.new_tensor(COLOURS[spec.colour]) / 255
        shape_pixels = (image - colour[:, None, None]).abs().amax(0) < 0.02
        assert shape_pixels.sum() > 10, caption  # the named colour is drawn
        ys, xs = shape_pixels.nonzero().float().mean(0) / 31
        if spec.position.endswith("left"):
            assert xs < 0.45
        if spec.position.startswith("bottom"):
            assert ys > 0.55
    held_out = ShapesDataset(200, 32, exclude=frozenset({("red", "middle left")}))
    assert all((s.colour, s.position) != ("red", "middle left") for s in (held_out.sample(i)[0] for i in range(200)))
