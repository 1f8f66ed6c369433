"""A PEFT user's whole workflow on LoLDUModel: a script written for PEFT with two lines changed (a tiny Llama and
a tiny BERT classifier with modules_to_save, both under transformers.Trainer), saving by every route a user
takes, loading on a fresh base, merging, named adapters with their heads, and the refusals."""
import copy
import json
import pickle

import pytest
import torch

tf = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it

from loldu_triton import (LoLDUConfig, LoLDUModel, disable_loldu, get_loldu_model, list_adapters,  # noqa: E402
                          load_loldu, loldu_layers, merge_loldu, remove_loldu, save_loldu, set_adapter)
from loldu_triton.core.fileformat import ADAPTER_NAME  # noqa: E402
from loldu_triton.layers.saved import SavedModule  # noqa: E402
from conftest import tiny_llama  # noqa: E402
from kernel_checks import assert_float64_close, float64_copy  # noqa: E402


def tiny_bert(seed=0):
    config = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(seed)
    return tf.BertForSequenceClassification(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, classify=False, n=16, length=12):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 64, (n, length), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g) if classify else self.ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def train(model, out, classify=False, steps=4, resume=None, **kwargs):
    args = tf.TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
                                learning_rate=5e-2, lr_scheduler_type="constant", use_cpu=True, report_to="none",
                                seed=0, disable_tqdm=True, dataloader_num_workers=0, logging_steps=1, **kwargs)
    trainer = tf.Trainer(model=model, args=args, train_dataset=Tokens(classify))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_a_peft_script_for_a_tiny_llama_runs_with_two_lines_changed(tmp_path, capsys):
    # (the PEFT script: LoraConfig -> LoLDUConfig with PEFT's field names, get_peft_model -> get_loldu_model)
    config = LoLDUConfig(r=4, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                         bias="none")
    model = get_loldu_model(tiny_llama(), config)
    model.print_trainable_parameters()
    assert "trainable params: 20 ||" in capsys.readouterr().out  # 4 layers x (4 + 1)
    assert model.get_nb_trainable_parameters()[0] == 20 and model.peft_config == {"default": config}
    assert [layer.dropout for _, layer in loldu_layers(model)] == [0.05] * 4  # lora_dropout reached the layers
    trainer = train(model, tmp_path / "run")
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0], losses
    model.save_pretrained(tmp_path / "adapter")
    ids = Tokens().ids[:3]
    trained = logits(model, ids)

    reloaded = LoLDUModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert not any(p.requires_grad for p in reloaded.parameters()) and not reloaded.training
    assert torch.equal(logits(reloaded, ids), trained)  # the same float32 ops on the same values
    assert reloaded.peft_config["default"].rank == 4 and reloaded.peft_config["default"].dropout == 0.05
    assert [layer.dropout for _, layer in loldu_layers(reloaded)] == [0.05] * 4  # for is_trainable=True
    # generate reaches the wrapped model
    out = reloaded.generate(input_ids=ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)

    reference = float64_copy(reloaded.get_base_model())
    merged = reloaded.merge_and_unload()
    assert isinstance(merged, tf.LlamaForCausalLM) and not loldu_layers(merged)
    assert "save_pretrained" not in vars(merged)  # the class's own again
    assert_float64_close(logits(merged, ids), lambda m: logits(m, ids), reference, name="merged logits")


