"""Every Python snippet in README.md and docs/*.md runs, as written.

The convention (also in docs/adapters.md, "Contributor notes"):

* A block fenced as ```python is runnable. All runnable blocks of one page run in
  document order as one session (one shared namespace, like a notebook), in a fresh
  temporary working directory, on one torch thread, with the adapter registry restored
  afterwards. A failure names the page and the line of the block.
* Fixtures a reader does not need to see go in a hidden setup block, an HTML comment
  that starts with ``<!-- snippet-setup`` and ends with ``-->``; its body is Python and
  runs at its place in the session. It may import helpers from tests/conftest.py
  (``tiny_bert``, ``bert_batch``, ``ChainModel``): keep models tiny so that all pages
  together run in seconds.
* A block that cannot run offline in seconds (a hub model, real data, several processes,
  a GPU, a fragment of a larger loop) is fenced as ```python no-run. Those are counted
  per page in NO_RUN below, so adding one is a deliberate edit of this file.
* Any other Python-looking fence (```py, ```python3, ```pycon, a typo such as
  ```python norun) fails the test, so that no block is skipped by accident.
* ``<!-- snippet: NAME -->`` on the line before a fence names the block, for a test that
  runs it on several inputs (the cross-domain block below).

Pages are README.md and docs/*.md; docs/drafts/ is not scanned.
"""

from __future__ import annotations

import re
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import List

import pytest
import timm
import torch
import torchvision

from conftest import tiny_bert

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

