"""Issue 19 item 3: each README workflow's install line names an extra that installs what
the workflow imports (the Trainer example failed after `pip install ".[hf]"`: no
accelerate)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; the check is the same anywhere

ROOT = Path(__file__).resolve().parent.parent


def _extras():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {name: {re.split(r"[<>=!~\[ ;]", req, 1)[0].lower() for req in reqs}
            for name, reqs in cfg["project"]["optional-dependencies"].items()}


def test_hf_extra_covers_the_trainer_and_checkpoint_workflows():
    # Trainer(...) raises ImportError without accelerate; save/load import safetensors
    assert {"transformers", "safetensors", "accelerate"} <= _extras()["hf"]


def test_every_readme_install_names_an_existing_extra():
    extras = _extras()
    readme = (ROOT / "README.md").read_text()
    named = re.findall(r'pip install [^\n]*?"\.\[(\w+)\]"', readme)
    named += re.findall(r'or "\.\[(\w+)\]"', readme)
    assert named
    for name in named:
        assert name in extras, name
    # the sections that use transformers / accelerate say which extra they need
    for title in ("## Training with `reft_ext.patch`", "## Checkpoints and multi-process",
                  "#### With accelerate"):
        section = readme.split(title, 1)[1][:600]
        assert re.search(r'Needs: `pip install "\.\[hf\]"`', section), title
