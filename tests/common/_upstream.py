"""Makes transformers' fetched common tests importable as the package ``transformers_tests``
(``test_transformers_common.py`` imports this first).

``fetch_transformers_tests.py`` (``make test`` runs it) puts the upstream files of the installed
transformers release under ``.cache/transformers-tests/<version>/``; without them the harness
is skipped, saying how to fetch them. The upstream modules import three siblings by relative
import that the source distribution does not ship (it holds only the top level of ``tests/``):

* ``.exporters.test_export.ExportTesterMixin``, the base class of ``ModelTesterMixin`` carrying
  the ``torch.export`` tests: an empty base here, so those tests are not run (none of them is
  among the tests below; odeify's own ``tests/test_compile.py`` covers torch.compile);
* ``.generation.test_utils.GenerationTesterMixin``: only named by
  ``test_generation_tester_mixin_inheritance`` (skipped in the harness, with its reason) and
  never inherited; odeify's generate paths are ``tests/test_generate.py``;
* ``.utils.test_configuration_utils.config_common_kwargs``: the common ``PreTrainedConfig``
  arguments ``ConfigTester.check_config_arguments_init`` sets to non-default values and reads
  back; odeify's own list is below (every key a real config argument, every value not its
  default), so that check still runs.
"""

from __future__ import annotations

import importlib.util
import sys
import types

from fetch_transformers_tests import STAMP, target

PACKAGE = "transformers_tests"


class ExportTesterMixin:
    """Stands in for ``tests/exporters/test_export.py``'s mixin (absent from the sdist)."""


class GenerationTesterMixin:
    """Stands in for ``tests/generation/test_utils.py``'s mixin (absent from the sdist)."""


# Non-default values of common PreTrainedConfig arguments (upstream's list is not in the sdist).
config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "tie_word_embeddings": False,
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
    "is_encoder_decoder": True,
    "is_decoder": True,
    "add_cross_attention": True,
}


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # a package: its children are the stand-ins below
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def mount() -> bool:
    """Register the fetched folder as ``transformers_tests`` (and the three stand-ins)."""
    folder = target()
    if not (folder / STAMP).exists():
        return False
    if PACKAGE in sys.modules:
        return True
    spec = importlib.util.spec_from_file_location(
        PACKAGE, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    package = importlib.util.module_from_spec(spec)  # no __init__.py runs: the folder has none
    sys.modules[PACKAGE] = package
    for sub, attrs in (
        ("exporters", {}),
        ("exporters.test_export", {"ExportTesterMixin": ExportTesterMixin}),
        ("generation", {}),
        ("generation.test_utils", {"GenerationTesterMixin": GenerationTesterMixin}),
        ("utils", {}),
        ("utils.test_configuration_utils", {"config_common_kwargs": config_common_kwargs}),
    ):
        _module(f"{PACKAGE}.{sub}", **attrs)
    return True


MOUNTED = mount()
SKIP_REASON = (
    f"transformers' common tests are not fetched ({target()} is missing): run "
    "`make transformers-tests` (or python tests/common/fetch_transformers_tests.py)"
)
