"""Every Python snippet of README.md runs as written, in order, each on its own with its own imports, as a reader
would run them: with a tiny random Llama (built from a config) standing in for the hub download and the GPU.
Only what the README says a snippet is given (GIVEN) passes from one snippet to the next."""
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama as base_tiny_llama

tf = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

README = Path(__file__).resolve().parents[1] / "README.md"
# Snippets that need what a CPU test cannot have; each named by a line it contains.
NOT_RUN = {"torch.distributed.init_process_group": "needs several processes and NCCL"}
# What the README's text gives the snippets: the model (which each snippet may go on changing), a fresh copy of
# its base, input ids and a dataset.
GIVEN = ("model", "base_model", "input_ids", "train_dataset")


def tiny_llama(dtype=None):
    model = base_tiny_llama()
    return model.to(dtype) if dtype is not None else model


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def snippets():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [b for b in blocks if not any(marker in b for marker in NOT_RUN)], len(blocks)


def prelude(tmp_path):
    """What the snippets take as given: a model, a fresh copy of its base, input ids, a dataset, and three
    adapters of the base for the many-adapters example."""
    from loldu_triton import LoLDUConfig, get_loldu_model, loldu_layers, save_loldu

    for i, name in enumerate(["support", "legal", "medical"]):
        model = get_loldu_model(tiny_llama(), LoLDUConfig(rank=4, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for _, layer in loldu_layers(model):
                layer.d.mul_(1 + 0.1 * (i + 1))
        save_loldu(model, tmp_path / "adapters" / name)
    return {"model": tiny_llama(), "base_model": tiny_llama(), "input_ids": Tokens().ids[:4],
            "train_dataset": Tokens()}


def test_every_readme_python_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the hub download and the GPU, stood in for
    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained",
                        lambda name, dtype=None, **kwargs: tiny_llama(dtype))
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *args, **kwargs: self)
    given = prelude(tmp_path)
    blocks, total = snippets()
    assert len(blocks) >= 9 and total - len(blocks) == len(NOT_RUN), (len(blocks), total)
    namespaces = []
    for i, code in enumerate(blocks):
        namespace = dict(given)  # nothing else: a snippet that uses a name it does not import fails here
        try:
            with warnings.catch_warnings():  # (clamped ranks and the like: the snippets' warnings are expected)
                warnings.simplefilter("ignore")
                exec(compile(code, f"README.md python snippet {i + 1}", "exec"), namespace)
        except Exception as err:  # say which snippet
            raise AssertionError(f"README snippet {i + 1} failed:\n{code}") from err
        given.update({k: namespace[k] for k in GIVEN})
        namespaces.append(namespace)
    namespace = {k: v for ns in namespaces for k, v in ns.items()}
    # what the snippets say they write
    for path in ("my-adapter/loldu_adapter.safetensors", "loldu_state.pth", "llama2-loldu/loldu_adapter.safetensors",
                 "my-lora/adapter_config.json", "legal-v2/loldu_adapter.safetensors",
                 "support-v1/loldu_adapter.safetensors"):
        assert (tmp_path / path).is_file(), path
    assert "trainer" in namespace and namespace["trainer"].state.global_step > 0
    assert namespace["list_adapters"](namespace["model"]) == ["legal", "default"]
