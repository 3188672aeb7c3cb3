"""Imports point one way (DESIGN.md, Layers): a module never imports a higher layer, a stage
never imports a sibling stage, and tasks/tune never imports tasks/stages. Imports inside
functions and under TYPE_CHECKING count too: hiding an edge does not remove it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CORE, FORMATS, RUNTIMES, TUNE, STAGES, DRIVER, DODO = range(7)
NAMES = ["core", "formats", "runtimes/quant", "tune", "stages", "recipe/graph/runner", "dodo"]
# The top of the package: read recipes, build graphs, drive doit. envrun is the entry point of
# a stage's own environment: it imports the stage module it is asked to run, by name.
DRIVERS = {
    "recipe",
    "graph",
    "runner",
    "report",
    "glue",
    "docgen",
    "envrun",
    "runs",
    "release",
    "history",
    "runpage",
    "graphpic",
    "rayrun",
}
# Modules that stages/quantize/* may share: not stages themselves.
SHARED_QUANTIZE = {"hf_common", "onnx_common", "onnx_calibration", "inc_common", "windows"}


def layer_of(module: str) -> int:
    parts = module.split(".")
    if module == "dodo":
        return DODO
    assert parts[0] == "tasks", module
    sub = parts[1] if len(parts) > 1 else ""
    if sub == "formats":
        return FORMATS
    if sub in ("runtimes", "quant"):
        return RUNTIMES
    if sub == "tune":
        return TUNE
    if sub == "stages":
        return STAGES
    if sub in DRIVERS:
        return DRIVER
    return CORE  # errors, config, keys, digest, staging, store, envs, fetch, ...


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The tasks.* modules an import statement names; `from tasks.stages import capture`
    names tasks.stages.capture when that is a module."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "tasks"]
    if node.level:  # relative imports are not used here; resolve them anyway
        base = module.split(".")[: -node.level] + ([node.module] if node.module else [])
        target = ".".join(base)
    else:
        target = node.module or ""
    if target.split(".")[0] != "tasks":
        return []
    found = [target]
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        if (ROOT / Path(*sub.split("."))).with_suffix(".py").is_file() or (
            ROOT / Path(*sub.split(".")) / "__init__.py"
        ).is_file():
            found.append(sub)
    return found


def stage_unit(module: str) -> str | None:
    """The stage module (or package) a tasks.stages module belongs to; None for the contract
    (tasks.stages itself) and the modules the quantizers share."""
    parts = module.split(".")
    if parts[:2] != ["tasks", "stages"] or len(parts) == 2:
        return None
    if parts[2] == "quantize":
        if len(parts) == 3 or parts[3] in SHARED_QUANTIZE:
            return None
        return ".".join(parts[:4])
    return ".".join(parts[:3])


def violations() -> list[str]:
    files = sorted((ROOT / "tasks").rglob("*.py")) + [ROOT / "dodo.py"]
    found = []
    for path in files:
        module = module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}"
            for target in imported(node, module):
                mine, theirs = layer_of(module), layer_of(target)
                if theirs > mine:
                    found.append(f"{where}  ({NAMES[mine]} imports {NAMES[theirs]}: {target})")
                elif mine == TUNE and target.startswith("tasks.stages"):
                    found.append(f"{where}  (tasks/tune imports tasks/stages)")
                elif (
                    mine == STAGES
                    and stage_unit(target) is not None
                    and stage_unit(target) != stage_unit(module)
                ):
                    found.append(
                        f"{where}  (a stage imports a sibling stage: {target}; "
                        "move what they share below tasks/stages)"
                    )
    return found


def test_imports_point_down() -> None:
    found = violations()
    assert not found, "imports that point up or sideways:\n  " + "\n  ".join(found)


def test_the_registry_imports_no_stage_at_top_level() -> None:
    tree = ast.parse((ROOT / "tasks/stages/__init__.py").read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    assert not [n for n in top for t in imported(n, "tasks.stages") if t.startswith("tasks.stages")]


def test_every_module_has_a_layer() -> None:
    # The stage modules the registry names are stages; the layer map must see them as such.
    from tasks.stages import REGISTRY

    for modules in REGISTRY.values():
        for name in modules.values():
            assert layer_of(name) == STAGES and stage_unit(name) == name


def test_a_stage_environment_imports_only_what_it_has():
    """tasks.envrun runs inside a stage's own environment (tasks/envs.py: inc, modelopt), which
    holds the stage's libraries but not the driver's: importing what it imports must not pull
    in doit, xxhash, matplotlib, fsspec or ray (an import of tasks.jobs from tasks.slots once
    broke every environment stage)."""
    import subprocess
    import sys

    stages = [p.stem for p in (ROOT / "tasks" / "stages" / "quantize").glob("*.py")
              if "quantize_in_env" in p.read_text()]  # fmt: skip
    assert stages, "no stage runs in an environment of its own"
    probe = f"""
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("doit", "xxhash", "matplotlib", "fsspec", "ray"):
            raise ImportError(f"{{name}} is not in a stage environment")
sys.meta_path.insert(0, Refuse())
import tasks.envrun, tasks.config, tasks.errors, tasks.stages
for stage in {stages!r}:
    importlib.import_module("tasks.stages.quantize." + stage)
"""
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_run_loads_nothing_only_a_build_needs():
    """Every `doit` loads dodo.py and the recipe's stage modules, a no-op run too (bench/noop.py
    times it at about a quarter of a second, most of it Python's and doit's own start): the
    runner, Ray, the report page and the libraries a step builds with are imported by the step
    that needs them, and so are the standard modules only one step or error message uses."""
    import subprocess
    import sys

    probe = """
import atexit, runpy, sys
atexit.register(lambda: print(" ".join(sys.modules)))
sys.argv = ["doit", "-f", "dodo.py", "list"]
runpy.run_module("doit", run_name="__main__")
"""
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = set(proc.stdout.split("\n")[-2].split())
    assert "tasks.stages.quantize.awq" in loaded  # the default recipe's steps were loaded
    heavy = {"torch", "numpy", "onnx", "onnxruntime", "transformers", "fsspec", "s3fs", "ray",
             "matplotlib", "tasks.runner", "tasks.rayrun", "tasks.runpage", "tasks.history",
             "tasks.pipconfig", "statistics", "html", "tarfile", "difflib", "platform",
             "ctypes", "multiprocessing.queues", "xxhash"}  # fmt: skip
    assert not heavy & loaded, sorted(heavy & loaded)