def test_a_bert_classifier_trains_its_head_with_modules_to_save_and_reloads_it(tmp_path):
    config = LoLDUConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                         task_type="SEQ_CLS")
    model = get_loldu_model(tiny_bert(), config)
    head = model.get_base_model().classifier
    assert isinstance(head, SavedModule)
    original = head.original_module.weight.detach().clone()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.classifier.modules_to_save.default.weight" in trainable
    assert not any("original_module" in n for n in trainable)
    train(model, tmp_path / "run", classify=True)
    assert torch.equal(head.original_module.weight, original)  # the original stays
    assert not torch.equal(head.modules_to_save["default"].weight, original)  # the copy trained
    model.save_pretrained(tmp_path / "adapter")
    ids = Tokens().ids[:4]
    trained = logits(model, ids)

    fresh = tiny_bert(seed=5)  # another random head: the file's must replace it
    fresh.load_state_dict({k: v for k, v in tiny_bert().state_dict().items() if "classifier" not in k},
                          strict=False)
    reloaded = LoLDUModel.from_pretrained(fresh, tmp_path / "adapter")
    assert reloaded.peft_config["default"].modules_to_save == ("classifier",)
    assert torch.equal(logits(reloaded, ids), trained)
    with reloaded.disable_adapter():  # the base: LoLDU off and the original head
        base_logits = logits(reloaded, ids)
    plain = tiny_bert(seed=5)
    plain.load_state_dict({k: v for k, v in tiny_bert().state_dict().items() if "classifier" not in k},
                          strict=False)
    assert torch.equal(base_logits, logits(plain, ids))
    reference = float64_copy(reloaded.get_base_model())
    merged = reloaded.merge_and_unload()
    assert isinstance(merged.classifier, torch.nn.Linear) and not isinstance(merged.classifier, SavedModule)
    assert torch.equal(merged.classifier.weight, head.modules_to_save["default"].weight)  # the trained head
    assert_float64_close(logits(merged, ids), lambda m: logits(m, ids), reference, name="merged logits")


def test_trainer_save_model_and_checkpoints_keep_the_adapter_and_resume(tmp_path):
    config = LoLDUConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = get_loldu_model(tiny_bert(), config)
    trainer = train(model, tmp_path / "run", classify=True, steps=4, save_steps=2)
    trainer.save_model(str(tmp_path / "final"))
    ids = Tokens().ids[:4]
    trained = logits(model, ids)
    reloaded = LoLDUModel.from_pretrained(tiny_bert(), tmp_path / "final")
    assert torch.equal(logits(reloaded, ids), trained)

    # resume from step 2 on a fresh model: the run's end point (d, s and the head), bit for bit
    resumed = get_loldu_model(tiny_bert(), config)
    train(resumed, tmp_path / "run", classify=True, steps=4, save_steps=2,
          resume=str(tmp_path / "run" / "checkpoint-2"))
    assert torch.equal(logits(resumed, ids), trained)

    # a checkpoint of another config is refused by name
    other = get_loldu_model(tiny_bert(), LoLDUConfig(r=2, target_modules=["query"]))
    from safetensors.torch import load_file

    with pytest.raises(ValueError, match=r"the state dict has LoLDU layers \[.*value.*\], this model \['bert"):
        other.load_state_dict(load_file(str(tmp_path / "final" / "model.safetensors")), strict=False)


def test_the_wrapped_models_own_save_pretrained_saves_the_adapter_or_the_merged_model(tmp_path):
    model = get_loldu_model(tiny_llama(), LoLDUConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, layer in loldu_layers(model):
            layer.d.mul_(1.5)
    ids = Tokens().ids[:2]
    trained = logits(model, ids)
    inner = model.get_base_model()
    inner.save_pretrained(tmp_path / "inner")  # what a user holding the HF model (or old code) calls
    assert (tmp_path / "inner" / ADAPTER_NAME).is_file()
    assert torch.equal(logits(LoLDUModel.from_pretrained(tiny_llama(), tmp_path / "inner"), ids), trained)

    reference = float64_copy(inner)
    model.save_pretrained(tmp_path / "merged", merged=True)
    assert loldu_layers(model) and torch.equal(logits(model, ids), trained)  # the model itself unchanged
    plain = tf.LlamaForCausalLM.from_pretrained(tmp_path / "merged")  # no unexpected keys, no LoLDU needed
    assert_float64_close(logits(plain, ids), lambda m: logits(m, ids), reference, name="merged checkpoint")


def test_named_adapters_have_their_own_heads(tmp_path):
    config = LoLDUConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = get_loldu_model(tiny_bert(), config)
    head = model.get_base_model().classifier
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)
        for _, layer in loldu_layers(model):
            layer.d.mul_(1.3)
    model.save_pretrained(tmp_path / "a")
    ids = Tokens().ids[:2]
    first = logits(model, ids)
    with torch.no_grad():
        head.modules_to_save["default"].weight.sub_(2.0)
    second = logits(model, ids)
    model.load_adapter(tmp_path / "a", adapter_name="other")
    assert list_adapters(model) == ["default", "other"] and set(head.modules_to_save) == {"default", "other"}
    assert not head.modules_to_save["other"].weight.requires_grad
    assert torch.equal(logits(model, ids), second)
    model.set_adapter("other")
    assert torch.equal(logits(model, ids), first)
    assert head.modules_to_save["other"].weight.requires_grad
    assert not head.modules_to_save["default"].weight.requires_grad
    model.set_adapter("default")
    model.delete_adapter("other")
    assert set(head.modules_to_save) == {"default"} and "other" not in model.peft_config
    assert torch.equal(logits(model, ids), second)


