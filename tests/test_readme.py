import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README shows a Python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert namespace["images"].shape == (1, 3, 64, 64)
    assert (tmp_path / "dalle.safetensors").is_file()


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def test_installed_packages_import_from_anywhere(tmp_path):
    """`pip install -e .` puts engine and kernels on the path, whatever the working directory."""
    import subprocess
    import sys

    code = "import engine, kernels; print(engine.DALLE.__name__, kernels.sparse_attention.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["DALLE", "sparse_attention"]
