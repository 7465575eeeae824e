"""The offline knowledge testbed: a GPT-2 trained from scratch on real CounterFact/ZsRE facts, WikiText-2 and
SST-2, so that editing methods have real knowledge to edit where no model hub is reachable (issue 3).

``ensure_testbed("small")`` returns the folder of a built testbed (building it into the cache on first use); the
folder loads with ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``. See docs/testbed.md.
"""

from eac_lightning.testbed.build import (
    PRESETS,
    TestbedPreset,
    build_testbed,
    ensure_testbed,
    get_preset,
    subject_bottleneck_mask,
    testbed_command,
    testbed_dir,
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
    "subject_bottleneck_mask",
    "testbed_command",
    "testbed_dir",
    "trace_command",
    "trace_fact",
]