def test_modules_to_save_refusals_change_nothing(tmp_path):
    with pytest.raises(ValueError, match="modules_to_save entry 'head' matches no module"):
        get_loldu_model(tiny_bert(), LoLDUConfig(r=4, target_modules=["query"], modules_to_save=["head"]))
    bert = tiny_bert()
    before = copy.deepcopy(bert.state_dict())
    with pytest.raises(ValueError, match=r"\['classifier'\] are both targeted by LoLDU and in modules_to_save"):
        get_loldu_model(bert, LoLDUConfig(r=2, target_modules=["query", "classifier"], modules_to_save=["classifier"]))
    assert not loldu_layers(bert) and isinstance(bert.classifier, torch.nn.Linear)
    assert all(torch.equal(v, before[k]) for k, v in bert.state_dict().items())

    model = get_loldu_model(tiny_bert(), LoLDUConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    with torch.no_grad():
        model.get_base_model().classifier.modules_to_save["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"module 'classifier' \(modules_to_save\) has non-finite values"):
        model.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad" / ADAPTER_NAME).exists()

    # a file's head of another shape (another num_labels) is refused before anything changes
    good = get_loldu_model(tiny_bert(), LoLDUConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    good.save_pretrained(tmp_path / "good")
    config = tiny_bert().config
    config.num_labels = 5
    torch.manual_seed(0)  # the same encoder weights as tiny_bert(): only the head differs
    other = tf.BertForSequenceClassification(config)
    snapshot = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"module 'classifier': weight has shape \(5, 32\) in the model, \(3, 32\)"):
        load_loldu(other, tmp_path / "good")
    assert not loldu_layers(other) and all(torch.equal(v, snapshot[k]) for k, v in other.state_dict().items())


def test_functions_take_the_wrapper_and_files_move_between_wrapped_and_plain_models(tmp_path):
    model = get_loldu_model(tiny_llama(), LoLDUConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for _, layer in loldu_layers(model):
            layer.d.mul_(2.0)
    names = [n for n, _ in loldu_layers(model)]
    assert names[0] == "model.layers.0.self_attn.q_proj"  # named as in the wrapped model
    save_loldu(model, tmp_path / "f")
    plain = tiny_llama()
    ids = Tokens().ids[:2]
    assert load_loldu(plain, tmp_path / "f") is plain
    assert torch.equal(logits(plain, ids), logits(model, ids))
    with disable_loldu(model):
        assert torch.equal(logits(model, ids), logits(tiny_llama(), ids))
    assert merge_loldu(model) is model and not loldu_layers(model)
    assert remove_loldu(plain) is plain


def test_the_wrapper_copies_pickles_and_compiles(tmp_path):
    model = get_loldu_model(tiny_llama(), LoLDUConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = Tokens().ids[:2]
    expected = logits(model, ids)
    twin = copy.deepcopy(model)
    assert type(twin) is type(model) and torch.equal(logits(twin, ids), expected)
    assert twin.get_base_model().save_pretrained.__self__ is twin  # the copy saves itself, not the original
    restored = pickle.loads(pickle.dumps(model))
    assert isinstance(restored, LoLDUModel) and torch.equal(logits(restored, ids), expected)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    with torch.no_grad():
        assert torch.equal(compiled(input_ids=ids).logits, expected)


def test_a_trainer_sees_the_wrapped_models_inputs_and_labels():
    import inspect

    model = get_loldu_model(tiny_bert(), LoLDUConfig(r=4, target_modules=["query"]))
    params = inspect.signature(model.forward).parameters
    assert "token_type_ids" in params and "labels" in params  # not dropped as unused columns
    from transformers.utils import find_labels as labels_of

    assert labels_of(type(model)) == ["labels"]


def test_config_takes_peft_names_and_refuses_the_others_by_name():
    assert LoLDUConfig(r=6).rank == 6
    assert LoLDUConfig.from_dict({"r": 6, "task_type": "SEQ_CLS"}).task_type == "SEQ_CLS"
    for name, hint in [("lora_alpha", "alpha / rank"), ("use_dora", "magnitude"), ("init_lora_weights", "init")]:
        with pytest.raises(ValueError, match=f"'{name}' is a LoRA setting with no LoLDU meaning: .*{hint}"):
            LoLDUConfig(**{name: 1})
    with pytest.raises(ValueError, match="'r' and 'rank' are the same setting"):
        LoLDUConfig(r=4, rank=4)
    with pytest.raises(ValueError, match="bias must be 'none', got 'all'.*modules_to_save"):
        LoLDUConfig(bias="all")
    with pytest.raises(ValueError, match="task_type must be None or one of"):
        LoLDUConfig(task_type="CLASSIFY")
    with pytest.raises(ValueError, match="modules_to_save must be None or a non-empty list"):
        LoLDUConfig(modules_to_save="classifier")
    with pytest.raises(ValueError, match="inference_mode must be True or False"):
        LoLDUConfig(inference_mode=1)
    model = get_loldu_model(tiny_llama(), {"r": 4, "target_modules": ["q_proj", "v_proj"], "inference_mode": True})
    assert not any(p.requires_grad for p in model.parameters())
    excluded = get_loldu_model(tiny_llama(), LoLDUConfig(r=4, target_modules=["q_proj"],
                                                          exclude_modules=r"model\.layers\.1\..*"))
    assert [n for n, _ in loldu_layers(excluded)] == ["model.layers.0.self_attn.q_proj"]
    set_adapter(excluded, "default")


def head_crafts(config, tensors):
    """Edits an attacker might make to the modules_to_save part of a valid file (checksum recomputed)."""
    heads = config["modules_to_save"]
    key = "modules_to_save:lm_head:weight"
    return {
        "records as a list": (lambda: config.update(modules_to_save=["lm_head"]), r"modules_to_save must be an object"),
        "no type": (lambda: heads["lm_head"].pop("type"),
                    r"modules_to_save 'lm_head' must be an object with a 'type' string and a non-empty 'keys' list"),
        "keys empty": (lambda: heads["lm_head"].update(keys=[]), r"a non-empty 'keys' list"),
        "tensor missing": (lambda: tensors.pop(key), rf"tensor '{key}' is missing"),
        "tensor nan": (lambda: tensors[key].view(-1)[3:4].fill_(float("nan")), rf"{key} contains NaN or Inf"),
        "unlisted tensor": (lambda: tensors.update({"modules_to_save:lm_head:payload": torch.zeros(2)}),
                            r"unexpected \['modules_to_save:lm_head:payload'\]"),
        "another type": (lambda: heads["lm_head"].update(type="Conv2d"),
                         r"saves module 'lm_head' \(a Conv2d\), but the model has Linear there"),
        "another shape": (lambda: tensors.update({key: torch.zeros(7, 16)}),
                          r"module 'lm_head': weight has shape \(6, 16\) in the model, \(7, 16\)"),
        "another key": (lambda: heads["lm_head"].update(keys=["weight"]) or tensors.pop("modules_to_save:lm_head:bias"),
                        r"module 'lm_head' holds \['bias', 'weight'\], the adapter .* saves \['weight'\]"),
    }


@pytest.mark.parametrize("case", list(head_crafts({"modules_to_save": {"lm_head": {}}}, {})))
def test_crafted_modules_to_save_are_refused_with_nothing_changed(tmp_path, case):
    from test_adapters import assert_unchanged, read_file, snapshot
    from test_api import TinyLM

    from loldu_triton.core.fileformat import serialize

    torch.manual_seed(0)
    base = TinyLM()
    state = copy.deepcopy(base.state_dict())
    model = get_loldu_model(base, LoLDUConfig(r=3, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    save_loldu(model, tmp_path)
    config, tensors = read_file(tmp_path)
    edit, match = head_crafts(config, tensors)[case]
    edit()
    (tmp_path / ADAPTER_NAME).write_bytes(serialize(tensors, json.dumps(config), version=3))
    target = TinyLM()
    target.load_state_dict(state)
    before = snapshot(target)
    with pytest.raises(ValueError, match=match):
        load_loldu(target, tmp_path)
    assert_unchanged(target, before)


def test_the_wrappers_state_dict_is_the_adapter_so_tied_models_checkpoint_under_a_trainer(tmp_path):
    config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)

    def tied(seed=0):
        torch.manual_seed(seed)
        return tf.LlamaForCausalLM(config)

    model = get_loldu_model(tied(), LoLDUConfig(r=4, target_modules=["q_proj"]))
    assert model.get_base_model().lm_head.weight is model.get_base_model().model.embed_tokens.weight
    assert sorted(model.state_dict()) == ["_extra_state"] + [f"base_model.model.layers.{i}.self_attn.q_proj.{p}"
                                                             for i in range(2) for p in "ds"]
    trainer = train(model, tmp_path / "run", steps=2, save_steps=1)  # safetensors refuses shared tensors
    trainer.save_model(str(tmp_path / "final"))
    ids = Tokens().ids[:2]
    assert torch.equal(logits(LoLDUModel.from_pretrained(tied(), tmp_path / "final"), ids), logits(model, ids))
    # on another base the pivots differ: refused by name, not loaded as noise
    other = tied(seed=3)
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.q_proj' has a different base weight"):
        LoLDUModel.from_pretrained(other, tmp_path / "final")
    assert not loldu_layers(other) and "save_pretrained" not in vars(other)  # left as it was
    assert torch.equal(logits(other, ids), logits(tied(seed=3), ids))
    # a state dict without the adapter's keys is refused before anything loads
    fresh = get_loldu_model(tied(), LoLDUConfig(r=4, target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"lacks \['base_model.model.layers.0.self_attn.q_proj.d'"):
        fresh.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("0.self_attn.q_proj.d")})
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_from_pretrained_as_a_named_adapter_and_unsupported_arguments_are_refused(tmp_path):
    model = get_loldu_model(tiny_llama(), LoLDUConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for _, layer in loldu_layers(model):
            layer.d.mul_(1.7)
    model.save_pretrained(tmp_path / "a")
    ids = Tokens().ids[:2]
    named = LoLDUModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="support")
    assert named.active_adapter == "support" and list_adapters(named) == ["support"]
    assert list(named.peft_config) == ["support"]
    assert torch.equal(logits(named, ids), logits(model, ids))
    with pytest.raises(TypeError, match=r"\['push_to_hub'\] are not supported"):
        model.save_pretrained(tmp_path / "b", push_to_hub=True)
    assert not (tmp_path / "b").exists()
    with pytest.raises(TypeError):
        LoLDUModel.from_pretrained(tiny_llama(), tmp_path / "a", revision="main")


def test_activation_checkpointing_through_the_wrapper_gives_the_same_gradients():
    ids = Tokens().ids[:2]

    def grads(checkpointing):
        model = get_loldu_model(tiny_llama(), LoLDUConfig(r=4, target_modules=["q_proj", "v_proj"]))
        if checkpointing:
            model.activation_checkpointing_enable()  # reaches the wrapped model (transformers 5.25 name)
            assert model.get_base_model().is_activation_checkpointing
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 8
    for name in plain:  # the same float32 ops, recomputed: the same bits
        assert torch.equal(plain[name], checkpointed[name]), name


def test_review_cases_heads_targets_and_state_dicts(tmp_path):
    # SEQ_CLS with "all-linear": the head trains in full, as PEFT's, not refused and not adapted
    model = get_loldu_model(tiny_bert(), LoLDUConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
    assert isinstance(model.get_base_model().classifier, SavedModule)
    assert not any("classifier" in n for n, _ in loldu_layers(model))
    # a second add_loldu never reaches inside a head, and the adapter still saves
    from loldu_triton import add_loldu

    with pytest.warns(UserWarning, match="already have LoLDU; left as they are"):
        add_loldu(model, rank=2)  # every other nn.Linear already has LoLDU; the head's are left alone
    assert not any("classifier" in n for n, _ in loldu_layers(model))
    with pytest.raises(ValueError, match=r"'classifier' matches no .* outside modules_to_save \['classifier'\]"):
        add_loldu(model, rank=2, target_modules=["classifier"])
    model.save_pretrained(tmp_path / "a")

    # loading a named adapter with a head next to a trainable adapter without one: only the named one gets a copy
    plain = get_loldu_model(tiny_bert(), LoLDUConfig(r=4, target_modules=["query", "value"]))
    trainable = plain.get_nb_trainable_parameters()[0]
    ids = Tokens().ids[:2]
    before = logits(plain, ids)
    plain.load_adapter(tmp_path / "a", adapter_name="other")
    head = plain.get_base_model().classifier
    assert set(head.modules_to_save) == {"other"} and plain.get_nb_trainable_parameters()[0] == trainable
    assert torch.equal(logits(plain, ids), before)

    # get_loldu_model on a model that has LoLDU already is refused (its config would not describe the layers)
    with pytest.raises(ValueError, match="already has LoLDU layers"):
        get_loldu_model(plain.get_base_model(), LoLDUConfig(r=8))

    # layers of two ranks (two add_loldu calls) rebuild from a Trainer-style state dict
    from safetensors.torch import save_file

    mixed = get_loldu_model(tiny_llama(), LoLDUConfig(r=4, target_modules=["q_proj"]))
    add_loldu(mixed, rank=2, target_modules=["v_proj"])
    with torch.no_grad():
        for _, layer in loldu_layers(mixed):
            layer.d.mul_(1.4)
    (tmp_path / "t").mkdir()
    save_file(mixed.state_dict(), str(tmp_path / "t" / "model.safetensors"))
    back = LoLDUModel.from_pretrained(tiny_llama(), tmp_path / "t")
    assert sorted(layer.rank for _, layer in loldu_layers(back)) == [2, 2, 4, 4]
    assert torch.equal(logits(back, ids), logits(mixed, ids))

    # unknown selected_adapters: refused before anything is written
    with pytest.raises(ValueError, match=r"no adapters \['typo'\]"):
        mixed.save_pretrained(tmp_path / "s", selected_adapters=["typo"])
    assert not (tmp_path / "s").exists()

    # merged for good through the functions: the wrapped model's own save_pretrained saves it as a plain model
    merge_loldu(mixed)
    mixed.get_base_model().save_pretrained(tmp_path / "plain")
    reread = tf.LlamaForCausalLM.from_pretrained(tmp_path / "plain")
    assert torch.equal(logits(reread, ids), logits(mixed, ids))


def test_a_merged_save_of_a_tied_weight_that_computes_with_w0_elsewhere_is_refused(tmp_path):
    # T5's encoder and decoder embeddings and lm_head share the `shared` weight: adapted, only `shared` computes
    # with W0 + delta, which a merged checkpoint (tied again on load) cannot say
    config = tf.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                         num_heads=4, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = get_loldu_model(tf.T5ForConditionalGeneration(config), LoLDUConfig(r=4, target_modules=["shared", "q"]))
    with pytest.raises(ValueError, match=r"'encoder.embed_tokens.weight' shares its tensor with the adapted layer "
                                         r"'shared' \(tied weights\) but computes with W0"):
        model.save_pretrained(tmp_path / "merged", merged=True)
    assert not (tmp_path / "merged").exists()
    model.save_pretrained(tmp_path / "adapter")  # the adapter saves
    assert (tmp_path / "adapter" / ADAPTER_NAME).is_file()


def test_the_state_dict_of_a_wrapper_merged_for_good_is_empty_but_readable():
    model = get_loldu_model(tiny_llama(), LoLDUConfig(r=4, target_modules=["q_proj"]))
    merge_loldu(model)  # the functional verb on the wrapper: plain layers, no adapter left
    state = model.state_dict()
    assert list(state) == ["_extra_state"]
    model.load_state_dict(state)  # nothing to load, nothing refused


def test_exclude_modules_leaves_a_layer_out_before_it_is_checked():
    from loldu_triton import add_loldu

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 8),
                                   torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(8, 8)))

    with pytest.raises(ValueError, match=r"cannot adapt '1': its weight is computed by a parametrization"):
        add_loldu(model(), rank=2, target_modules=r"\d")
    adapted = add_loldu(model(), rank=2, target_modules=r"\d", exclude_modules=["1"])
    assert [n for n, _ in loldu_layers(adapted)] == ["0"]
    with pytest.raises(ValueError, match=r"no layer to adapt \(exclude_modules='\.\*' left none\)"):
        add_loldu(model(), rank=2, target_modules=r"\d", exclude_modules=".*")
