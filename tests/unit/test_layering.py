"""House rules that keep the layers apart (STYLE.md §1-2): every collective and every DeepSpeed
import lives under moe_dist/distributed/, and the single-device model code reads no environment
and parses no command line."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "moe_dist"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _files(*parts: str):
    return sorted((PACKAGE.joinpath(*parts)).rglob("*.py"))


def test_distributed_and_deepspeed_imports_stay_in_distributed():
    offenders = []
    for path in _files():
        if "distributed" in path.relative_to(PACKAGE).parts[:1]:
            continue
        for name in _imports(path):
            if name == "deepspeed" or name.startswith(("deepspeed.", "torch.distributed")):
                offenders.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not offenders, offenders


def test_model_code_reads_no_environment_and_no_command_line():
    offenders = []
    for path in _files("moe") + _files("models"):
        text = path.read_text()
        if "os.environ" in text or "argparse" in _imports(path):
            offenders.append(str(path.relative_to(PACKAGE)))
    assert not offenders, offenders


def test_models_and_moe_do_not_import_the_trainer():
    offenders = [f"{path.relative_to(PACKAGE)} imports {name}"
                 for path in _files("moe") + _files("models")
                 for name in _imports(path) if name.startswith(("moe_dist.train", "moe_dist.distributed"))]
    assert not offenders, offenders
