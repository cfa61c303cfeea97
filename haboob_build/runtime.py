"""The Python runtime of the image: Debian's python3.11 (libpython linked
in), exactly the standard-library modules and shared libraries the
appliance needs, and the appliance package, all stored compiled.

Theory of operation: the interpreter and stdlib come from Debian packages
(python3.11-minimal, libpython3.11-minimal, libpython3.11-stdlib) fetched
into the cache, not from the build host, so the image does not depend on
what the host happens to have installed. The module set is found by
analysis (_analyze.py, run by that very interpreter); the shared
libraries by reading DT_NEEDED of the interpreter and of every extension
module, resolved with ldd, and each library is then taken from the Debian
package that owns it (dpkg -S, fetched like the others); a host without
dpkg falls back to the host's file. Modules are compiled to .pyc by the
image's own interpreter, in one fresh process with PYTHONHASHSEED=0 (marshal
output depends on the compiling process's state), with
invalidation_mode=UNCHECKED_HASH (no mtimes), and stored sourceless, where
the .py would be. The `encodings` package goes in whole:
codecs are looked up by name at run time, which no analysis can see.
The analysis result is cached, keyed by the interpreter packages and the
appliance sources.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from . import debs, elf
from .context import Context
from .errors import BuildError

PY = "python3.11"
PACKAGES = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib"]
PREFIX = "/usr"
STDLIB = f"/usr/lib/{PY}"
APPDIR = "/haboob/lib"            # holds the `appliance` package inside the image
ENTRIES = ["appliance.init", "appliance.stack.serve", "appliance.content.store"]
LIBDIR = "/usr/lib/x86_64-linux-gnu"


def merged_root(ctx: Context) -> tuple[Path, dict[str, str]]:
    """The three packages merged into one cached tree; returns (root, {pkg: version})."""
    roots, versions = [], {}
    debs.resolve(ctx, PACKAGES)
    for pkg in PACKAGES:
        deb, root, ver = debs.fetch(ctx, pkg)
        roots.append(root)
        versions[pkg] = ver
        ctx.add_input(f"deb:{pkg}", deb)
    key = hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:16]
    merged = ctx.cache / "runtime" / key
    if not merged.is_dir():
        merged.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=merged.parent, prefix=".m-"))
        try:
            for r in roots:
                shutil.copytree(r, tmp, symlinks=True, dirs_exist_ok=True)
            tmp.rename(merged)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return merged, versions


def _app_source_key(appdir: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((appdir / "appliance").rglob("*.py")):
        h.update(str(p.relative_to(appdir)).encode() + b"\0" + p.read_bytes() + b"\0")
    h.update((Path(__file__).parent / "_analyze.py").read_bytes())
    return h.hexdigest()


def analyze(ctx: Context, merged: Path, versions: dict, appdir: Path) -> dict:
    """{"stdlib": files relative to the stdlib, "appliance": files relative to appdir,
    "left_out": appliance modules not needed, "entry_errors", "version"}; cached."""
    key = hashlib.sha256((json.dumps(versions, sort_keys=True) + _app_source_key(appdir)).encode()).hexdigest()[:20]
    cached = ctx.cache / "analysis" / f"{key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    ctx.log("analyzing the appliance's imports with the image's interpreter")
    py = merged / "usr/bin" / PY
    script = Path(__file__).parent / "_analyze.py"
    st = ast.literal_eval(ctx.run([py, "-I", "-S", "-B", script, "static", appdir, *ENTRIES],
                                  what="import analysis").stdout.decode())
    app_mods = st["appliance"]
    im = ast.literal_eval(ctx.run([py, "-I", "-S", "-B", script, "import", appdir, *app_mods, *st["stdlib_roots"]],
                                  what="import analysis").stdout.decode())
    stdlib = im["stdlib"]
    errors = {m: "no such module" for m in st["missing_entries"]}
    errors.update({m: e for m, e in im["errors"].items() if m in app_mods})
    result = {
        "version": im["version"],
        "stdlib": sorted(os.path.relpath(f, stdlib) for f in im["files"] if f.startswith(stdlib + "/")),
        "appliance": st["files"],
        "left_out": st["left_out"],
        "entry_errors": errors,
    }
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
    tmp.rename(cached)
    return result


def _ldd(ctx: Context, paths: list[Path]) -> dict[str, str]:
    """soname -> resolved host path, for every library the loader would map (one ldd call)."""
    out = ctx.run(["ldd", *paths], what="ldd").stdout.decode()
    libs = {}
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and "not found" in line:
            raise BuildError(f"{parts[0]}, needed by the image's Python, is not installed on the build host "
                             f"(libraries are located with the host's ldd): install the package that has it")
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            libs[parts[0]] = parts[2]
        elif parts and parts[0].startswith("/") and not line.endswith(":"):
            libs[os.path.basename(parts[0])] = parts[0]      # the dynamic loader itself
    return libs


def _variants(host_path: str) -> list[str]:
    """The names dpkg may know a file by on a merged-/usr system."""
    out = []
    for c in (host_path, os.path.realpath(host_path)):
        out += [c, c[4:] if c.startswith("/usr/") else "/usr" + c]
    return list(dict.fromkeys(out))


def _owners(ctx: Context, host_paths: list[str]) -> dict[str, str]:
    """host path -> owning package, from one dpkg -S call ({} without dpkg)."""
    cands = sorted({v for p in host_paths for v in _variants(p)})
    try:
        proc = subprocess.run(["dpkg", "-S", *cands], capture_output=True, text=True)
    except FileNotFoundError:
        return {}
    owner_of = {}
    for line in proc.stdout.splitlines():
        if ": " in line:
            pkg, path = line.split(": ", 1)
            owner_of[path.strip()] = pkg.split(",")[0].split(":")[0].strip()
    return {p: next((owner_of[v] for v in _variants(p) if v in owner_of), None) for p in host_paths}


def _from_package(root: Path, host_path: str) -> Path | None:
    for variant in _variants(host_path):
        p = root / variant.lstrip("/")
        if p.exists():
            return p.resolve()
    return None


def shared_libraries(ctx: Context, elves: list[Path]) -> dict[str, bytes]:
    """soname -> bytes, for the loader and every library the ELF files need."""
    dynamic = [e for e in elves if elf.needed(e.read_bytes(), str(e))]
    wanted = _ldd(ctx, dynamic) if dynamic else {}
    wanted.pop("linux-vdso.so.1", None)
    owners = _owners(ctx, sorted(wanted.values()))
    debs.resolve(ctx, [o for o in owners.values() if o])
    out = {}
    for soname, host_path in sorted(wanted.items()):
        pkg = owners.get(host_path)
        src = None
        if pkg:
            deb, root, _ver = debs.fetch(ctx, pkg)
            ctx.add_input(f"deb:{pkg}", deb)
            src = _from_package(root, host_path)
        if src is None:
            ctx.log(f"note: {soname} taken from the build host ({host_path})")
            src = Path(host_path)
        out[soname] = src.read_bytes()
    return out


# Run by the image's interpreter in a fresh process: marshal's output depends
# on the compiling process (reference counts decide which objects get
# back-references; the hash seed orders frozenset constants), so every build
# compiles in the same fresh state, with PYTHONHASHSEED=0.
_COMPILE = """
import json, py_compile, sys
for src, dfile, out in json.load(sys.stdin):
    py_compile.compile(src, cfile=out, dfile=dfile, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
"""


def compile_all(ctx: Context, py: Path, jobs: list[tuple[Path, str]]) -> list[bytes]:
    """[(source, name shown in tracebacks)] -> the .pyc bytes, compiled by py."""
    out_dir = Path(tempfile.mkdtemp(dir=ctx.scratch, prefix="pyc-"))
    spec = [[str(src), name, str(out_dir / f"{i}.pyc")] for i, (src, name) in enumerate(jobs)]
    ctx.run([py, "-S", "-B", "-c", _COMPILE], what="compiling Python modules", clean_env=True,
            env={"PYTHONHASHSEED": "0"}, input=json.dumps(spec).encode())
    return [Path(o).read_bytes() for _s, _n, o in spec]


def install(ctx: Context, appdir: Path) -> dict:
    """Add the interpreter, stdlib subset, libraries and appliance code to ctx.tree."""
    merged, versions = merged_root(ctx)
    result = analyze(ctx, merged, versions, appdir)
    for mod, err in result["entry_errors"].items():
        ctx.log(f"WARNING: {mod} is not importable in the image ({err}); PID 1 will report HABOOB-FATAL")
    if result["left_out"]:
        ctx.log(f"left out (not reachable from PID 1): {', '.join(result['left_out'])}")

    tree = ctx.tree
    stdlib = merged / STDLIB.lstrip("/")
    files = set(result["stdlib"])
    files |= {str(p.relative_to(stdlib)) for p in (stdlib / "encodings").glob("*.py")}
    files.add("os.py")                         # getpath's landmark for the prefix
    py = merged / "usr/bin" / PY
    elves = [py]
    tree.file(f"/usr/bin/{PY}", py.read_bytes(), 0o755, part="python")
    tree.dir(f"{STDLIB}/lib-dynload")          # getpath's landmark for exec_prefix
    jobs, dests = [], []                       # (source, shown name), (image path, part)
    for rel in sorted(files):
        src = stdlib / rel
        if rel.endswith(".py"):
            jobs.append((src, f"{STDLIB}/{rel}"))
            dests.append((f"{STDLIB}/{rel[:-3]}.pyc", "python"))
        elif rel.endswith(".so"):
            tree.file(f"{STDLIB}/{rel}", src.read_bytes(), 0o755, part="python")
            elves.append(src)
    for rel in result["appliance"]:
        jobs.append((appdir / rel, f"{APPDIR}/{rel}"))
        dests.append((f"{APPDIR}/{rel[:-3]}.pyc", "appliance"))
    for (path, part), data in zip(dests, compile_all(ctx, py, jobs)):
        tree.file(path, data, part=part)
    for soname, data in shared_libraries(ctx, elves).items():
        if soname.startswith("ld-linux"):
            tree.file(f"/usr/lib64/{soname}", data, 0o755, part="python")
        else:
            tree.file(f"{LIBDIR}/{soname}", data, 0o755, part="python")
    return {"version": result["version"], "packages": versions,
            "stdlib_modules": len(files), "appliance_modules": len(result["appliance"]),
            "left_out": result["left_out"], "entry_errors": result["entry_errors"]}
