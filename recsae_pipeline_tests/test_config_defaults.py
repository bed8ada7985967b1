"""Every knob has one default: each asset Config and resource field equals the default of the
domain object it configures (a dataclass, pydantic model, preset or keyword argument)."""

from __future__ import annotations

import inspect
from typing import Any

import dagster as dg
import pytest

from recsae_pipeline.activations.shards import write_activations
from recsae_pipeline.data.ingest import InteractionColumns
from recsae_pipeline.data.sequences import SequenceConfig
from recsae_pipeline.data.sources import MovieLensSource, RecBoleSource, TabularSource
from recsae_pipeline.data.synthetic import SyntheticConfig
from recsae_pipeline.data.validation import QualityBounds
from recsae_pipeline.defs import resources
from recsae_pipeline.defs.assets.models import SasrecConfig, TeacherConfig, TrainingOptions
from recsae_pipeline.defs.assets.sae import SaeAssetConfig
from recsae_pipeline.defs.config import domain_default, knob
from recsae_pipeline.defs.definitions import ASSET_MODULES
from recsae_pipeline.interp.explain import score_features, select_features
from recsae_pipeline.interp.llm import LLMSettings
from recsae_pipeline.interp.local_server import ServerConfig
from recsae_pipeline.interp.sage import Limits
from recsae_pipeline.models.distillation import DistillConfig
from recsae_pipeline.models.probe import layer_scores
from recsae_pipeline.models.recommender import (
    TEACHER_DEFAULTS,
    RecommenderConfig,
    student_from_teacher,
)
from recsae_pipeline.models.training import LLAMA_TRAINING, SASREC_TRAINING, TrainConfig
from recsae_pipeline.report.feature_browser import write_browser
from recsae_pipeline.report.results import build_results
from recsae_pipeline.sae.evaluation import SaeBounds
from recsae_pipeline.sae.features import compute_feature_stats
from recsae_pipeline.sae.model import SaeConfig
from recsae_pipeline.sae.steering import steering_users, summarize
from recsae_pipeline.sae.training import SaeTrainConfig, train_sae

CONFIGS = {
    cls.__name__: cls
    for module in [*ASSET_MODULES, resources]
    for _, cls in inspect.getmembers(module, inspect.isclass)
    if issubclass(cls, dg.Config | dg.ConfigurableResource) and cls.__module__ == module.__name__
}
"""Every Config and resource class the Definitions' modules declare, by name."""
LAUNCHER = {"launcher", "nproc_per_node"}

# Config class name -> (domain sources, first that has the name wins; config field -> domain
# name where they differ; fields only the pipeline has, which no domain object defaults).
DOMAIN: dict[str, tuple[list[Any], dict[str, str], set[str]]] = {
    "SyntheticOptions": ([SyntheticConfig], {}, set()),
    "MovieLensOptions": ([MovieLensSource], {}, {"path"}),
    "RecBoleOptions": ([RecBoleSource], {}, {"path"}),
    "TabularOptions": (
        [InteractionColumns, TabularSource],
        {
            "user_column": "user_id",
            "item_column": "item_id",
            "timestamp_column": "timestamp",
            "rating_column": "rating",
            "title_column": "item_title_column",
            "year_column": "item_year_column",
            "genres_column": "item_genres_column",
        },
        {"path"},
    ),
    "RawInteractionsConfig": (
        [],
        {},
        {"source", "synthetic", "movielens", "recbole", "tabular"},
    ),
    "SequencesConfig": ([SequenceConfig], {}, set()),
    "TrainingOptions": ([TrainConfig], {}, set()),
    "LlamaTrainingOptions": ([LLAMA_TRAINING], {}, set()),
    "SasrecConfig": ([SASREC_TRAINING, TrainConfig, RecommenderConfig], {}, LAUNCHER),
    # lora_targets: a list in the config, the domain's tuple (checked apart below).
    "LoraOptions": ([RecommenderConfig], {}, {"lora_targets"}),
    "BaseLlmConfig": ([], {}, {"source", "allow_network"}),
    "TeacherConfig": (
        [TEACHER_DEFAULTS, LLAMA_TRAINING, RecommenderConfig],
        {},
        {"lora_targets"},
    ),
    "StudentConfig": (
        [LLAMA_TRAINING, DistillConfig, student_from_teacher, RecommenderConfig],
        {},
        {"teacher_tolerance", "lora_targets"},
    ),
    "LayerProbeConfig": ([layer_scores], {}, set()),
    "ActivationsConfig": ([write_activations], {}, set()),
    "SaeAssetConfig": ([SaeConfig, SaeTrainConfig, train_sae, SaeBounds], {}, LAUNCHER),
    "FeatureStatsConfig": ([compute_feature_stats], {}, set()),
    # steering_users' max_users=None means every user; the asset caps the sweep's cost.
    "SteeringConfig": (
        [summarize, steering_users],
        {},
        {"alpha_scales", "min_top_items", "max_users"},
    ),
    "ExplanationsConfig": ([select_features, Limits], {}, {"features"}),
    "ExplanationScoresConfig": ([score_features], {}, {"min_concept_auc"}),
    "FeatureBrowserConfig": ([write_browser], {}, set()),
    "ResultsConfig": ([build_results], {}, set()),
    "DataQuality": ([QualityBounds], {}, set()),
    "LLM": ([LLMSettings, ServerConfig], {}, {"backend", "base_url", "model"}),
    "TorchDevice": ([], {}, {"device", "threads"}),
    "StorageRoot": ([], {}, {"path", "cache_dir", "mirror"}),
}


