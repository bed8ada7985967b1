"""The recommender: padding never changes a prediction, hooks reach every layer, teachers load
local checkpoints, students copy the teacher."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from recsae_pipeline.data.batching import pad_right
from recsae_pipeline.models.recommender import Recommender, RecommenderConfig, student_from_teacher
from recsae_pipeline_tests.torch_support import save_llama_checkpoint

NUM_ITEMS = 20


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_sasrec(**overrides) -> Recommender:
    torch.manual_seed(0)
    config = RecommenderConfig.sasrec(NUM_ITEMS, hidden_size=16, d_item=16, num_heads=2, max_len=12)
    return Recommender(replace(config, **overrides))


def tiny_teacher(num_layers: int = 4, **overrides) -> Recommender:
    torch.manual_seed(0)
    config = RecommenderConfig.teacher(
        NUM_ITEMS, 16, hidden_size=16, num_layers=num_layers, num_heads=2, max_len=12, **overrides
    )
    return Recommender(config, item_table=torch.randn(NUM_ITEMS + 1, 16))


MODELS = {
    "sasrec-gpt2": tiny_sasrec,
    "sasrec-llama": lambda: tiny_sasrec(backbone="llama"),
    "teacher-llama": tiny_teacher,
    "teacher-gpt2": lambda: tiny_teacher(backbone="gpt2"),
}


@pytest.mark.parametrize("name", MODELS)
def test_padding_never_changes_scores_at_real_positions(name):
    model = MODELS[name]().eval()
    sequence = np.array([3, 7, 1, 9, 4])
    with torch.no_grad():
        alone = model.scores(model(torch.from_numpy(sequence)[None]).user)[0]
        batch = pad_right([np.arange(1, 13), sequence, np.array([2, 2])])
        padded = model.scores(model(batch).user)[1, : len(sequence)]
        changed = sequence.copy()
        changed[0] = 11
        control = model.scores(model(torch.from_numpy(changed)[None]).user)[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
    # The tolerance is far below what one different earlier item does to later positions.
    assert (control[1:, 1:] - alone[1:, 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", MODELS)
def test_padding_column_is_never_recommended(name):
    model = MODELS[name]().eval()
    with torch.no_grad():
        scores = model.predict(pad_right([np.array([1, 2, 3]), np.array([4])]))
    assert scores.shape == (2, NUM_ITEMS + 1)
    assert torch.isneginf(scores[:, 0]).all()
    assert torch.isfinite(scores[:, 1:]).all()


def test_predict_reads_the_last_real_position():
    model = tiny_sasrec().eval()
    batch = pad_right([np.array([5, 6, 7]), np.array([8, 9, 10, 11, 12])])
    with torch.no_grad():
        every_position = model.scores(model(batch).user)
        torch.testing.assert_close(model.predict(batch), every_position[[0, 1], [2, 4]])


def test_left_padded_or_empty_input_is_rejected():
    model = tiny_sasrec().eval()
    with pytest.raises(ValueError, match="right-padded"):
        model(torch.tensor([[0, 0, 3, 4]]))
    with pytest.raises(ValueError, match="at least one real item"):
        model.predict(torch.tensor([[1, 2], [0, 0]]))


@pytest.mark.parametrize("name", ["sasrec-gpt2", "teacher-llama"])
def test_hidden_states_and_layer_hooks_can_read_and_replace(name):
    model = MODELS[name]().eval()
    items = torch.tensor([[1, 2, 3, 4]])
    seen = {}

    def read(module, inputs, output):
        seen["layer0"] = output.clone()

    def replace(module, inputs, output):
        return torch.zeros_like(output)

    with torch.no_grad():
        handle = model.layers[0].register_forward_hook(read)
        out = model(items, output_hidden_states=True)
        handle.remove()
        assert len(out.hidden_states) == model.config.num_layers + 1
        assert out.hidden_states[1].shape == (1, 4, model.config.hidden_size)
        torch.testing.assert_close(seen["layer0"], out.hidden_states[1])

        handle = model.layers[0].register_forward_hook(replace, prepend=True)
        steered = model(items, output_hidden_states=True)
        handle.remove()
        assert torch.equal(steered.hidden_states[1], torch.zeros_like(out.hidden_states[1]))
        assert not torch.allclose(steered.user, out.user)
        torch.testing.assert_close(model(items).user, out.user)


def test_sasrec_item_table_is_learned_and_teacher_table_frozen():
    sasrec, teacher = tiny_sasrec(), tiny_teacher()
    assert sasrec.item_vectors.requires_grad
    assert not teacher.item_vectors.requires_grad
    assert "item_table" not in dict(teacher.named_parameters())
    with pytest.raises(ValueError, match="frozen sasrec item table"):
        Recommender(
            RecommenderConfig.teacher(NUM_ITEMS, 16, hidden_size=16, num_layers=2, num_heads=2)
        )
    with pytest.raises(ValueError, match="d_item=8 must equal hidden_size=16"):
        RecommenderConfig.sasrec(NUM_ITEMS, hidden_size=16, d_item=8)


def test_teacher_loads_first_layers_of_a_local_llama_checkpoint(tmp_path):
    torch.manual_seed(1)
    checkpoint = save_llama_checkpoint(tmp_path, num_layers=3, intermediate_size=32, vocab_size=50)
    assert (tmp_path / "model.safetensors").is_file()

    teacher = tiny_teacher(num_layers=2, pretrained_path=str(tmp_path))
    assert len(teacher.layers) == 2
    for i in range(2):
        for (name, got), (_, want) in zip(
            teacher.layers[i].state_dict().items(),
            checkpoint.layers[i].state_dict().items(),
            strict=True,
        ):
            assert torch.equal(got, want), name
    assert torch.equal(teacher.backbone.norm.weight, checkpoint.norm.weight)
    assert teacher.backbone.get_input_embeddings().num_embeddings == 1

    with pytest.raises(ValueError, match="hidden size 16"):
        Recommender(
            RecommenderConfig.teacher(
                NUM_ITEMS,
                16,
                hidden_size=32,
                num_layers=2,
                num_heads=2,
                pretrained_path=str(tmp_path),
            ),
            item_table=torch.randn(NUM_ITEMS + 1, 16),
        )


def test_student_copies_the_teachers_first_layers():
    teacher = tiny_teacher(num_layers=4).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    student = student_from_teacher(teacher, num_layers=2).eval()
    assert student.config.kind == "student" and len(student.layers) == 2
    teacher_state = teacher.state_dict()
    for name, value in student.state_dict().items():
        assert torch.equal(value, teacher_state[name]), name

    items = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        t = teacher(items, output_hidden_states=True).hidden_states
        s = student(items, output_hidden_states=True).hidden_states
    torch.testing.assert_close(s[1], t[1])
    with pytest.raises(ValueError, match="pick 1..4"):
        student_from_teacher(teacher, num_layers=5)
