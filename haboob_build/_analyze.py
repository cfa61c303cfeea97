"""Run by the TARGET interpreter (the image's python3.11, -I -S), in two
fresh processes; each prints one Python literal on stdout.

    _analyze.py static APPDIR ENTRY...   which modules the image needs
    _analyze.py import APPDIR NAME...    import them; what got loaded

Stage 1 (static): every `import` of every appliance module is read from its
syntax tree (function bodies too, so lazy imports count). The appliance
modules the image needs are those reachable from the entry modules (PID 1
and what it imports) over these imports, with their parent packages; the
others (the content compiler, the command lines: host-side tools) stay
out. The standard-library names the reachable modules import are the
roots of stage 2.

Stage 2 (import): a fresh interpreter imports the reachable appliance
modules and those stdlib names for real, and whatever is in sys.modules
then (the true closure, including what interpreter start-up itself loads,
and nothing this analysis needs for itself) is the set the image needs.
Following the standard library's own imports statically (modulefinder)
would drag in every optional import (readline, ssl, tkinter) that these
modules never execute here. Stage 2 uses nothing but `sys`.
"""
import sys


def static(appdir, entries):
    import ast
    import importlib.util
    import os
    stdlib = os.path.dirname(os.__file__)
    modules = {}                                      # name -> (path, is_pkg)
    for dirpath, dirnames, filenames in os.walk(os.path.join(appdir, "appliance")):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for f in sorted(filenames):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, appdir)[:-3].replace(os.sep, ".")
                is_pkg = rel.endswith(".__init__")
                modules[rel[:-len(".__init__")] if is_pkg else rel] = (path, is_pkg)

    def imported(name):
        path, is_pkg = modules[name]
        tree = ast.parse(open(path, "rb").read(), path)
        pkg = name if is_pkg else name.rpartition(".")[0]
        out = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[:len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)   # may be submodules
        return out

    def app_module(name):
        """The appliance module a dotted name refers to (longest prefix), or None."""
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in modules:
                return ".".join(parts[:i])
        return None

    reach, todo, wanted, missing = set(), list(entries), set(), []
    while todo:
        name = todo.pop()
        mod = app_module(name)
        if mod is None:
            missing.append(name)
            continue
        if mod in reach:
            continue
        reach.add(mod)
        parts = mod.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]        # parent packages
        for n in imported(mod):
            top = n.split(".")[0]
            if top == "appliance":
                if app_module(n):
                    todo.append(n)
                continue
            if top in sys.builtin_module_names:
                continue
            try:
                spec = importlib.util.find_spec(top)
            except (ImportError, ValueError):
                spec = None
            if spec and spec.origin and spec.origin.startswith(stdlib + os.sep):
                wanted.add(n)
    return {"appliance": sorted(reach), "files": sorted(os.path.relpath(modules[m][0], appdir) for m in reach),
            "left_out": sorted(set(modules) - reach), "stdlib_roots": sorted(wanted),
            "missing_entries": sorted(set(missing) & set(entries))}


def imports(appdir, names):
    sys.path.insert(0, appdir)
    errors = {}
    for name in names:
        try:
            __import__(name)
        except ImportError as e:
            errors[name] = f"{type(e).__name__}: {e}"     # also "from json import dumps": not a module
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"
    files = sorted({m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)})
    stdlib = sys.modules["os"].__file__.rpartition("/")[0]      # os is loaded at start-up
    return {"files": files, "errors": errors, "version": sys.version.split()[0], "stdlib": stdlib}


if __name__ == "__main__":
    stage, appdir, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    print(repr(static(appdir, rest) if stage == "static" else imports(appdir, rest)))
