"""Keep a torch that is already installed (scripts/install.sh's first step).

Usage: python scripts/keep_torch.py CONSTRAINTS OUT   (run with the venv's python, from the repo root)

Exit 0, after writing OUT, when the environment already has a torch inside pyproject.toml's range
(say a cluster's CUDA build): it is kept, so OUT is CONSTRAINTS without the torch pin and without
any pin that the kept torch's own requirements exclude (each torch build pins its triton and its
CUDA libraries, and some pin sympy): the constraints must not fight the torch that is there.
Exit 1, writing nothing, when there is no torch or one outside the range: install.sh then installs
the pinned torch and uses CONSTRAINTS as they are.
"""
import importlib.metadata as md
import sys

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
# pip is in every venv that install.sh makes; its vendored packaging saves an install step.
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name


def main(constraints: str, out: str) -> int:
    try:
        version = md.version("torch")
    except md.PackageNotFoundError:
        return 1
    with open("pyproject.toml", "rb") as f:
        deps = [Requirement(d) for d in tomllib.load(f)["project"]["dependencies"]]
    wanted = next(r.specifier for r in deps if canonicalize_name(r.name) == "torch")
    # prereleases=True: cluster images ship builds such as 2.8.0a0+5228986 (NGC containers).
    if not wanted.contains(version, prereleases=True):
        print(f"install: torch {version} is outside the project's range (torch{wanted}): "
              "installing the pinned torch", file=sys.stderr)
        return 1
    torch_needs = {}
    for r in map(Requirement, md.requires("torch") or []):
        if r.marker is None or r.marker.evaluate({"extra": ""}):
            torch_needs[canonicalize_name(r.name)] = r.specifier
    kept = []
    with open(constraints) as f:
        for line in f:
            text = line.split("#", 1)[0].strip()
            if text:
                pin = Requirement(text)
                name = canonicalize_name(pin.name)
                pinned = next(iter(pin.specifier)).version  # constraints are name==version
                if name == "torch":
                    continue
                if name in torch_needs and not torch_needs[name].contains(pinned, prereleases=True):
                    print(f"install: not applying the pin {text}: the installed torch "
                          f"{version} needs {pin.name}{torch_needs[name]}", file=sys.stderr)
                    continue
            kept.append(line)
    with open(out, "w") as f:
        f.writelines(kept)
    print(f"install: keeping the installed torch {version} (project range: torch{wanted})")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
