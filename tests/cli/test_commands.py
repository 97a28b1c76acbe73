"""The command modules: every console script's entry point, flags and ``--help``; and the layout that keeps engines
and command lines apart (argparse only in ``nnunet_ssl/cli``, no import circle among the tools, nnU-Net's private
internals only in ``nnunet_ssl/compat``)."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "nnunet_ssl"
PYPROJECT = PACKAGE.parent / "pyproject.toml"

#: every command's flags, in order, as they were before the command lines moved to nnunet_ssl/cli
FLAGS = {
    "nnUNetv2_ssl_benchmark": ["-d", "-c", "-f", "-p", "-o", "-tr", "--budgets", "--seeds", "--full", "--epochs",
                               "--iterations-per-epoch", "--val-iterations", "--test-images", "--test-labels",
                               "--test-cases", "--nsd-tolerance", "--groups", "-device", "--no-file-check",
                               "--records", "--offline-rounds", "--dry-run", "--report-only"],
    "nnUNetv2_ssl_cpu_plans": ["-d", "-p", "--name", "-c", "--batch-size", "--base-features", "--max-features",
                               "--overwrite"],
    "nnUNetv2_ssl_demo": ["--raw", "--workdir", "--num-labeled", "--epochs", "--iterations", "--seed", "--keep"],
    "nnUNetv2_ssl_evaluate": ["reference_folder", "prediction_folder", "-o/--output-folder", "-dj/--dataset-json",
                              "--nsd-tolerance", "--voxel-units", "--case-ids", "-np/--num-processes"],
    "nnUNetv2_ssl_make_splits": ["-d", "--num-labeled", "--fraction", "--seed", "--groups", "--restore",
                                 "--sparse-slices", "-t", "--sparse-axis", "--overwrite"],
    "nnUNetv2_ssl_predict_uncertainty": ["-i", "-o", "-d", "-c", "-tr", "-p", "-f", "-chk", "-step_size",
                                         "--disable_tta", "-device", "-npp"],
    "nnUNetv2_ssl_preprocess_unlabeled": ["-d", "-c", "-p", "-np", "--part-id", "--num-parts"],
    "nnUNetv2_ssl_pseudolabel": ["-d", "-t", "--name", "-o", "-m/--models", "-tr", "-p", "-c", "-f", "-chk",
                                 "--split-fold", "--unlabeled-folder", "--no-images-unlabeled", "--min-agreement",
                                 "--min-stability", "--min-confidence", "--max-uncertainty", "--min-quality",
                                 "--max-ignored", "--top-k", "--top-fraction", "--rank-by", "--quality-predictor",
                                 "--ignore-below", "--ignore-disagreement", "-device", "--part-id", "--num-parts",
                                 "-npp", "-step_size", "--disable_tta", "--no-probabilities", "--link-images",
                                 "--overwrite", "--rounds", "--student-trainer", "--student-fold", "--student-init"],
    "nnUNetv2_ssl_sweep": ["-b", "--budget", "--seed", "-tr", "--grid", "-o", "-device"],
    "nnUNetv2_ssl_throughput": ["-d", "-c", "-p", "-f", "-tr", "--iterations", "--warmup", "--rounds", "--at",
                                "-device", "-o", "--note"],
    "nnUNetv2_ssl_train_quality": ["-d", "-c", "-f", "-p", "--iterations", "--batch-size", "--lr",
                                   "--weak-checkpoints", "--weak-epochs", "--weak-iterations-per-epoch",
                                   "--weak-max-features", "--max-features", "--val-samples", "--seed", "-device",
                                   "--overwrite"],
}
REQUIRED = {"nnUNetv2_ssl_benchmark": {"-o"}, "nnUNetv2_ssl_cpu_plans": {"-d"}, "nnUNetv2_ssl_demo": set(),
            "nnUNetv2_ssl_evaluate": {"reference_folder", "prediction_folder", "-o/--output-folder"},
            "nnUNetv2_ssl_make_splits": {"-d"}, "nnUNetv2_ssl_predict_uncertainty": {"-i", "-o", "-d", "-c"},
            "nnUNetv2_ssl_preprocess_unlabeled": {"-d", "-c"}, "nnUNetv2_ssl_pseudolabel": {"-d", "-t", "-o"},
            "nnUNetv2_ssl_throughput": {"-d", "-c"}, "nnUNetv2_ssl_sweep": {"-b", "--budget", "-tr", "-o"},
            "nnUNetv2_ssl_train_quality": {"-d", "-c", "-f"}}
#: the tools: engines and their command lines
TOOLING = ("nnunet_ssl.evaluation", "nnunet_ssl.demo", "nnunet_ssl.uncertainty", "nnunet_ssl.quality",
           "nnunet_ssl.pseudolabel",
           "nnunet_ssl.cli", "nnunet_ssl.compat.tooling", "nnunet_ssl.data.splits",
           "nnunet_ssl.data.preprocess_unlabeled")
#: allowed imports from an engine into nnunet_ssl.cli (none)
ENGINE_TO_CLI: set[tuple[str, str]] = set()
#: private nnU-Net, batchgenerators and torch internals that only nnunet_ssl/compat may use
INTERNALS = ("_manage_input_and_output_lists", "_internal_get_data_iterator_from_lists_of_filenames",
             "nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size", "_orig_mod", "._finish(")


def _scripts() -> dict[str, str]:
    """pyproject's [project.scripts] table (tomllib is Python 3.11+; the package supports 3.10)."""
    table = PYPROJECT.read_text().split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^(\S+) = "([^"]+)"$', table, flags=re.M))


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("nnunet_ssl")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("nnunet_ssl"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules}


