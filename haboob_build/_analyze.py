"""Run by the TARGET interpreter (the image's python3.11, -I -S): find the
standard-library modules the appliance needs. Prints one JSON object.

argv: APPDIR (the folder holding the `appliance` package), then the
modules PID 1 imports at run time (e.g. appliance.init appliance.stack.serve).

How: every `import` statement of every appliance module is read from its
syntax tree (function bodies too, so lazy imports count); each standard
library module named there is then imported for real, and whatever lands
in sys.modules (the true closure, including what interpreter start-up
loads) is the set the image needs. Following the standard library's own
imports statically (modulefinder) would drag in every optional import
(readline, ssl, tkinter) that these modules never execute here.

An appliance module whose import fails here (it needs click or jinja2 at
module level: a host-side tool) is reported as host-only and left out.
"""
import ast
import importlib
import importlib.util
import json
import os
import sys


def imported_names(path, modname, is_pkg):
    tree = ast.parse(open(path, "rb").read(), path)
    names = set()
    pkg = modname if is_pkg else modname.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)   # may be submodules
    return names


def main():
    appdir, entries = sys.argv[1], sys.argv[2:]
    sys.path.insert(0, appdir)
    stdlib = os.path.dirname(os.__file__)
    app_modules = {}
    for dirpath, dirnames, filenames in os.walk(os.path.join(appdir, "appliance")):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for f in sorted(filenames):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, appdir)[:-3].replace(os.sep, ".")
                is_pkg = rel.endswith(".__init__")
                app_modules[rel[:-len(".__init__")] if is_pkg else rel] = (path, is_pkg)

    wanted = set()
    for mod, (path, is_pkg) in app_modules.items():
        for name in imported_names(path, mod, is_pkg):
            top = name.split(".")[0]
            if top == "appliance" or top in sys.builtin_module_names:
                continue
            try:
                spec = importlib.util.find_spec(top)
            except (ImportError, ValueError):
                spec = None
            if spec and spec.origin and spec.origin.startswith(stdlib + os.sep):
                wanted.add(name)

    host_only, errors, unresolved = {}, {}, []
    for mod in sorted(app_modules):
        try:
            importlib.import_module(mod)
        except Exception as e:
            host_only[mod] = f"{type(e).__name__}: {e}"
    for name in sorted(wanted):
        try:
            importlib.import_module(name)
        except ImportError:
            unresolved.append(name)          # "from x import function", not a submodule
    for mod in entries:
        if mod not in sys.modules:
            errors[mod] = "no such module" if mod not in app_modules else host_only.get(mod, "")

    files = {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())}
    stdlib_files = sorted({os.path.relpath(f, stdlib) for f in files.values()
                           if f and os.path.abspath(f).startswith(stdlib + os.sep)})
    app_files = sorted(os.path.relpath(p, appdir) for m, (p, _) in app_modules.items() if m not in host_only)
    print(json.dumps({
        "version": sys.version.split()[0],
        "magic": importlib.util.MAGIC_NUMBER.hex(),
        "stdlib": stdlib_files,
        "appliance": app_files,
        "host_only": host_only,
        "entry_errors": {k: v or "import failed" for k, v in errors.items()},
    }))


if __name__ == "__main__":
    main()
