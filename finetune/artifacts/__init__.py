"""What finetune writes and reads back whole: directories published atomically (written, fsynced, renamed), sha256
manifests and their verification (`finetune verify`), and the lock that gives an output one writer.

Imports: errors only.
"""

from finetune import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "atomic": ["atomic_dir", "atomic_file", "publish_file", "write_text_atomic"],
    "manifest": ["check_report", "print_verdicts", "verify", "verify_adapter", "verify_checkpoint", "write_manifest"],
    "lock": ["held_by", "hold", "hold_all", "holder", "is_main_process", "lock_path"],
})
