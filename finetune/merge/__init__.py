"""`finetune merge`: stream the base checkpoint tensor by tensor, fold each adapter's delta (weights.py), write sharded
safetensors (output.py) and measure the merge fidelity.

Imports: errors, progress, recipe, artifacts, model.
"""

from finetune import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "model": ["base_weight_files", "merge"],
    "fidelity": ["peak_rss_mib", "print_merge_report", "probe_batch"],
    "output": ["open_safetensors"],
})
