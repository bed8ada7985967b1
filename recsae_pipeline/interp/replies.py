"""The SAGE loop's states and the reply schemas an explainer (LLM or offline) answers in.

Every free-text field has a `max_length`: a grammar-constrained local model
(`local_server.json_grammar`) otherwise can write one string until its token limit."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from recsae_pipeline.interp.spec import Spec

Expect = Literal["high", "low"]
CLAIM = 300
"""Characters of one claim: a hypothesis, a refined hypothesis, an experiment's description."""
PROSE = 600
"""Characters of a few sentences: an observation, an analysis, a summary, a description."""
Title = Annotated[str, Field(max_length=120)]


class Status(StrEnum):
    PENDING = "pending"
    CONFIRMED = "confirmed"
    REFUTED = "refuted"
    REFINED = "refined"


class State(StrEnum):
    EXEMPLARS = "exemplars"
    HYPOTHESES = "hypotheses"
    DESIGN = "design"
    RUN = "run"
    ANALYSE = "analyse"
    REVIEW = "review"
    FINAL = "final"
    DONE = "done"


class HypothesisDraft(BaseModel):
    text: str = Field(
        max_length=CLAIM, description="A specific, testable claim about when the feature fires."
    )
    kind: Literal["positive", "negative_control"] = Field(
        description="negative_control: a claim about where the feature should NOT fire."
    )
    spec: Spec | None = Field(default=None, description="Optional structured form of the claim.")


class HypothesesReply(BaseModel):
    observation: str = Field(max_length=PROSE, description="What the exemplars have in common.")
    hypotheses: list[HypothesisDraft] = Field(min_length=3, max_length=5)


class SequenceSpec(BaseModel):
    items: list[int | Title] = Field(
        min_length=1, max_length=50, description="Item ids or exact titles, oldest first."
    )
    target_position: int = Field(default=-1, description="0-based; -1 = the last item.")
    expect: Expect


class ExperimentPlan(BaseModel):
    description: str = Field(max_length=CLAIM)
    sequences: list[SequenceSpec] = Field(min_length=2, max_length=16)


class VerdictReply(BaseModel):
    analysis: str = Field(max_length=PROSE)
    verdict: Literal["confirmed", "refuted", "refined"]
    refined_text: str | None = Field(
        default=None, max_length=CLAIM, description="The narrowed claim, if refined."
    )
    refined_spec: Spec | None = None


class ReviewReply(BaseModel):
    summary: str = Field(max_length=PROSE)
    need_more_testing: bool


class FinalReply(BaseModel):
    label: str = Field(max_length=120, description="A short label.")
    description: str = Field(max_length=PROSE, description="One to three sentences.")
