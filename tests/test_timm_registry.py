"""The timm registry sweep: ``linear`` on the smallest architecture of every model class of every timm module.

For each timm module, every model class it registers is built at its smallest architecture (parameters
counted on the ``meta`` device), randomly initialised, wrapped with ``linear`` and run forward and backward at
its default input size; where the logits come from the pre-logit features alone, the cached path
(``forward_prefix`` then ``forward_from_block``) must give them too, and ``unload`` must give back the
backbone's own state. A class is left out only when it is
named below with its reason. This takes minutes, so it runs only when asked for: ``pytest -m registry``
(CI does, on the newest timm and on the floor pyproject allows). The README's registry table is checked against ``promptvit backbones --all``
here as well, and its family table against ``promptvit backbones --markdown``.
"""

from __future__ import annotations

import gc
import re
from pathlib import Path

import pytest
import timm
import torch

import promptvit
from promptvit.backbones import BackboneError, create_backbone
from promptvit.family_support import (
    family_support,
    markdown_table,
    registry_markdown,
    registry_support,
    timm_model_classes,
)

pytestmark = pytest.mark.registry

#: classes timm registers without a classifier (a headless encoder; the same module's classifier class
#: carries the head): there is nothing for ``linear`` to tune, and wrapping says so
NO_CLASSIFIER = {
    "DeepseekVitEncoder": "a headless encoder (DeepseekVitClassifier has the head)",
    "Gemma4VitEncoder": "a headless encoder (Gemma4VitClassifier has the head)",
    "MobileNetV5Encoder": "a headless encoder (MobileNetV5 has the head)",
    "Qwen3VitEncoder": "a headless encoder (Qwen3VitClassifier has the head)",
}
#: classes whose reset_classifier fails inside timm, with the release: wrapping with a new head is refused in one
#: line, and linear runs on the model's own head
RESET_FAILS_IN_TIMM = {"PyramidVisionTransformerV2": "1.0.9"}  # reads self.embed_dim, which it never sets
#: classes whose smallest architecture does not fit the CI machine (2 cores, 24 GiB) in reasonable time
TOO_LARGE: dict[str, str] = {}

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("module", sorted(timm.list_modules()))
def test_linear_runs_on_the_smallest_architecture_of_every_class(module: str) -> None:
    classes = timm_model_classes(module)
    if not classes:
        pytest.skip(f"timm.models.{module} registers no architecture")
    for timm_class in classes:
        if timm_class.name in TOO_LARGE:
            continue
        if timm_class.name in NO_CLASSIFIER:  # refused before anything runs: the meta build is enough
            with torch.device("meta"):
                headless = timm.create_model(timm_class.smallest)
            with pytest.raises(BackboneError, match="has no get_classifier"):
                promptvit.wrap(headless, "linear", num_classes=3)
            continue
        base = create_backbone(timm_class.smallest)
        state = {k: v.clone() for k, v in base.state_dict().items()}
        num_classes = 3
        if RESET_FAILS_IN_TIMM.get(timm_class.name) == timm.__version__:
            with pytest.raises(BackboneError, match=r"reset_classifier\(3\) fails in timm"):
                promptvit.wrap(base, "linear", num_classes=3)
            assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())
            num_classes = None
        model = promptvit.wrap(base, "linear", num_classes=num_classes).train()
        x = torch.randn(2, 3, *model.geometry.img_size, generator=torch.Generator().manual_seed(0))
        logits = model(x)
        assert logits.shape == (2, model.num_classes), timm_class.smallest
        logits.square().sum().backward()
        tuned = dict(model.tuned_named_parameters())
        assert tuned and all(p.grad is not None and torch.isfinite(p.grad).all() for p in tuned.values())
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        cut = model.cache_cut()
        if cut:  # the cache stores the pre-logit features and only the head runs on them
            model.eval()
            with torch.no_grad():
                torch.testing.assert_close(
                    model.forward_from_block(model.forward_prefix(x, cut), cut), model(x), rtol=1e-4, atol=1e-5
                )
        unloaded = model.unload()  # the pre-wrap backbone again, head and all (reset_classifier replaced it)
        after = unloaded.state_dict()
        assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
        del base, model, logits, unloaded, state, after
        gc.collect()


def test_linear_runs_on_95_percent_of_the_model_classes() -> None:
    """The classes left out are named above; every other class runs in the test above."""
    names = {c.name for c in timm_model_classes()}
    left_out = (set(NO_CLASSIFIER) | set(TOO_LARGE)) & names
    print(f"linear runs on {len(names) - len(left_out)} of {len(names)} timm model classes (timm {timm.__version__})")
    assert (len(names) - len(left_out)) / len(names) >= 0.95


def test_the_readme_registry_table_is_promptvit_backbones_all() -> None:
    text = README.read_text()
    version = re.search(r"`promptvit backbones --all --markdown` with timm (\S+)", text)
    assert version, "the README's registry table must say which timm generated it"
    if version.group(1) != timm.__version__:
        pytest.skip(f"the README's table was generated with timm {version.group(1)}, this is {timm.__version__}")
    table = registry_markdown(registry_support())
    assert table in text, "regenerate the README's registry table with `promptvit backbones --all --markdown`"


def test_the_readme_family_table_is_promptvit_backbones() -> None:
    """Every method on every family's tiny builds (a minute or two): the README's family table is its output."""
    version = re.search(r"`promptvit backbones --all --markdown` with timm (\S+)", README.read_text())
    if version and version.group(1) != timm.__version__:
        pytest.skip(f"the README's tables were generated with timm {version.group(1)}, this is {timm.__version__}")
    assert markdown_table(family_support()) in README.read_text(), (
        "regenerate the README's family table with `promptvit backbones --markdown`"
    )