def _tooling(name: str) -> bool:
    return any(name == t or name.startswith(t + ".") for t in TOOLING)


# ---------------------------------------------------------------------------------------------- entry points
def test_every_console_script_keeps_its_name_and_points_at_its_command_module():
    scripts = _scripts()
    assert set(scripts) == {*FLAGS, "nnUNetv2_ssl_trainers"}
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert module.startswith("nnunet_ssl.cli.") and function == "main", (name, target)
        assert callable(importlib.import_module(module).main)
    # the installed wrappers were regenerated from this table
    installed = {e.name: e.value for e in entry_points(group="console_scripts") if e.name in scripts}
    assert installed == scripts


@pytest.mark.parametrize("prog", sorted(FLAGS))
def test_flags_and_help_are_unchanged(prog, capsys):
    module = importlib.import_module(_scripts()[prog].partition(":")[0])
    parser = module._parser()
    assert parser.prog == prog
    actions = [a for a in parser._actions if a.dest != "help"]
    assert ["/".join(a.option_strings) or a.dest for a in actions] == FLAGS[prog]
    assert {"/".join(a.option_strings) or a.dest for a in actions if a.required} == REQUIRED[prog]
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog} ")


def test_installed_console_scripts_print_help():
    bin_dir = Path(sys.executable).parent
    for name in sorted(_scripts()):
        proc = subprocess.run([str(bin_dir / name), "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {name}"), (name, proc.stderr[-2000:])


# ---------------------------------------------------------------------------------------------- layout
def test_argparse_only_in_the_command_modules():
    modules = _modules()
    users = sorted(name for name, path in modules.items()
                   if any(isinstance(n, ast.Import) and any(a.name == "argparse" for a in n.names)
                          for n in ast.walk(ast.parse(path.read_text()))))
    assert users and all(name.startswith("nnunet_ssl.cli.") for name in users), users


def test_engines_do_not_import_command_modules():
    modules = _modules()
    bad = [(name, target) for name, path in modules.items() if _tooling(name) and not name.startswith("nnunet_ssl.cli")
           for target in _imports(path, modules) if target.startswith("nnunet_ssl.cli")
           and ("*", target) not in ENGINE_TO_CLI and (name, target) not in ENGINE_TO_CLI]
    assert bad == []


def test_no_import_circle_among_the_tools():
    modules = _modules()
    graph = {name: {t for t in _imports(path, modules) if _tooling(t) and (name, t) not in ENGINE_TO_CLI}
             for name, path in modules.items() if _tooling(name)}
    assert "nnunet_ssl.evaluation.report" in graph["nnunet_ssl.evaluation.benchmark"]  # the graph sees lazy imports
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import circle: " + " -> ".join([*path[path.index(node):], node]))
        if node in done:
            return
        for target in sorted(graph.get(node, ())):
            visit(target, [*path, node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])


def test_nnunet_internals_are_used_only_in_compat():
    hits = [(name, word) for name, path in _modules().items() if not name.startswith("nnunet_ssl.compat")
            for word in INTERNALS if word in path.read_text()]
    assert hits == []


def test_report_and_benchmark_import_in_either_order():
    for first, second in (("report", "benchmark"), ("benchmark", "report")):
        code = f"import nnunet_ssl.evaluation.{first}, nnunet_ssl.evaluation.{second}"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
