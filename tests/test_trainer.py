"""transformers.Trainer: LoLDU fine-tuning of a tiny Llama (random weights, built from a config) on CPU, with
the library's callback saving the adapter at each checkpoint, a resume, and the final adapter on a fresh base."""
import copy

import pytest
import torch

tf = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it

from loldu_triton import LoLDUConfig, get_loldu_model, load_loldu, loldu_layers  # noqa: E402
from loldu_triton.core.fileformat import ADAPTER_NAME  # noqa: E402
from loldu_triton.integrations.trainer import LoLDUCheckpointCallback  # noqa: E402
from conftest import tiny_llama

CONFIG = LoLDUConfig(rank=4, target_modules=["q_proj", "v_proj"])


def base_llama():
    return tiny_llama()


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, length=12):
        self.ids = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_for(model, out):
    args = tf.TrainingArguments(output_dir=str(out), max_steps=6, save_steps=3, per_device_train_batch_size=4,
                                learning_rate=3e-2, lr_scheduler_type="constant", use_cpu=True, report_to="none",
                                logging_steps=1, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    return tf.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[LoLDUCheckpointCallback()])


def test_trainer_saves_the_adapter_at_each_checkpoint_resumes_and_the_final_adapter_reloads(tmp_path):
    base = base_llama()
    base_state = copy.deepcopy(base.state_dict())
    model = get_loldu_model(base, CONFIG)
    trainer = trainer_for(model, tmp_path / "run")
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    for step in (3, 6):
        assert (tmp_path / "run" / f"checkpoint-{step}" / ADAPTER_NAME).is_file()
    final = {name: (layer.d.detach().clone(), layer.s.detach().clone()) for name, layer in loldu_layers(model)}

    # resume from step 3 with a fresh model: the same end point as the run that never stopped, bit for bit (the
    # same float32 ops on the same loaded state and batches)
    fresh = base_llama()
    fresh.load_state_dict(base_state)
    resumed = get_loldu_model(fresh, CONFIG)
    trainer_for(resumed, tmp_path / "run").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    for name, layer in loldu_layers(resumed):
        assert torch.equal(layer.d, final[name][0]), (layer.d - final[name][0]).abs().max()
        assert torch.equal(layer.s, final[name][1]), (layer.s - final[name][1]).abs().max()

    # the final checkpoint's adapter, on a fresh base, gives the trained model's outputs
    serving = base_llama()
    serving.load_state_dict(base_state)
    load_loldu(serving.eval(), tmp_path / "run" / "checkpoint-6")
    ids = Tokens().ids[:3]
    with torch.no_grad():
        assert torch.equal(serving(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_callback_checks_its_argument():
    with pytest.raises(ValueError, match="adapter_name must be None or a non-empty string"):
        LoLDUCheckpointCallback(adapter_name=3)


def test_a_failed_checkpoint_warns_training_goes_on_and_the_last_good_adapter_loads(tmp_path, monkeypatch):
    import errno

    import loldu_triton.files.adapters as adapters

    real, calls = adapters.atomic_write, []

    def full_once(path, data):  # the disk is full at the second checkpoint only, after a partial write
        calls.append(path)
        if len(calls) == 2:
            path.with_name(".partial.tmp").write_bytes(data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(adapters, "atomic_write", full_once)
    base = base_llama()
    base_state = copy.deepcopy(base.state_dict())
    model = get_loldu_model(base, CONFIG)
    trainer = trainer_for(model, tmp_path / "run")
    trainer.args.save_steps = 2
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, LoLDUCheckpointCallback))
    with pytest.warns(UserWarning, match=r"LoLDUCheckpointCallback: the LoLDU adapter of step 4 was not saved into "
                                         r".*checkpoint-4 \(No space left on device\); training goes on"):
        trainer.train()
    assert trainer.state.global_step == 6 and callback.failed_steps == [4] and len(calls) == 3
    run = tmp_path / "run"
    assert not (run / "checkpoint-4" / ADAPTER_NAME).exists()
    assert (run / "checkpoint-2" / ADAPTER_NAME).is_file() and (run / "checkpoint-6" / ADAPTER_NAME).is_file()
    ids = Tokens().ids[:3]
    for step in (2, 6):  # the good checkpoints load; the last one gives the trained model
        serving = base_llama()
        serving.load_state_dict(base_state)
        load_loldu(serving.eval(), run / f"checkpoint-{step}")
    with torch.no_grad():
        assert torch.equal(serving(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
