"""patchattn: training-free sparse attention for Hugging Face transformers.

    plan = Plan.load("plan.json")
    patch_model(model, plan)      # attention follows the plan
    stats(model)                  # what ran: realized density per layer/head, fallbacks
    unpatch_model(model)          # exactly the original model again
"""

from .methods import METHODS, get_method, register_method
from .patching import UnsupportedModelError, is_patched, patch_model, patched, unpatch_model
from .plan import Plan, PlanError, model_info
from .telemetry import Stats, reset_stats, stats
from .calibration import calibrate  # noqa: E402  (needs the modules above)

__version__ = "0.1.0"

__all__ = [
    "METHODS", "Plan", "PlanError", "Stats", "UnsupportedModelError", "get_method", "is_patched",
    "model_info", "patch_model", "patched", "register_method", "reset_stats", "stats", "unpatch_model",
]
