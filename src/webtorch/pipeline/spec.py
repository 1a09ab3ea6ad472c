"""The pipeline API that pipeline files use: :class:`Stage`, :func:`stage`, :func:`model_stage`,
:class:`Pipeline` and :class:`Reject`, and the loader that imports a pipeline file.

A pipeline file is plain Python, like a model file::

    import webtorch

    @webtorch.stage                      # takes="records": a list, one value per row
    def clean(docs): return [d.strip() or webtorch.Reject("empty document") for d in docs]

    @webtorch.stage(takes="tensors")     # a dict name -> array/tensor, leading dim = rows
    def scale(batch): return {"x": batch["x"] * 2}

    pipeline = webtorch.Pipeline([clean, featurize, webtorch.model_stage("textcls"), label])

A stage gets a BATCH (the rows of several requests concatenated) and returns one row per row it
got: a list, or a dict of arrays whose leading dimension is the rows. Where, how wide and how
batched each stage runs is the TOML's business (``[pipelines.NAME.stages.STAGE]``), not the file's.

This module imports neither numpy nor torch: a process placement's workers import it, and the
pipeline file, and nothing else of WebTorch's but the user-file loader (the standard library
only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, overload

from webtorch.userfiles import UserFileError, import_user_file

Takes = Literal["records", "tensors"]
TAKES: Final = ("records", "tensors")


class Reject:
    """Returned by a stage in place of a row: this record is refused (the request answers 422
    naming the stage, the record's index and ``reason``); the other rows of the batch go on."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = str(reason)

    def __repr__(self) -> str:
        return f"Reject({self.reason!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reject) and other.reason == self.reason

    def __hash__(self) -> int:
        return hash(("Reject", self.reason))

    def __reduce__(self) -> tuple[type[Reject], tuple[str]]:
        return (Reject, (self.reason,))  # __slots__ without __dict__: say how to pickle


@dataclass(frozen=True)
class Stage:
    """One named step. ``fn`` is the function over a batch (None for a model stage, whose
    ``model`` names a ``[models.NAME]`` entry). ``after`` names the stages whose outputs it
    takes: empty means the previous stage in the pipeline's list (the request, for the first);
    two or more make a join, which gets ``{"a": batch_a, "b": batch_b}``."""

    name: str
    fn: Callable[[Any], Any] | None = None
    takes: Takes = "records"
    after: tuple[str, ...] = ()
    model: str | None = None

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError("a stage needs a name")
        if self.takes not in TAKES:
            raise ValueError(f"stage {self.name!r}: takes must be 'records' or 'tensors'")
        if (self.fn is None) == (self.model is None):
            raise ValueError(f"stage {self.name!r}: give a function or a model, not both")
        if isinstance(self.after, str):
            object.__setattr__(self, "after", (self.after,))
        object.__setattr__(self, "after", tuple(self.after))

    def __call__(self, batch: Any) -> Any:
        """The function itself: a decorated stage stays callable, e.g. in a unit test."""
        if self.fn is None:
            raise TypeError(f"stage {self.name!r} is model {self.model!r}: serve it to call it")
        return self.fn(batch)


@overload
def stage(fn: Callable[[Any], Any], /) -> Stage: ...
@overload
def stage(
    *, name: str | None = None, takes: Takes = "records", after: Sequence[str] = ()
) -> Callable[[Callable[[Any], Any]], Stage]: ...
def stage(
    fn: Callable[[Any], Any] | None = None,
    /,
    *,
    name: str | None = None,
    takes: Takes = "records",
    after: Sequence[str] = (),
) -> Stage | Callable[[Callable[[Any], Any]], Stage]:
    """``@webtorch.stage`` or ``@webtorch.stage(takes="tensors", after=("a", "b"))``: the
    function becomes a :class:`Stage` named after it (or ``name``)."""

    def wrap(f: Callable[[Any], Any]) -> Stage:
        return Stage(name or f.__name__, f, takes, tuple(after))

    return wrap(fn) if fn is not None else wrap


def model_stage(model: str, *, name: str | None = None, after: Sequence[str] = ()) -> Stage:
    """A served model as a stage: its batches go through that model's executor (its dynamic
    batching, training priority and WAL); it takes and returns tensors named like the model's."""
    return Stage(name or model, None, "tensors", tuple(after), model)


class Pipeline:
    """What a pipeline file defines: its stages, in an order where each comes after the stages
    it takes from. ``output`` names the stage whose rows answer a request (default: the last)."""

    def __init__(
        self, stages: Sequence[Stage | Callable[[Any], Any]], output: str | None = None
    ) -> None:
        built: list[Stage] = []
        for item in stages:
            if isinstance(item, Stage):
                built.append(item)
            elif callable(item):
                built.append(stage(item))
            else:
                raise TypeError(f"a pipeline's stages are stages or functions, not {item!r}")
        if not built:
            raise ValueError("a pipeline needs at least one stage")
        self.stages = built
        self.output = output if output is not None else built[-1].name

    def __repr__(self) -> str:
        return f"Pipeline({[s.name for s in self.stages]}, output={self.output!r})"


class PipelineLoadError(Exception):
    """A pipeline file cannot be imported or defines no ``pipeline``."""


# Imported files by resolved path, per process: a process placement's worker imports the file
# once (its initializer) and finds the stage by name for every batch.
_LOADED: dict[str, Pipeline] = {}


def import_pipeline_file(path: Path) -> Pipeline:
    """Execute a pipeline file and return its ``pipeline`` (cached per process)."""
    key = str(path.resolve())
    cached = _LOADED.get(key)
    if cached is not None:
        return cached
    try:
        module = import_user_file(path, "pipeline file")
    except UserFileError as exc:
        raise PipelineLoadError(str(exc)) from exc
    pipeline = getattr(module, "pipeline", None)
    if not isinstance(pipeline, Pipeline):
        raise PipelineLoadError(
            f"pipeline file {path} must define `pipeline = webtorch.Pipeline([...])`"
        )
    _LOADED[key] = pipeline
    return pipeline
