"""The import direction of the package, as rules (imports inside functions count too):

1. no cycles;
2. leaves import nothing from the package: rl/, the reward value types, padding, config,
   precision;
3. models/ and sampling never import rewards, data, train, shapes or build;
4. train/ never imports build, config, shapes or a concrete scorer (only rewards.types);
5. only build.py and the ShapesWorld demo (balcap_jax.shapes_demo) import shapes/;
6. only the entry points (main, run, the demo, caption, evaluate, prepare_references) import
   build.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "balcap_jax"


def _modules() -> dict[str, str]:
    """module name -> file path, for every module of the package."""
    out = {}
    base = os.path.join(ROOT, PACKAGE)
    for folder, _, files in os.walk(base):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = \
                    os.path.join(folder, f)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> package modules it imports (module level and inside functions)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith(PACKAGE)}
            elif isinstance(node, ast.ImportFrom):
                if node.level:   # relative: resolve against this module's package
                    parts = name.split(".")[: len(name.split(".")) - node.level + is_pkg]
                    src = ".".join(parts + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                if not src.startswith(PACKAGE):
                    continue
                for a in node.names:   # `from pkg import submodule` imports the submodule
                    deps.add(f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations(graph) -> list[str]:
    p = PACKAGE
    bad = [f"import cycle: {' <-> '.join(c)}" for c in _cycles(graph)]
    leaves = (f"{p}.rl", f"{p}.rewards.types", f"{p}.padding", f"{p}.config", f"{p}.precision")
    for mod, deps in sorted(graph.items()):
        def forbid(targets, why, allowed=(), mod=mod, deps=deps):
            for d in sorted(deps):
                if _under(d, *targets) and not _under(d, *allowed):
                    bad.append(f"{mod} imports {d}: {why}")
        if _under(mod, *leaves):
            forbid((p,), "a leaf imports nothing from the package", allowed=(mod,))
        if _under(mod, f"{p}.models", f"{p}.sampling"):
            forbid((f"{p}.rewards", f"{p}.data", f"{p}.train", f"{p}.shapes", f"{p}.build"),
                   "models and the sampler know nothing of rewards, data or training")
        if _under(mod, f"{p}.train"):
            forbid((f"{p}.build", f"{p}.config", f"{p}.shapes", f"{p}.rewards"),
                   "the trainer takes objects, not configs or concrete scorers",
                   allowed=(f"{p}.rewards.types",))
        if not _under(mod, f"{p}.shapes", f"{p}.build", f"{p}.shapes_demo"):
            forbid((f"{p}.shapes",), "only build.py and the demo import ShapesWorld")
        if not _under(mod, f"{p}.main", f"{p}.run", f"{p}.shapes_demo", f"{p}.build",
                      f"{p}.caption", f"{p}.evaluate", f"{p}.prepare_references"):
            forbid((f"{p}.build",), "only the entry points import build")
    return bad


def test_import_rules_hold():
    graph = import_graph()
    assert len(graph) > 40 and graph[f"{PACKAGE}.train.trainer"]   # the walk sees the package
    bad = _violations(graph)
    assert not bad, "\n".join(bad)


def test_the_rules_catch_a_cycle_and_a_wrong_arrow():
    graph = import_graph()
    graph[f"{PACKAGE}.rl.loss"] = graph[f"{PACKAGE}.rl.loss"] | {f"{PACKAGE}.train.trainer"}
    graph[f"{PACKAGE}.sampling"] = graph[f"{PACKAGE}.sampling"] | {f"{PACKAGE}.rewards.balcap"}
    bad = "\n".join(_violations(graph))
    assert "import cycle" in bad
    assert "balcap_jax.rl.loss imports balcap_jax.train.trainer" in bad
    assert "balcap_jax.sampling imports balcap_jax.rewards.balcap" in bad
