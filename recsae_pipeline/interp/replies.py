"""The SAGE loop's states and the reply schemas an explainer (LLM or offline) answers in."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field

from recsae_pipeline.interp.spec import Spec

Expect = Literal["high", "low"]


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
    text: str = Field(description="A specific, testable claim about when the feature fires.")
    kind: Literal["positive", "negative_control"] = Field(
        description="negative_control: a claim about where the feature should NOT fire."
    )
    spec: Spec | None = Field(default=None, description="Optional structured form of the claim.")


class HypothesesReply(BaseModel):
    observation: str = Field(description="What the exemplars have in common.")
    hypotheses: list[HypothesisDraft] = Field(min_length=3, max_length=5)


class SequenceSpec(BaseModel):
    items: list[int | str] = Field(
        min_length=1, max_length=50, description="Item ids or exact titles, oldest first."
    )
    target_position: int = Field(default=-1, description="0-based; -1 = the last item.")
    expect: Expect


class ExperimentPlan(BaseModel):
    description: str
    sequences: list[SequenceSpec] = Field(min_length=2, max_length=16)


class VerdictReply(BaseModel):
    analysis: str
    verdict: Literal["confirmed", "refuted", "refined"]
    refined_text: str | None = Field(default=None, description="The narrowed claim, if refined.")
    refined_spec: Spec | None = None


class ReviewReply(BaseModel):
    summary: str
    need_more_testing: bool


class FinalReply(BaseModel):
    label: str = Field(max_length=120, description="A short label.")
    description: str = Field(description="One to three sentences.")