RUNNABLE, NO_RUN = "python", "python no-run"
# no-run blocks per page (relative path -> count); change it when you add or remove one.
NO_RUN_COUNTS = {
    "docs/api.md": 1,
    "docs/budget.md": 1,
    "docs/cli.md": 1,
    "docs/deploy.md": 1,
    "docs/training.md": 3,  # DeepSpeed's Trainer run needs a process group
}

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)(?P<info>[^\n`]*)$")  # list items indent fences
_PYTHONISH = re.compile(r"^(python|py|pycon|python3|ipython)\b", re.IGNORECASE)


@dataclass
class Snippet:
    page: str
    line: int  # 1-based line of the opening fence (or of the setup comment)
    info: str  # "python", "python no-run", "setup", or another fence info string
    code: str
    name: str = ""


def parse(text: str, page: str) -> List[Snippet]:
    """Fenced blocks and hidden setup comments of a Markdown text, in document order."""
    lines = text.split("\n")
    found: List[Snippet] = []
    i, name = 0, ""
    while i < len(lines):
        line = lines[i]
        named = re.fullmatch(r"\s*<!--\s*snippet:\s*(\S+)\s*-->\s*", line)
        if named:
            name = named.group(1)
            i += 1
            continue
        if line.strip().startswith("<!-- snippet-setup"):
            start, body = i, []
            i += 1
            while i < len(lines) and lines[i].strip() != "-->":
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise AssertionError(f"{page}:{start + 1}: snippet-setup comment is never closed with a '-->' line")
            found.append(Snippet(page, start + 1, "setup", "\n".join(body)))
            i += 1
            continue
        fence = _FENCE.match(line)
        if fence:
            start, marker, body = i, fence.group("fence"), []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(marker):
                body.append(lines[i])
                i += 1
            found.append(Snippet(page, start + 1, fence.group("info").strip(), textwrap.dedent("\n".join(body)), name))
            name = ""
        i += 1
    return found


def run_session(snippets: List[Snippet], namespace: dict | None = None) -> dict:
    """Run setup and runnable blocks in order in one namespace; a failure names page:line."""
    namespace = {"__name__": "__docs__"} if namespace is None else namespace
    for snippet in snippets:
        if snippet.info not in ("setup", RUNNABLE):
            continue
        try:
            exec(compile(snippet.code, f"{snippet.page}:{snippet.line}", "exec"), namespace)
        except Exception as exc:  # re-raised with the block's place and its traceback
            raise AssertionError(
                f"The {'setup' if snippet.info == 'setup' else 'snippet'} at {snippet.page} line {snippet.line} "
                f"failed:\n{''.join(traceback.format_exception(exc))}"
            ) from exc
    return namespace


def page_snippets(path: Path) -> List[Snippet]:
    return parse(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))


def _runnable_pages():
    return [p for p in PAGES if any(s.info == RUNNABLE for s in page_snippets(p))]


@pytest.fixture
def session_sandbox(tmp_path, monkeypatch):
    """A fresh working directory, and the adapter registry as it was (snippets register adapters)."""
    from theseus_general import registry

    monkeypatch.chdir(tmp_path)
    saved = dict(registry._REGISTRY)
    yield tmp_path
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


@pytest.mark.parametrize("path", _runnable_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_page_snippets_run(path, session_sandbox):
    snippets = page_snippets(path)
    run_session(snippets)


def test_every_python_fence_is_deliberate():
    no_run = {}
    for path in PAGES:
        for s in page_snippets(path):
            if s.info in (RUNNABLE, NO_RUN) or s.info == "setup":
                no_run[s.page] = no_run.get(s.page, 0) + (s.info == NO_RUN)
                continue
            assert not _PYTHONISH.match(s.info), (
                f"{s.page} line {s.line}: fence info {s.info!r}; use ```python (runs in this test) "
                "or ```python no-run (shown only, counted in NO_RUN_COUNTS)"
            )
    counted = {page: n for page, n in no_run.items() if n}
    assert counted == NO_RUN_COUNTS, "no-run blocks per page changed; update NO_RUN_COUNTS if that was deliberate"
    assert len(_runnable_pages()) >= 2 and ROOT / "README.md" in _runnable_pages()


def _anchors(path: Path) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_relative_links_point_at_files_and_anchors():
    """Links and images such as (docs/images/x.png) or (api.md#export) resolve from their page."""
    broken = []
    for path in PAGES:
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            resolved = path.parent / file if file else path
            if not resolved.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, f"broken links: {broken}"


def test_a_broken_snippet_fails_with_its_place():
    page = "intro\n<!-- snippet-setup\nx = 1\n-->\n- a list item:\n\n    ```python\n    y = x + 1\n    ```\n" \
           "```python no-run\nnot run\n```\n```python\nassert y == 2\nraise RuntimeError('boom')\n```\n"
    snippets = parse(page, "fake.md")
    assert [s.info for s in snippets] == ["setup", RUNNABLE, NO_RUN, RUNNABLE]
    with pytest.raises(AssertionError, match=r"fake\.md line 13 failed:(.|\n)*boom"):
        run_session(snippets)


# ------------------------------------------------------------- the cross-domain block on three families
def _cross_domain_block() -> Snippet:
    (block,) = [s for s in page_snippets(ROOT / "docs" / "api.md") if s.name == "cross-domain"]
    assert block.info == RUNNABLE
    return block


def _bert():
    return tiny_bert(num_layers=4), lambda g: torch.randint(1, 100, (4, 8), generator=g)


def _vit():
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, in_chans=1, num_classes=2, embed_dim=16, depth=4, num_heads=2)
    return model, lambda g: torch.randn(4, 1, 16, 16, generator=g)


def _resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], num_classes=2)
    return model, lambda g: torch.randn(4, 3, 32, 32, generator=g)


@pytest.mark.parametrize("make, adapter, depth", [(_bert, "bert", 2), (_vit, "vit", 2), (_resnet, "resnet", 4)])
def test_cross_domain_block_compresses_every_family(make, adapter, depth, session_sandbox):
    """The docs' five lines, as written, on a BERT, a timm ViT and a torchvision ResNet."""
    import torch.nn.functional as F

    model, inputs = make()
    g = torch.Generator().manual_seed(0)
    batches = [(inputs(g), torch.randint(0, 2, (4,), generator=g)) for _ in range(5)]
    namespace = {"torch": torch, "model": model, "batches": batches,
                 "loss_fn": lambda out, y: F.cross_entropy(getattr(out, "logits", out), y)}
    run_session([_cross_domain_block()], namespace)
    th, successor = namespace["th"], namespace["successor"]
    assert th.adapter.name == adapter
    assert sum(th.plan.successor_depth.values()) == depth
    assert th.step_count == len(batches)
    assert type(successor) is type(model)
    assert sum(p.numel() for p in successor.parameters()) < sum(p.numel() for p in model.parameters())
