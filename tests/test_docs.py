"""The docs stay true: the generated config reference is current, README is short, links resolve,
and the Python imports the docs show still work."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from src.model.gpt import GPTConfig
from src.tools.configdoc import COMMAND, PAGE, config_reference
from src.training.config import Config, DataConfig, ModalConfig, TrainingConfig, WandbConfig

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_IMPORT = re.compile(r"^\s*from (src(?:\.\w+)*) import ([\w, ]+)$", re.M)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _relative_links(md: str) -> list[str]:
    """Targets of the Markdown links in md that point into the repository (code ignored)."""
    prose = _CODE.sub("", _FENCE.sub("", md))
    targets = [m.group(1) for m in _LINK.finditer(prose)]
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_configuration_reference_is_current():
    committed = PAGE.read_text(encoding="utf-8") if PAGE.is_file() else ""
    assert committed == config_reference(), (
        f"docs/configuration.md differs from the config models' descriptions; "
        f"regenerate it with: {COMMAND}"
    )


def test_every_config_key_is_described_in_the_reference():
    text = config_reference()
    sections = {
        "": Config,
        "model.": GPTConfig,
        "data.": DataConfig,
        "training.": TrainingConfig,
        "modal.": ModalConfig,
        "wandb.": WandbConfig,
    }
    for prefix, model in sections.items():
        for name, field in model.model_fields.items():
            if prefix == "" and name != "name":
                continue  # the sections themselves are headings
            assert field.description, f"{prefix}{name} has no description="
            assert f"| `{prefix}{name}` |" in text, f"{prefix}{name} missing from the reference"


def test_readme_is_the_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}); move detail to docs/"
    )
    assert (ROOT / "docs" / "architecture.md").is_file()


def test_relative_links_point_at_files_that_exist():
    broken = []
    for page in _pages():
        for target in _relative_links(page.read_text(encoding="utf-8")):
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to files that do not exist:\n  " + "\n  ".join(broken)


def test_link_finder_sees_links_and_skips_code_and_urls():
    md = (
        "See [data](docs/data.md#shards) and ![plot](img/a.png).\n"
        "Not `[x](nope.md)` nor [site](https://example.com) nor [top](#top).\n"
        "```\n[y](also-nope.md)\n```\n"
    )
    assert _relative_links(md) == ["docs/data.md#shards", "img/a.png"]
    shown = "```python\nfrom src.a.b import c, d\n```\nfrom src.not_code import x\n"
    assert _shown_imports(shown) == [("src.a.b", ["c", "d"])]


def _shown_imports(md: str) -> list[tuple[str, list[str]]]:
    """(module, names) of each `from src.x import a, b` line in md's code blocks."""
    blocks = "\n".join(m.group(0) for m in _FENCE.finditer(md))
    return [(mod, [n.strip() for n in names.split(",")]) for mod, names in _IMPORT.findall(blocks)]


def test_python_imports_shown_in_the_docs_work():
    broken = []
    for page in _pages():
        for module, names in _shown_imports(page.read_text(encoding="utf-8")):
            try:
                missing = [n for n in names if not hasattr(importlib.import_module(module), n)]
            except ImportError:
                missing = ["(no such module)"]
            if missing:
                broken.append(
                    f"{page.relative_to(ROOT)}: from {module} import {', '.join(missing)}"
                )
    assert not broken, "the docs import what does not exist:\n  " + "\n  ".join(broken)
