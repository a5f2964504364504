"""The README and docs/ stay true to the code: every YAML block validates (as a config, a study spec, or a fragment
of a config), every `ript-ablate` command shown parses, every linked path exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from ript_ablate.cli import build_parser
from ript_ablate.config import SECTIONS, parse_yaml
from ript_ablate.plugins import checked_config_from_dict
from ript_ablate.study.spec import load_study

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SPEC_HOMES = [ROOT / "studies", ROOT / "examples" / "own_trainer", ROOT / "examples" / "pointmass", ROOT]


def blocks(page: Path, language: str) -> list[tuple[int, str]]:
    text = page.read_text()
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)]


def test_the_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
    assert (ROOT / "README.md").read_text().startswith("# ript-ablate\n\n```bash\nmake quickstart")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_linked_path_exists(page):
    for target in re.findall(r"\]\(([^)]+)\)", page.read_text()):
        if re.match(r"^(https?:|mailto:|#)", target):
            continue
        assert (page.parent / target.split("#")[0]).exists(), f"{page.name} links to {target}, which does not exist"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_shown_parses(page):
    parser = build_parser()
    for line_no, block in blocks(page, "bash"):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:1] == ["ript-ablate"]:
                    try:
                        parser.parse_args(words[1:])
                    except SystemExit:
                        pytest.fail(f"{page.name}, block at line {line_no}: `{part.strip()}` does not parse")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_yaml_block_validates(page, tmp_path):
    for line_no, block in blocks(page, "yaml"):
        data = parse_yaml(block, f"{page.name}:{line_no}")
        where = f"{page.name}, YAML block at line {line_no}"
        if isinstance(data, dict) and "config" in data:  # a study spec: its config as the shipped specs find it
            home = next((h for h in SPEC_HOMES if (h / data["config"]).is_file()), None)
            assert home is not None, f"{where}: its config {data['config']} is nowhere a spec lives"
            spec = {**data, "config": str((home / data["config"]).resolve()), "output_dir": str(tmp_path)}
            path = tmp_path / "spec.yaml"
            path.write_text(yaml.safe_dump(spec))
            load_study(path)
        else:  # a config, or a fragment of one: its sections must validate on top of the defaults
            assert isinstance(data, dict) and set(data) <= set(SECTIONS), f"{where}: neither a config nor a spec"
            checked_config_from_dict(data, where)


@pytest.mark.parametrize("page", [ROOT / "README.md", ROOT / "docs" / "families.md"], ids=lambda p: p.name)
def test_the_switch_by_family_table_is_the_codes(page):
    from ript_ablate.switch_table import markdown_table

    shown = re.search(r"<!-- switch-table -->\n(.*?)\n<!-- /switch-table -->", page.read_text(), flags=re.S)
    assert shown and shown.group(1).strip() == markdown_table(), f"{page.name}: regenerate the table from " \
        "ript_ablate.switch_table.markdown_table()"
