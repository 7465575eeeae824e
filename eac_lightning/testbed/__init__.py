"""The offline knowledge testbed: a GPT-2 trained from scratch on real CounterFact/ZsRE facts, WikiText-2 and
SST-2, so that editing methods have real knowledge to edit where no model hub is reachable.

``testbed:tiny`` and ``testbed:small`` ship inside the package (:func:`testbed_path`); other presets are built
into the cache on first use (:func:`ensure_testbed`). A folder loads with ``AutoModelForCausalLM`` /
``AutoTokenizer.from_pretrained``. Importing this package registers the ``testbed:`` model source. See
docs/testbed.md.
"""

from eac_lightning.models.loading import register_model_source
from eac_lightning.testbed.build import (
    build_testbed,
    ensure_testbed,
    ship_testbed,
    shipped_testbed,
    testbed_command,
    testbed_dir,
    testbed_path,
    verify_shipped,
)
from eac_lightning.testbed.causal_trace import (
    TraceFact,
    TraceResult,
    average_trace,
    choose_layers,
    plot_trace,
    run_trace,
    trace_command,
    trace_fact,
)
from eac_lightning.testbed.corpus import Corpus, FactItem, build_corpus
from eac_lightning.testbed.packing import SequencePacker
from eac_lightning.testbed.presets import PRESETS, TestbedPreset, get_preset
from eac_lightning.testbed.training import subject_bottleneck_mask

register_model_source("testbed", testbed_path)

__all__ = [
    "PRESETS",
    "Corpus",
    "FactItem",
    "SequencePacker",
    "TestbedPreset",
    "TraceFact",
    "TraceResult",
    "average_trace",
    "build_corpus",
    "build_testbed",
    "choose_layers",
    "ensure_testbed",
    "get_preset",
    "plot_trace",
    "run_trace",
    "ship_testbed",
    "shipped_testbed",
    "subject_bottleneck_mask",
    "testbed_command",
    "testbed_dir",
    "testbed_path",
    "trace_command",
    "trace_fact",
    "verify_shipped",
]
