"""The docs point at things that exist: relative Markdown links, and repository paths named in
backticks (`monta/...`, `tools/...`, `examples/...`, ...)."""

import re

import pytest

from tests.conftest import REPO

DOCS = [REPO / "README.md", REPO / "docker" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
# a repository path in backticks, unless the text says it is another project's ("... in Megatron-LM")
_PATH = re.compile(r"`((?:monta|tools|examples|tests|bench|docker|docs)/[\w./-]+?)(?::\w+)?`"
                   r"(?! in Megatron-LM)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_paths_exist(doc):
    text = doc.read_text()
    missing = [link for link in _LINK.findall(text)
               if "://" not in link and not (doc.parent / link).exists()]
    missing += [path for path in _PATH.findall(text)
                if "*" not in path and not (REPO / path.rstrip("/")).exists()]
    assert not missing, missing
