"""LoRA supervised fine-tuning on CPU (transformers + peft), checkpoints and export, as jobs.

The server side (this package's import) is plain Python: request validation
(``plan_finetune``, ``plan_export``), dataset checks and the checkpoint listing. torch,
transformers and peft are imported only in the job's child process (``train``, ``export``).
"""

from inferd.engines.finetune.checkpoints import Checkpoint, list_checkpoints
from inferd.engines.finetune.config import OPTIONS, plan_finetune
from inferd.engines.finetune.export import FORMATS, copy_adapter, plan_export
from inferd.engines.finetune.export import TASK as EXPORT_TASK

#: The child-process entry point of a fine-tuning job.
TASK = "inferd.engines.finetune.train:run"

__all__ = ["EXPORT_TASK", "FORMATS", "OPTIONS", "TASK", "Checkpoint", "copy_adapter", "list_checkpoints",
           "plan_export", "plan_finetune"]
