"""Every config field the package reads is declared in base_config(), so any of them can be
set on the command line (`--config.judges.backend=remote`, `--config.data.builder=...`): the
reads are collected from the source (attribute chains and .get("key") on the run config, its
sections and their conventional aliases) and each is looked up in base_config()."""
import ast
import os
import subprocess
import sys

import ml_collections
import pytest

from balcap_jax.config import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "balcap_jax")

# The modules that take the run config (elsewhere `cfg` is a model's or a processor's own).
RUN_CONFIG_FILES = {"main.py", "build.py", "config.py", "train.py", "sft.py", "shapes_demo.py",
                    "rewards/base.py", "rewards/balcap.py", "data/config.py"}
# Names bound to the whole run config, and parameters that by convention hold one section.
ROOT_NAMES = {"cfg", "config"}
PARAM_SECTIONS = {"tc": "train", "sc": "sft", "rl": "rl"}
# files where `cfg` is one section (the data module's functions take the data block)
FILE_SECTIONS = {"data/config.py": "data"}
# free-form blocks whose keys are another API's arguments (processor kwargs, a HF config dict,
# sharding rule overrides): their contents are not config fields
FREE_FORM = {("model", "hf_config"), ("data", "image_processor"), ("mesh", "rules")}
METHODS = {"get", "items", "keys", "values", "to_dict", "lock", "unlock", "ignore_type",
           "update", "copy_and_resolve_references", "unlocked", "to_json"}


def _chain(node):
    """(root name, [attr, ...]) of a Name/Attribute/.get("k") chain, or None."""
    parts = []
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "get" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            parts.append(node.args[0].value)
            node = node.func.value
        else:
            break
    if isinstance(node, ast.Name):
        return node.id, parts[::-1]
    return None


class _Reads(ast.NodeVisitor):
    def __init__(self, rel):
        self.rel, self.reads, self.scopes = rel, [], [{}]
        section = FILE_SECTIONS.get(rel)
        for name in ROOT_NAMES:
            self.scopes[0][name] = [section] if section else []
        self.scopes[0].update({k: [v] for k, v in PARAM_SECTIONS.items()})

    def _lookup(self, name):
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        return None

    def _resolve(self, node):
        """Config path a node denotes ([] = the whole config), or None."""
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id == "self" and node.attr == "cfg":
            return []
        got = _chain(node)
        if got is None:
            if isinstance(node, ast.Attribute):   # self.cfg.x.y
                inner = self._resolve(node.value)
                return None if inner is None else inner + [node.attr]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == "get" and node.args and \
                    isinstance(node.args[0], ast.Constant):
                inner = self._resolve(node.func.value)
                return None if inner is None else inner + [node.args[0].value]
            return None
        name, parts = got
        base = self._lookup(name)
        return None if base is None else base + parts

    def visit_FunctionDef(self, node):
        self.scopes.append({})
        self.generic_visit(node)
        self.scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Assign(self, node):
        self.generic_visit(node)
        targets, values = node.targets[0], node.value
        pairs = (zip(targets.elts, values.elts)
                 if isinstance(targets, ast.Tuple) and isinstance(values, ast.Tuple)
                 else [(t, values) for t in node.targets])
        for t, v in pairs:
            if isinstance(t, ast.Name):
                path = self._resolve(v)
                if path is not None and path:
                    self.scopes[-1][t.id] = path
                elif t.id in ROOT_NAMES or t.id in PARAM_SECTIONS:
                    self.scopes[-1][t.id] = None if path is None else path

    def _note(self, node):
        path = self._resolve(node)
        if path:
            self.reads.append((tuple(path), f"{self.rel}:{node.lineno}"))

    def visit_Attribute(self, node):
        self._note(node)
        self.generic_visit(node)

    def visit_Call(self, node):
        if isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            self._note(node)
        self.generic_visit(node)


def _declared(path) -> bool:
    node = base_config()
    for i, key in enumerate(path):
        if key in METHODS:
            return True
        if tuple(path[:i]) in FREE_FORM:
            return True
        if not isinstance(node, ml_collections.ConfigDict):
            return True           # a leaf value's own attributes (list.index, str.split...)
        if key not in node:
            return False
        node = node[key]
    return True


def collect_reads():
    reads = []
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, PACKAGE)
                if rel not in RUN_CONFIG_FILES:
                    continue
                v = _Reads(rel)
                v.visit(ast.parse(open(path).read()))
                reads += v.reads
    return reads


def test_every_config_read_is_declared_in_base_config():
    reads = collect_reads()
    assert len({p for p, _ in reads}) > 80         # the collector sees the package's reads
    missing = sorted({(".".join(p), where) for p, where in reads if not _declared(p)})
    assert not missing, "read but not declared in base_config(): " + ", ".join(
        f"{p} ({w})" for p, w in missing)


def test_the_collector_finds_an_undeclared_read(tmp_path):
    """The check can fail: a read of an undeclared field, through an alias, is reported."""
    v = _Reads("x.py")
    v.visit(ast.parse("def f(cfg):\n    d = cfg.data\n    return d.get('no_such', 1)\n"))
    assert [p for p, _ in v.reads if not _declared(p)] == [("data", "no_such")]


@pytest.mark.parametrize("argv", [
    ["--config=configs/qwen.py:3b", "--config.judges.backend=remote",
     "--config.judges.base_url=http://127.0.0.1:1/v1", "--config.judges.model=judge"],
    ["--config=configs/tiny.py", "--config.data.builder=coco", "--config.mesh.fsdp=1"],
])
def test_declared_fields_can_be_set_on_the_command_line(argv):
    out = subprocess.run([sys.executable, "-m", "balcap_jax.main", *argv, "--plan_only",
                          "--config.mesh.fsdp=1"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "GiB/device" in out.stdout
    if "remote" in " ".join(argv):
        assert "judge weights" not in out.stdout
