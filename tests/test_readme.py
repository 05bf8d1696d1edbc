"""The README's python snippets run as written (in order, sharing one namespace)."""

import pathlib
import re
import warnings

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_snippet_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ns = {}
        exec(compile(blocks[0], "README.md", "exec"), ns)  # noqa: S102
        assert ns["out"].output.shape == (1024, 256)
        assert ns["fused"].shape == (64, 32)
        for block in blocks[1:]:
            exec(compile(block, "README.md", "exec"), ns)  # noqa: S102
