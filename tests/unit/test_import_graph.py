"""The package's layering, read from its own imports (ast, module level and inside functions).

Layers, lowest first: config <- distributed <- moe, data, metrics <- models <- train <- the
command-line modules. A module imports only from its own layer or below, the import graph has no
circle, collectives, DeepSpeed and megatron-core are imported only where docs/design.md says, and
the single-device model code reads no environment and parses no command line.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "moe_dist"

# interop/ (moe-dist export) is a command like sweep and report: it reads checkpoints through
# train/ and maps weights through models/, and nothing imports it but cli.py.
LAYERS = {"config": 0, "distributed": 1, "moe": 2, "data": 2, "metrics": 2, "models": 3, "train": 4,
          "interop": 5}
TOP = 5  # cli.py, sweep.py, report.py, config_reference.py, interop/

TORCH_DISTRIBUTED_ALLOWED = ("distributed/", "moe/dispatch/all_to_all.py", "models/parallelize.py",
                             "models/tensor_parallel.py", "models/expert_parallel.py",
                             "models/arch_parallel.py", "models/fsdp.py")
DEEPSPEED_ALLOWED = ("train/engines/deepspeed.py", "train/engines/deepspeed_config.py",
                     "distributed/deepspeed_bridge.py")
MEGATRON_ALLOWED = ("data/megatron.py",)  # its IndexedDataset reads data.source=megatron:PATH_PREFIX


def module_name(path: Path) -> str:
    parts = ["moe_dist", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Every module an import statement names, at any depth (functions, TYPE_CHECKING blocks)."""
    names = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}  # 'from pkg import module'
    return names


def internal_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = {n for n in imported_names(path) if n in files and n != name}
        # a package's __init__ is not an edge of its own submodules (importing a.b runs a/__init__)
        graph[name] = {t for t in targets if not name.startswith(t + ".")}
    return graph


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], TOP) if len(parts) > 1 else TOP


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read_from_the_real_package():
    graph = internal_graph()
    assert len(graph) > 60
    assert "moe_dist.moe.dispatch.all_to_all" in graph["moe_dist.models.expert_parallel"]
    assert "moe_dist.moe.routing.top_k" in graph["moe_dist.moe.routing.factory"]


def test_no_import_circle():
    assert find_cycle(internal_graph()) is None, " -> ".join(find_cycle(internal_graph()) or [])


def test_no_import_runs_up_the_layers():
    upward = [f"{src} (layer {layer(src)}) imports {dst} (layer {layer(dst)})"
              for src, targets in internal_graph().items() for dst in targets if layer(dst) > layer(src)]
    assert not upward, upward


def test_checker_finds_a_circle_and_an_upward_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer("moe_dist.train.trainer") > layer("moe_dist.moe.layer") > layer("moe_dist.distributed.comms")


@pytest.mark.parametrize("prefix, allowed", [("torch.distributed", TORCH_DISTRIBUTED_ALLOWED),
                                             ("deepspeed", DEEPSPEED_ALLOWED),
                                             ("megatron", MEGATRON_ALLOWED)])
def test_collectives_and_deepspeed_are_imported_only_where_allowed(prefix, allowed):
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith(allowed):
            continue
        offenders += [f"{relative} imports {name}" for name in imported_names(path)
                      if name == prefix or name.startswith(prefix + ".")]
    assert not offenders, offenders


def test_model_code_reads_no_environment_and_no_command_line():
    offenders = []
    for path in [*PACKAGE.joinpath("moe").rglob("*.py"), *PACKAGE.joinpath("models").rglob("*.py")]:
        if "os.environ" in path.read_text() or "argparse" in imported_names(path):
            offenders.append(str(path.relative_to(PACKAGE)))
    assert not offenders, offenders