def _default(field: Any) -> Any:
    return field.get_default(call_default_factory=True)


def mismatches(config_cls: type, sources: list[Any], names: dict[str, str], own: set[str]):
    """(field, config default, domain default or a reason) for every field that disagrees."""
    out = []
    for name, field in config_cls.model_fields.items():
        if name in own:
            continue
        domain_name = names.get(name, name)
        for source in sources:
            try:
                expected = domain_default(source, domain_name)
            except (KeyError, AttributeError):
                continue
            if _default(field) != expected:
                out.append((name, _default(field), expected))
            break
        else:
            out.append((name, _default(field), "no domain default: add one or list it as own"))
    return out


@pytest.mark.parametrize("name", list(DOMAIN))
def test_config_defaults_equal_the_domain_defaults(name):
    assert name in CONFIGS, f"{name} is in DOMAIN but no module of the Definitions declares it"
    assert mismatches(CONFIGS[name], *DOMAIN[name]) == []


def test_every_config_class_is_listed():
    assert set(CONFIGS) - set(DOMAIN) == set(), (
        "add the new Config class to DOMAIN with its sources"
    )


def test_a_default_that_drifts_from_the_domain_is_reported():
    class Drifted(dg.Config):
        lr: float = 5e-4  # TrainConfig says 1e-3
        batch_size: int = knob(TrainConfig, "batch_size")
        orphan: int = 3

    assert mismatches(Drifted, [TrainConfig], {}, set()) == [
        ("lr", 5e-4, 1e-3),
        ("orphan", 3, "no domain default: add one or list it as own"),
    ]


def test_the_pipeline_and_the_python_api_build_the_same_objects():
    """What benchmarks and the torchrun ranks construct with no arguments is what the assets
    run with by default."""
    assert TrainingOptions().train_config() == TrainConfig()
    assert TeacherConfig().train_config() == LLAMA_TRAINING
    assert SasrecConfig().train_config() == SASREC_TRAINING
    teacher = RecommenderConfig.teacher(100, d_item=64)
    assert {k: getattr(teacher, k) for k in TEACHER_DEFAULTS} == {
        k: getattr(TeacherConfig(), k, TEACHER_DEFAULTS[k]) for k in TEACHER_DEFAULTS
    }
    assert SaeAssetConfig().rows_seen == SaeTrainConfig().rows_seen == 500_000


def test_lora_targets_default_to_the_domains() -> None:
    for name in ("LoraOptions", "TeacherConfig", "StudentConfig"):
        field = CONFIGS[name].model_fields["lora_targets"]
        assert tuple(field.default) == RecommenderConfig.lora_targets
