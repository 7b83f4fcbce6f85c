"""README.md's Python snippets run as printed."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_python_snippets_run(capsys):
    blocks = python_blocks()
    assert blocks, "README.md has no python snippet"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    printed = capsys.readouterr().out
    assert "torch.Size([32, 2, 128])" in printed and "(32, 2, 128)" in printed
