"""transformers.Trainer support: a callback that writes the LoLDU adapter into every checkpoint folder.

    trainer = Trainer(model, args, train_dataset=..., callbacks=[LoLDUCheckpointCallback()])

Trainer itself still writes its usual checkpoint (the whole model, optimizer and RNG states, which
``resume_from_checkpoint`` needs); the callback adds ``loldu_adapter.safetensors`` next to it, a few KB that
``load_loldu(base_model, checkpoint_folder)`` loads onto a fresh base. Needs transformers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..core.settings import check_adapter_name, warn_caller
from ..files.adapters import save_loldu


class LoLDUCheckpointCallback(TrainerCallback):
    """Saves the model's LoLDU adapter (``adapter_name``: None for the trainable one) into each checkpoint
    folder Trainer writes, ``<output_dir>/checkpoint-<step>/``, on the main process only. A save that fails
    with an OSError (a full disk) warns and is listed in ``failed_steps``; training goes on."""

    def __init__(self, adapter_name: Optional[str] = None):
        self.adapter_name = check_adapter_name(adapter_name, "LoLDUCheckpointCallback", allow_none=True)
        self.failed_steps = []  # steps whose adapter could not be written

    def on_save(self, args, state, control, model=None, **kwargs):
        """Trainer calls this right after it wrote a checkpoint."""
        if model is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():  # (a hyperparameter search writes into run-* subfolders)
            warn_caller(f"LoLDUCheckpointCallback: no checkpoint folder {folder}; the LoLDU adapter of step "
                        f"{state.global_step} was not saved")
            return
        try:
            save_loldu(model, folder, adapter_name=self.adapter_name)
        except OSError as err:  # a full disk, say: training goes on, the next checkpoint tries again
            self.failed_steps.append(state.global_step)
            warn_caller(f"LoLDUCheckpointCallback: the LoLDU adapter of step {state.global_step} was not saved "
                        f"into {folder} ({err.strerror or err}); training goes on and the next checkpoint tries "
                        f"again. Earlier adapters are untouched (saves replace files atomically)")
