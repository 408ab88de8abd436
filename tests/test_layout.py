"""The package layout: public names pinned, and imports that only run one way.

``natflow`` (sources in ``sdk/``) is what applications import; ``natflow_engine`` (``engine/``)
is the durable core. The engine never imports the SDK, and the SDK reaches the engine only
through the names ``natflow_engine`` exports and its public ``events`` schema.
"""

from __future__ import annotations

import ast
import typing
from collections.abc import Iterator
from pathlib import Path

import natflow
import natflow_engine

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engine" / "natflow_engine"
SDK = ROOT / "sdk" / "natflow"


def imports(folder: Path) -> Iterator[tuple[Path, int, str]]:
    """(file, line, imported module) for every import statement under ``folder``."""
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, node.lineno, alias.name
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                yield path, node.lineno, node.module


def test_natflow_exports_exactly_the_public_api() -> None:
    assert sorted(natflow.__all__) == [
        "AesGcmCodec",
        "Client",
        "ConnectionRefused",
        "Debounce",
        "ErrorInfo",
        "InvalidInput",
        "LifecycleEvent",
        "Limit",
        "MissingKey",
        "NatflowError",
        "NonDeterminismError",
        "PayloadCodec",
        "PermissionDenied",
        "RateLimit",
        "ReplayResult",
        "Replayer",
        "RetryPolicy",
        "RunCancelled",
        "RunFailed",
        "RunHandle",
        "RunInfo",
        "RunNotFound",
        "RunOutcome",
        "ScheduleClient",
        "ScheduleFire",
        "ScheduleInfo",
        "ScheduleSpec",
        "ServerUnavailable",
        "SignalTimeout",
        "SiteClient",
        "StepError",
        "StepInfo",
        "StepTimeout",
        "Worker",
        "Workflow",
        "WorkflowContext",
        "events",
        "workflow",
    ]
    for name in natflow.__all__:
        assert getattr(natflow, name) is not None
    assert issubclass(natflow.ServerUnavailable, natflow.NatflowError)
    assert issubclass(natflow.PermissionDenied, natflow.NatflowError)


def test_event_types_are_public() -> None:
    assert "StepCompleted" in natflow.events.__all__
    for name in natflow.events.__all__:
        assert getattr(natflow.events, name) is getattr(natflow_engine.events, name)
    # Every kind history() and watch() yield (the continuation's and children's were left
    # out: a user could not isinstance-check them without natflow_engine).
    kinds = {t.__name__ for t in typing.get_args(natflow_engine.events.Event)}
    assert kinds <= set(natflow.events.__all__), kinds - set(natflow.events.__all__)


def test_every_engine_export_exists() -> None:
    missing = [n for n in natflow_engine.__all__ if not hasattr(natflow_engine, n)]
    assert missing == []


def test_the_engine_never_imports_the_sdk() -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path, line, module in imports(ENGINE)
        if module == "natflow" or module.startswith("natflow.")
    ]
    assert wrong == []


def test_the_sdk_uses_only_the_engines_face() -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path, line, module in imports(SDK)
        if module.startswith("natflow_engine")
        and module not in ("natflow_engine", "natflow_engine.events")
    ]
    assert wrong == []


def test_no_generic_top_level_names_are_packaged() -> None:
    assert not (ROOT / "engine" / "__init__.py").exists()
    assert not (ROOT / "sdk" / "__init__.py").exists()
