"""dvc.yaml tells the truth: each stage depends on exactly the project code it runs, on every
params.yaml key that code reads, and on every input path its command names.

DVC skips a stage whose declared inputs did not change, so a missing dependency silently keeps a
stale output. The code is read, not run: imports are followed transitively (lazy imports inside
functions included) from the stage's module, and a params key counts as read where the code
takes an attribute of a typed config section (``params.train.batch``, ``cfg.batch`` for
``cfg: TrainConfig``, ``self.cfg.batch`` for a dataclass field ``cfg: TrainConfig``).
"""

from __future__ import annotations

import ast
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from bit_core.config import Params

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bit_core", "tasks", "flows")
# The params schema (DVC tracks the values it validates) and the entry plumbing every stage
# shares: changes there do not change what a stage computes.
EXEMPT = {"bit_core/config.py", "bit_core/errors.py", "bit_core/redact.py", "tasks/common.py",
          "tasks/environment.py", "tasks/__init__.py"}
SECTIONS = {field.annotation.__name__: name for name, field in Params.model_fields.items()}
KEYS = {name: set(field.annotation.model_fields) for name, field in Params.model_fields.items()}
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _module_file(dotted: str) -> str | None:
    """Repo-relative path of a project module or package, or None for other modules."""
    if dotted.split(".")[0] not in PACKAGES:
        return None
    base = REPO / Path(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return str(candidate.relative_to(REPO))
    return None


@cache
def _tree(path: str) -> ast.Module:
    return ast.parse((REPO / path).read_text(), filename=path)


def _imports(path: str) -> set[str]:
    """Project files that `path` imports anywhere in its body (TYPE_CHECKING blocks excluded)."""
    found = set()
    skip = {id(node) for block in ast.walk(_tree(path)) if isinstance(block, ast.If)
            and ast.unparse(block.test) == "TYPE_CHECKING" for node in ast.walk(block)}
    for node in ast.walk(_tree(path)):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {_module_file(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from pkg import sub` names a submodule; other names come from the module itself.
            for alias in node.names:
                found.add(_module_file(f"{node.module}.{alias.name}") or _module_file(node.module))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and node.value.endswith(".py"):  # code shipped as a file, e.g. with a model
            beside = Path(path).parent / node.value
            found.add(str(beside) if (REPO / beside).is_file() else None)
    return {path for path in found if path}


def closure(start: str) -> set[str]:
    """`start` and every project file it imports, transitively; exempt files end the walk."""
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if path not in EXEMPT:
            todo += _imports(path)
    return seen - EXEMPT


class _ParamReads(ast.NodeVisitor):
    """(section, key) pairs read from typed config sections in one module."""

    def __init__(self, tree: ast.Module):
        self.reads: set[tuple[str, str]] = set()
        self.fields = {node.target.id: SECTIONS[ast.unparse(node.annotation)]
                       for cls in ast.walk(tree) if isinstance(cls, ast.ClassDef)
                       for node in cls.body if isinstance(node, ast.AnnAssign)
                       and isinstance(node.target, ast.Name)
                       and ast.unparse(node.annotation) in SECTIONS}
        self.visit(tree)

    def visit_FunctionDef(self, func: ast.FunctionDef) -> None:
        bound = {arg.arg: SECTIONS[ast.unparse(arg.annotation)]
                 for arg in func.args.args + func.args.kwonlyargs
                 if arg.annotation is not None and ast.unparse(arg.annotation) in SECTIONS}
        for node in ast.walk(func):  # cfg = params.train
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                section = self._section(node.value, bound)
                if section and isinstance(node.targets[0], ast.Name):
                    bound[node.targets[0].id] = section
        for node in ast.walk(func):
            if isinstance(node, ast.Attribute):
                section = self._section(node.value, bound)
                if section and node.attr in KEYS[section]:  # not model_dump() and the like
                    self.reads.add((section, node.attr))

    visit_AsyncFunctionDef = visit_FunctionDef

    def _section(self, node: ast.AST, bound: dict[str, str]) -> str | None:
        """The section `node` evaluates to: a bound name, params.<section>, self.<field>."""
        if isinstance(node, ast.Name):
            return bound.get(node.id)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id in ("params", "self.params") and node.attr in SECTIONS.values():
                return node.attr
            if node.value.id == "self":
                return self.fields.get(node.attr)
        return None


def params_read(files: set[str]) -> set[tuple[str, str]]:
    return set().union(*(_ParamReads(_tree(path)).reads for path in files))


def _declared(stage: dict) -> tuple[set[str], set[str]]:
    """(code files and directories, other paths) a stage declares as deps."""
    deps = set(stage.get("deps", []))
    code = {d for d in deps if d.endswith(".py") or d.split("/")[0] in PACKAGES}
    return code, deps - code


def _outputs(stage: dict) -> set[str]:
    return {next(iter(entry)) if isinstance(entry, dict) else entry
            for kind in ("outs", "metrics", "plots") for entry in stage.get(kind, [])}


def _covered(path: str, declared: set[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in declared)


def _module_of(stage: dict) -> str:
    argv = stage["cmd"].split()
    assert argv[:2] == ["python", "-m"], "stages run `python -m tasks.<stage>`"
    return _module_file(argv[2])


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_depends_on_exactly_the_code_it_runs(name):
    stage = STAGES[name]
    code, _ = _declared(stage)
    runs = closure(_module_of(stage))
    assert sorted(runs - code) == [], f"{name}: imported but not in deps"
    assert sorted(code - runs) == [], f"{name}: in deps but not imported"


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_declares_every_param_it_reads(name):
    stage = STAGES[name]
    declared = set(stage.get("params", []))
    reads = params_read(closure(_module_of(stage)))
    missing = sorted(f"{s}.{k}" for s, k in reads if s not in declared and f"{s}.{k}" not in declared)
    assert missing == [], f"{name}: reads params not declared in dvc.yaml"


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_depends_on_every_input_its_command_names(name):
    stage = STAGES[name]
    _, data = _declared(stage)
    outputs = _outputs(stage)
    argv = stage["cmd"].split()
    paths = [arg for flag, arg in zip(argv, argv[1:]) if flag.startswith("--")
             and flag != "--resume-dir"  # the stage's own state, deliberately undeclared
             and not arg.startswith("--") and "/" in arg]
    inputs = [p for p in paths if not _covered(p, outputs)  # an output, or a folder of them
              and not any(_covered(out, {p}) for out in outputs)]
    assert [p for p in inputs if not _covered(p, data)] == [], f"{name}: input not in deps"


def test_the_analysis_sees_lazy_imports_and_typed_reads(tmp_path):
    """The checks above can fail: a lazy import and a typed read are found."""
    assert "bit_core/download.py" in closure("bit_core/weights.py")  # imported inside a function
    assert ("train", "batch") in params_read({"bit_core/train.py"})  # self.cfg.batch
    assert ("data", "md5") in params_read({"tasks/fetch_data.py"})  # cfg: DataConfig


def test_the_result_files_the_cli_and_flow_show_are_declared_outputs():
    from flows import dag

    declared = dag.outputs(REPO)
    for path in (dag.EVAL_TABLE, dag.EVAL_METRICS, dag.TRAIN_METRICS, dag.RUN_RECORD, *dag.RESULTS):
        assert any(path == out or path.startswith(out + "/") for out in declared), path
    assert dag.stages(REPO) == list(STAGES)


def test_every_stage_can_be_restored_from_the_run_cache():
    """No `persist` output (DVC keeps such a stage out of its run cache, so a shared run would
    train again what another run trained with the same inputs). The fine-tune's resume folder
    is its command's --resume-dir instead: no output, ignored by git."""
    from flows import dag

    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        for entry in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            options = next(iter(entry.values())) if isinstance(entry, dict) else {}
            assert not (options or {}).get("persist"), f"{name}: {entry}"
    assert dag.resume_folders(REPO, "finetune") == ["models/resume"]
    assert "models/resume" not in dag.outputs(REPO)
    ignored = subprocess.run(["git", "check-ignore", "-q", "models/resume/checkpoint.pt"],
                             cwd=REPO)
    assert ignored.returncode == 0


def test_a_stage_needs_the_stages_whose_outputs_it_reads():
    """What `bit run --until <stage>` brings up to date (and so which changing sources it reads
    again): the stage and, through dependencies on outputs, every stage before it."""
    from flows import dag

    assert dag.needs(REPO, "fetch_weights") == {"fetch_weights"}
    assert dag.needs(REPO, "prepare") == {"fetch_data", "prepare"}
    assert dag.needs(REPO, "finetune") == {"fetch_data", "prepare", "fetch_weights", "finetune"}
    assert dag.needs(REPO, "register") == set(STAGES)
