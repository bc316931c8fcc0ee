"""Feature labels: manual, offline (rules, no LLM) or by any OpenAI-compatible LLM; each scored.

    from saescope.label import set_label, label_offline, label_llm
    set_label("runs/demo", "resid_post/3", 17, "French capital city")
    label_offline("runs/demo")                     # every alive feature: a concept where there is one
    label_llm("runs/demo", base_url="http://localhost:8000/v1", model="qwen3-8b")

evidence.py splits each feature's examples into labelling and held-out halves;
rules.py finds the token rule that explains where a feature fires;
concepts.py names what a feature means from its contexts and promoted tokens;
scoring.py judges a label on the held-out half ("detection-offline") and on the
promoted tokens ("output-offline"), both in [0, 1] with 0.5 = chance.
"""

from .evidence import Context, Evidence, LabelReport, gather
from .llm import LLMClient, clean_label, label_llm
from .manual import set_label
from .offline import label_offline
from .rules import Rule, explain
from .scoring import METHOD_OFFLINE, METHOD_OUTPUT, DetectionScore, score_llm, score_offline

__all__ = ["METHOD_OFFLINE", "METHOD_OUTPUT", "Context", "DetectionScore", "Evidence", "LLMClient", "LabelReport", "Rule", "clean_label", "explain",
           "gather", "label_llm", "label_offline", "score_llm", "score_offline", "set_label"]
