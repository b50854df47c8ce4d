"""Generate Python gRPC stubs for every ``protos/**/*.proto`` into ``services/runtime/_gen/``.

Run as ``python -m services.runtime.codegen`` (the Makefile's ``protos`` target). protoc
writes imports relative to the proto root (``from inference import grpc_predict_v2_pb2``);
they are rewritten to absolute package imports so that
``from services.runtime._gen.inference import grpc_predict_v2_pb2`` works without touching
``sys.path``.

The generated descriptors go into a private descriptor pool (``_gen.POOL``), not protobuf's
default one: other OIP stubs with the same ``inference.*`` names (tritonclient, KServe)
register there, and two registrations of one symbol fail at import. Keeping ours apart lets
a process hold both, e.g. tests that call our server through ``tritonclient.grpc``. A stamp
holding a hash of the proto sources and the grpcio-tools version makes
repeated runs no-ops, and a file lock keeps concurrent processes (parallel tests) from
writing over each other.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import logging
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
GEN_DIR = Path(__file__).resolve().parent / "_gen"
GEN_PACKAGE = "services.runtime._gen"
_STAMP = ".stamp"


def _sources(proto_root: Path) -> list[Path]:
    return sorted(proto_root.rglob("*.proto"))


def _fingerprint(proto_root: Path, sources: list[Path]) -> str:
    from importlib.metadata import version

    digest = hashlib.sha256(f"grpcio-tools={version('grpcio-tools')}\n".encode())
    digest.update(Path(__file__).read_bytes())  # a change of this generator regenerates
    for path in sources:
        digest.update(str(path.relative_to(proto_root)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _fix_imports(out_dir: Path, packages: set[str], modules: set[str]) -> None:
    """Rewrite protoc's root-relative imports into absolute ``GEN_PACKAGE`` imports."""
    pkg_pattern = (
        re.compile(
            r"^from (" + "|".join(map(re.escape, sorted(packages))) + r")(\.[\w.]+)? import ", re.M
        )
        if packages
        else None
    )
    mod_pattern = (
        re.compile(r"^import (" + "|".join(map(re.escape, sorted(modules))) + r") as ", re.M)
        if modules
        else None
    )
    for path in out_dir.rglob("*.py*"):
        text = path.read_text()
        new = text
        if pkg_pattern is not None:
            new = pkg_pattern.sub(
                lambda m: f"from {GEN_PACKAGE}.{m.group(1)}{m.group(2) or ''} import ", new
            )
        if mod_pattern is not None:
            new = mod_pattern.sub(lambda m: f"from {GEN_PACKAGE} import {m.group(1)} as ", new)
        if new != text:
            path.write_text(new)


_POOL_INIT = '''"""Generated stubs (``python -m services.runtime.codegen``); do not edit."""

from google.protobuf import descriptor_pool

# Private pool: see services/runtime/codegen.py. Well-known types a proto may import are
# added up front because a private pool cannot fall back to the default one.
POOL = descriptor_pool.DescriptorPool()


def _add_well_known_types() -> None:
    from google.protobuf import (
        any_pb2,
        duration_pb2,
        empty_pb2,
        struct_pb2,
        timestamp_pb2,
        wrappers_pb2,
    )

    for module in (any_pb2, duration_pb2, empty_pb2, struct_pb2, timestamp_pb2, wrappers_pb2):
        POOL.AddSerializedFile(module.DESCRIPTOR.serialized_pb)


_add_well_known_types()
'''
_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("


def _use_private_pool(out_dir: Path) -> None:
    for path in out_dir.rglob("*_pb2.py"):
        text = path.read_text()
        if _DEFAULT_POOL not in text:
            raise RuntimeError(f"{path.name}: protoc output changed; cannot find {_DEFAULT_POOL!r}")
        text = text.replace(
            _DEFAULT_POOL, f"__import__('{GEN_PACKAGE}', fromlist=['POOL']).POOL.AddSerializedFile("
        )
        path.write_text(text)


def _generate(proto_root: Path, sources: list[Path], out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p) for p in sources],
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code} for {[str(p) for p in sources]}")
    rel = [p.relative_to(proto_root) for p in sources]
    packages = {r.parts[0] for r in rel if len(r.parts) > 1}
    modules = {f"{r.stem}_pb2" for r in rel if len(r.parts) == 1}
    modules |= {f"{r.stem}_pb2_grpc" for r in rel if len(r.parts) == 1}
    _fix_imports(out_dir, packages, modules)
    _use_private_pool(out_dir)
    for directory in [d for d in out_dir.rglob("*") if d.is_dir()]:
        (directory / "__init__.py").touch()
    (out_dir / "__init__.py").write_text(_POOL_INIT)


def ensure_generated(
    proto_root: Path = PROTO_ROOT, gen_dir: Path = GEN_DIR, *, force: bool = False
) -> bool:
    """Generate stubs unless the stamp shows they are current; returns True when it generated.

    Raises FileNotFoundError when there is no ``.proto`` under ``proto_root``.
    """
    sources = _sources(proto_root)
    if not sources:
        raise FileNotFoundError(f"no .proto files under {proto_root}")
    fingerprint = _fingerprint(proto_root, sources)
    stamp = gen_dir / _STAMP
    if not force and stamp.is_file() and stamp.read_text() == fingerprint:
        return False
    gen_dir.parent.mkdir(parents=True, exist_ok=True)
    # The lock lives outside the tree so it never shows up in git.
    tag = hashlib.sha256(str(gen_dir.resolve()).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"marrowscope-codegen-{tag}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and stamp.is_file() and stamp.read_text() == fingerprint:
            return False  # another process generated while we waited
        with tempfile.TemporaryDirectory(dir=gen_dir.parent, prefix=".gen-") as tmp:
            out = Path(tmp) / "out"
            out.mkdir()
            _generate(proto_root, sources, out)
            (out / _STAMP).write_text(fingerprint)
            if gen_dir.exists():
                shutil.rmtree(gen_dir)
            out.rename(gen_dir)
    log.info("generated stubs for %d proto file(s) into %s", len(sources), gen_dir)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="regenerate even when current")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    generated = ensure_generated(force=args.force)
    if not generated:
        log.info("stubs in %s are current", GEN_DIR)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
